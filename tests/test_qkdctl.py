"""`qkdctl` as a real subprocess against a key service running in another process."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from timeouts import timeout

from qkdd.ctl import main

SERVER = """
import sys
import trio
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.unix_socket import serve_unix

path = sys.argv[1]
grant = frozenset(["SAE-A", "SAE-B"])
pool = MemoryKeyPool(["SAE-A", "SAE-B"], max_key_per_request=8)
pool.fill("SAE-A", "SAE-B", 20)

async def run():
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, RequestHandler(pool), lambda uid, gid: grant)
        print("ready", flush=True)

trio.run(run)
"""


@pytest.fixture(scope="module")
def socket_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("ctl") / "api.sock")
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        yield path
    finally:
        server.terminate()
        server.wait(timeout=timeout(10))


def qkdctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdd.ctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout(30),
    )


def test_status_prints_the_standard_status_object(socket_path: str) -> None:
    done = qkdctl("--socket", socket_path, "--sae-id", "SAE-A", "status", "SAE-B")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("{\n  ")  # pretty by default
    status = json.loads(done.stdout)
    assert status["master_SAE_ID"] == "SAE-A" and status["slave_SAE_ID"] == "SAE-B"
    assert status["max_key_per_request"] == 8 and status["max_SAE_ID_count"] == 8


def test_enc_keys_then_dec_keys(socket_path: str) -> None:
    enc = qkdctl(
        "--socket",
        socket_path,
        "--sae-id",
        "SAE-A",
        "enc-keys",
        "SAE-B",
        "--number",
        "3",
        "--size",
        "128",
    )
    assert enc.returncode == 0, enc.stderr
    keys = json.loads(enc.stdout)["keys"]
    assert [len(base64.b64decode(k["key"])) for k in keys] == [16, 16, 16]
    dec = qkdctl(
        "--socket",
        socket_path,
        "--sae-id",
        "SAE-B",
        "--compact",
        "dec-keys",
        "SAE-A",
        *(k["key_ID"] for k in keys),
    )
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout.count("\n") == 1
    assert json.loads(dec.stdout)["keys"] == keys
    again = qkdctl(
        "--socket", socket_path, "--sae-id", "SAE-B", "dec-keys", "SAE-A", keys[0]["key_ID"]
    )
    assert again.returncode == 1 and "400" in again.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sae-id", "SAE-A", "enc-keys", "SAE-B", "--size", "12"], "multiple of 8"),
        (["--sae-id", "SAE-A", "enc-keys", "SAE-B", "--number", "9"], "between 1 and 8"),
        (["enc-keys", "SAE-B"], "X-SAE-ID"),
        (["--sae-id", "SAE-Z", "status", "SAE-B"], "SAE-Z"),
        (["--sae-id", "SAE-A", "dec-keys", "SAE-B", "not-a-uuid"], "not a UUID"),
    ],
)
def test_api_errors_exit_1_with_the_message(
    socket_path: str, args: list[str], fragment: str
) -> None:
    done = qkdctl("--socket", socket_path, *args)
    assert done.returncode == 1
    assert done.stdout == ""
    assert fragment in done.stderr and "refused" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["status", "SAE-B", "extra"],
        ["enc-keys", "SAE-B", "--number", "0"],
        ["enc-keys", "SAE-B", "--size", "big"],
        ["dec-keys", "SAE-A"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    done = qkdctl("--socket", str(tmp_path / "unused.sock"), *args)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_missing_socket_is_a_plain_message(tmp_path: Path) -> None:
    done = qkdctl("--socket", str(tmp_path / "absent.sock"), "status", "SAE-B")
    assert done.returncode == 1
    assert "no such socket" in done.stderr and "Traceback" not in done.stderr


def test_socket_from_environment(socket_path: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qkdd.ctl", "--sae-id", "SAE-A", "status", "SAE-B"],
        capture_output=True,
        text=True,
        timeout=timeout(30),
        env={**os.environ, "QKDD_SOCKET": socket_path},
    )
    assert done.returncode == 0, done.stderr


def test_permission_denied_is_a_plain_message(socket_path: str) -> None:
    args = ["--socket", socket_path, "status", "SAE-B"]
    if os.geteuid() != 0:
        mode = os.stat(socket_path).st_mode
        os.chmod(socket_path, 0)
        try:
            done = qkdctl(*args)
        finally:
            os.chmod(socket_path, mode)
        code, stderr = done.returncode, done.stderr
    else:
        # root passes permission checks, so run qkdctl's main in a child that drops to nobody.
        code, stderr = _run_as_nobody(args)
    assert code == 1
    assert "permission denied" in stderr and "Traceback" not in stderr


def _run_as_nobody(args: list[str]) -> tuple[int, str]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(read_end)
            os.dup2(write_end, 2)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            code = main(args)
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stderr
