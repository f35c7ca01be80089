"""``qkd-emulator pty`` as a real subprocess: two SerialDevice instances, one per link path,
receive identical keys with identical IDs; signals stop it cleanly; it refuses to replace
a file that is not a symlink; ``--help`` documents every flag."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from qkdd_drivers.base import QkdKey
from qkdd_drivers.serial_driver import SerialDevice

EMULATOR = [sys.executable, "-m", "qkdd_drivers.emulator"]
FLAGS = [
    "--link-a", "--link-b", "--key-bits", "--rate", "--buffer", "--window",
    "--retransmit-timeout", "--status-interval", "--json", "--log-level",
]


class ListSink:
    def __init__(self) -> None:
        self.keys: list[QkdKey] = []

    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        self.keys += keys


async def start_emulator(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [*EMULATOR, "pty", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    with trio.fail_after(10):
        line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    return proc, line.decode()


async def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)


async def test_both_links_receive_identical_keys(tmp_path: Path) -> None:
    link_a, link_b = tmp_path / "qkd-a", tmp_path / "qkd-b"
    proc, line = await start_emulator(
        "--link-a", str(link_a), "--link-b", str(link_b), "--json",
        "--key-bits", "512", "--rate", "3000", "--buffer", "1000",
    )
    try:
        assert json.loads(line) == {"link_a": str(link_a), "link_b": str(link_b)}
        assert os.readlink(link_a).startswith("/dev/pts/")
        assert os.readlink(link_a) != os.readlink(link_b)
        sink_a, sink_b = ListSink(), ListSink()
        dev_a, dev_b = SerialDevice(str(link_a)), SerialDevice(str(link_b))
        async with trio.open_nursery() as nursery:
            await nursery.start(dev_a.run, sink_a)
            await nursery.start(dev_b.run, sink_b)
            with trio.fail_after(15):
                while min(len(sink_a.keys), len(sink_b.keys)) < 1500:
                    await trio.sleep(0.05)
            status_a = dev_a.status
            nursery.cancel_scope.cancel()
    finally:
        code = await stop(proc)
    assert code == 0
    n = min(len(sink_a.keys), len(sink_b.keys))
    # Both sides see the same keys in the same order: same IDs, same material.
    assert [(k.key_id, k.material) for k in sink_a.keys[:n]] == [
        (k.key_id, k.material) for k in sink_b.keys[:n]
    ]
    for sink in (sink_a, sink_b):
        ids = [k.key_id for k in sink.keys]
        assert len(ids) == len(set(ids))
        assert all(len(k.material) == 64 for k in sink.keys)
    assert status_a.state == "up"
    assert status_a.secret_key_rate and status_a.secret_key_rate > 0
    assert status_a.keys_buffered is not None
    assert not link_a.exists() and not os.path.lexists(link_b)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_zero_and_removes_links(tmp_path: Path, sig: int) -> None:
    link_a, link_b = tmp_path / "a", tmp_path / "b"
    proc, line = await start_emulator("--link-a", str(link_a), "--link-b", str(link_b))
    assert line == "ready\n"
    assert os.path.islink(link_a) and os.path.islink(link_b)
    assert await stop(proc, sig) == 0
    assert not os.path.lexists(link_a) and not os.path.lexists(link_b)


async def test_stale_symlink_is_replaced(tmp_path: Path) -> None:
    link_a, link_b = tmp_path / "a", tmp_path / "b"
    os.symlink("/dev/pts/does-not-exist", link_a)
    proc, line = await start_emulator("--link-a", str(link_a), "--link-b", str(link_b))
    assert line == "ready\n"
    assert os.readlink(link_a) != "/dev/pts/does-not-exist"
    assert await stop(proc) == 0


async def test_refuses_to_overwrite_a_regular_file(tmp_path: Path) -> None:
    victim = tmp_path / "important"
    victim.write_text("keep me")
    proc = await trio.run_process(
        [*EMULATOR, "pty", "--link-a", str(victim), "--link-b", str(tmp_path / "b")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 2
    assert b"refusing to replace" in proc.stderr and b"not a symlink" in proc.stderr
    assert proc.stdout == b""
    assert victim.read_text() == "keep me"
    assert not os.path.lexists(tmp_path / "b")


async def test_help_documents_every_flag() -> None:
    proc = await trio.run_process([*EMULATOR, "pty", "--help"], capture_stdout=True)
    text = proc.stdout.decode()
    for flag in FLAGS:
        assert flag in text
    assert "unpaced" in text and "SIGTERM" in text
    top = await trio.run_process([*EMULATOR, "--help"], capture_stdout=True)
    assert b"pty" in top.stdout
