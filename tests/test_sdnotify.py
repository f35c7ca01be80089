"""qkdd.systemd against real sockets: a bound AF_UNIX datagram socket plays systemd's
notification socket, and the real systemd-socket-activate binary passes listening sockets
to a real child process, exactly as PID 1 would."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from timeouts import timeout

from qkdd.systemd import (
    ListenFdsError,
    Notifier,
    credential_path,
    listen_fds,
    listen_fds_with_names,
    watchdog_interval,
)

REPO = Path(__file__).resolve().parent.parent
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
TIMEOUT_S = timeout(10.0)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    path = Path("/tmp") / f"qkdd-sd-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notification socket."""
    path = str(short_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(TIMEOUT_S)
    yield sock, path
    sock.close()


def recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def assert_nothing_queued(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(TIMEOUT_S)


def test_state_messages_arrive_exactly(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert recv(sock) == b"READY=1"
    assert n.status("serving 3 applications")
    assert recv(sock) == b"STATUS=serving 3 applications"
    assert n.watchdog()
    assert recv(sock) == b"WATCHDOG=1"
    assert n.errno(5)
    assert recv(sock) == b"ERRNO=5"
    assert n.extend_timeout(2.5)
    assert recv(sock) == b"EXTEND_TIMEOUT_USEC=2500000"
    assert n.stopping()
    assert recv(sock) == b"STOPPING=1"
    assert_nothing_queued(sock)
    n.close()


def test_ready_with_status_is_one_datagram(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    Notifier({"NOTIFY_SOCKET": path}).ready("device up, 12 keys stored")
    assert recv(sock) == b"READY=1\nSTATUS=device up, 12 keys stored"
    assert_nothing_queued(sock)


def test_status_cannot_smuggle_a_second_assignment(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    Notifier({"NOTIFY_SOCKET": path}).status("line one\nREADY=1")
    assert recv(sock) == b"STATUS=line one READY=1"
    with pytest.raises(ValueError):
        Notifier({"NOTIFY_SOCKET": path}).notify("READY=1\nSTOPPING=1")


def test_reloading_carries_monotonic_usec(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": path}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(sock).split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket_name() -> None:
    name = f"qkdd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(TIMEOUT_S)
    with sock:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert recv(sock) == b"READY=1"


def test_reads_process_environment(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = manager
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    # Read once: a later change of the environment does not redirect it.
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notifier.watchdog()
    assert recv(sock) == b"WATCHDOG=1"


def test_child_process_notifies(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    env = dict(os.environ, NOTIFY_SOCKET=path, PYTHONPATH=str(REPO))
    code = "from qkdd.systemd import Notifier; Notifier().ready('up')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=TIMEOUT_S)
    assert recv(sock) == b"READY=1\nSTATUS=up"


def test_no_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier(), Notifier({}), Notifier({"NOTIFY_SOCKET": ""})):
        assert not n.enabled
        assert not n.ready()
        assert not n.status("x")
        assert not n.stopping()
        assert not n.reloading()
        assert not n.watchdog()
        assert not n.errno(1)


def test_relative_notify_socket_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qkdd.systemd"):
        n = Notifier({"NOTIFY_SOCKET": "relative/path"})
    assert not n.enabled
    assert not n.ready()
    assert "NOTIFY_SOCKET" in caplog.text


def test_send_failure_never_raises_and_warns_once(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(short_dir / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="qkdd.systemd"):
        assert not n.ready()
        assert not n.watchdog()
        assert not n.stopping()
    ours = [r for r in caplog.records if r.name == "qkdd.systemd"]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in ours) == 2


def test_send_recovers_when_manager_appears(short_dir: Path) -> None:
    path = str(short_dir / "late")
    n = Notifier({"NOTIFY_SOCKET": path})
    assert not n.ready()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(TIMEOUT_S)
        assert n.ready()
        assert recv(sock) == b"READY=1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "other"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    if env.get("WATCHDOG_PID") == "self":
        env = dict(env, WATCHDOG_PID=str(os.getpid()))
    elif env.get("WATCHDOG_PID") == "other":
        env = dict(env, WATCHDOG_PID=str(os.getpid() + 1))
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "8000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 4.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


def test_listen_fds_for_another_process_are_left_alone() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api"}
    assert listen_fds(env) == []
    assert env == {}  # unset either way, as sd_listen_fds(unset_environment=1)


def test_listen_fds_absent() -> None:
    assert listen_fds({}) == []
    assert listen_fds_with_names({"PATH": "/usr/bin"}) == {}


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "self", "LISTEN_FDS": "two"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "-1"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "api"},
    ],
)
def test_malformed_listen_env_raises(env: dict[str, str]) -> None:
    env = dict(env, LISTEN_PID=str(os.getpid()))
    with pytest.raises(ListenFdsError):
        listen_fds(env)
    assert "LISTEN_FDS" not in env


CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    from qkdd.systemd import listen_fds, listen_fds_with_names, ListenFdsError
    mode, target = sys.argv[1], sys.argv[2]
    try:
        if mode == "names":
            socks = listen_fds_with_names()
            listener = socks[target]
            names = sorted(socks)
        else:
            socks = listen_fds()
            listener = socks[int(target)]
            names = None
    except ListenFdsError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        sys.exit(3)
    listener.settimeout(10)
    conn, _ = listener.accept()
    conn.sendall(b"accepted:" + conn.recv(64))
    conn.close()
    print(json.dumps({
        "names": names,
        "count": len(socks),
        "family": int(listener.family),
        "type": int(listener.type),
        "fileno": listener.fileno(),
        "inheritable": listener.get_inheritable(),
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "second_call": len(listen_fds()),
    }), flush=True)
    """
)


def socket_activate(
    paths: list[Path], fdnames: str | None, mode: str, target: str
) -> subprocess.Popen[str]:
    if not os.access(SOCKET_ACTIVATE, os.X_OK):
        pytest.skip(f"{SOCKET_ACTIVATE} is not installed (package systemd)")
    cmd = [SOCKET_ACTIVATE]
    for p in paths:
        cmd += ["-l", str(p)]
    if fdnames is not None:
        cmd.append(f"--fdname={fdnames}")
    # systemd-socket-activate passes on only TERM/PATH/USER/HOME and -E variables.
    cmd += ["-E", f"PYTHONPATH={REPO}", sys.executable, "-c", CHILD, mode, target]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def connect_when_listening(path: Path, proc: subprocess.Popen[str]) -> socket.socket:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(TIMEOUT_S)
        try:
            client.connect(str(path))
            return client
        except (FileNotFoundError, ConnectionRefusedError):
            client.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate(timeout=TIMEOUT_S)
                pytest.fail(f"{path} never accepted a connection: {out}{err}")
            time.sleep(0.02)


def finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, object], str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"socket-activated child hung: {out}{err}")
    lines = out.strip().splitlines()
    assert lines, f"child printed nothing (rc={proc.returncode}): {err}"
    return proc.returncode, json.loads(lines[-1]), err


def test_socket_activation_passes_a_listening_socket(short_dir: Path) -> None:
    path = short_dir / "api.sock"
    proc = socket_activate([path], None, "index", "0")
    with connect_when_listening(path, proc) as client:
        client.sendall(b"ping")
        assert client.recv(64) == b"accepted:ping"
    rc, report, err = finish(proc)
    assert rc == 0, err
    assert report["count"] == 1
    assert report["family"] == socket.AF_UNIX
    assert report["type"] == socket.SOCK_STREAM
    assert report["fileno"] == 3
    assert report["inheritable"] is False
    assert report["env_left"] == []
    assert report["second_call"] == 0


def test_socket_activation_names(short_dir: Path) -> None:
    api, peer = short_dir / "api.sock", short_dir / "peer.sock"
    # Connect to the second socket: the name must lead to the right fd, not just fd 3.
    proc = socket_activate([api, peer], "api:peer", "names", "peer")
    with connect_when_listening(peer, proc) as client:
        client.sendall(b"hello")
        assert client.recv(64) == b"accepted:hello"
    rc, report, err = finish(proc)
    assert rc == 0, err
    assert report["names"] == ["api", "peer"]
    assert report["fileno"] == 4
    assert report["env_left"] == []


def test_socket_activation_duplicate_names_are_refused(short_dir: Path) -> None:
    a, b = short_dir / "a.sock", short_dir / "b.sock"
    proc = socket_activate([a, b], "api:api", "names", "api")
    client = connect_when_listening(a, proc)
    rc, report, _ = finish(proc)
    client.close()
    assert rc == 3
    assert "FileDescriptorName" in str(report["error"])


def test_credential_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "qkdd-kek").write_bytes(os.urandom(32))
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert credential_path("qkdd-kek", env) == str(tmp_path / "qkdd-kek")
    assert credential_path("qkdd-identity", env) is None
    assert credential_path("qkdd-kek", {}) is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert credential_path("qkdd-kek") == str(tmp_path / "qkdd-kek")
    for bad in ("", "../etc/shadow", "a/b", ".", ".."):
        with pytest.raises(ValueError):
            credential_path(bad, env)
