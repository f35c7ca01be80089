"""The unit files under systemd/, checked by systemd's own tools and by re-creating the
kernel rules they turn into.

* ``systemd-analyze security --offline=yes``: qkdd.service exposure <= 1.2.
* ``systemd-analyze verify``: no complaint about the unit files themselves.
* ``systemd-sysusers`` / ``systemd-tmpfiles`` with ``--root``: every user and group the
  units name exists, and /etc/qkdd gets its owner and mode.
* The seccomp filters systemd 252 derives from ``SystemCallFilter=``,
  ``SystemCallErrorNumber=``, ``MemoryDenyWriteExecute=``, ``RestrictAddressFamilies=`` and
  ``SystemCallArchitectures=native`` are rebuilt here with the same libseccomp and loaded
  before exec'ing a Python that runs the daemon's stack (crypto self-test, Trio sockets and
  threads, pyserial on a pty, the SQLite key store, sd_notify). This is how the unit's
  claim that CPython and the cryptography wheel run under MemoryDenyWriteExecute=yes is
  checked, since no service manager runs here.
* The kernel behaviour that rules PrivateUsers= out (SO_PEERCRED of unmapped clients).

Run as a script (``python tests/test_systemd_units.py POLICY_JSON -- CMD...``) this module
loads a seccomp policy and execs CMD under it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from timeouts import timeout

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
ANALYZE = shutil.which("systemd-analyze")
SYSUSERS = shutil.which("systemd-sysusers")
TMPFILES = shutil.which("systemd-tmpfiles")
TIMEOUT_S = timeout(60.0)
EXPOSURE_TARGET = 1.2

# Where the unit files expect the entry points, and where this install has them.
INSTALLED_ENTRY_POINTS = {
    "/usr/bin/qkdd": Path(sys.executable).parent / "qkdd",
    "/usr/bin/qkd-emulator": Path(sys.executable).parent / "qkd-emulator",
}


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every assignment in order (units repeat keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            raise ValueError(f"{path}:{number}: continuation lines are not supported here")
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"{path}:{number}: not KEY=VALUE inside a section: {line!r}")
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# --- seccomp: what systemd 252 builds from the unit ---------------------------------------

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_EQ = 4
SCMP_CMP_GT = 6
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000


def scmp_act_errno(n: int) -> int:
    return 0x00050000 | (n & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class SeccompPolicy:
    allowed: frozenset[str]
    errno: int | None  # None: the process is killed, as without SystemCallErrorNumber=
    deny_write_execute: bool
    families: frozenset[int] | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "allowed": sorted(self.allowed),
                "errno": self.errno,
                "deny_write_execute": self.deny_write_execute,
                "families": None if self.families is None else sorted(self.families),
            }
        )


def syscall_groups() -> dict[str, list[str]]:
    """systemd's own @group tables, as this systemd version defines them."""
    assert ANALYZE is not None
    out = subprocess.run(
        [ANALYZE, "syscall-filter"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.startswith((" ", "\t")):
            current = None  # blank line or the trailing "# Unlisted ..." block
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]], seen: frozenset[str] = frozenset()) -> set[str]:
    if not name.startswith("@"):
        return {name}
    if name not in groups:
        raise ValueError(f"unknown system call group {name}")
    result: set[str] = set()
    for item in groups[name]:
        if item not in seen:
            result |= expand(item, groups, seen | {name})
    return result


def policy_from_unit(service: dict[str, list[str]], groups: dict[str, list[str]]) -> SeccompPolicy:
    filters = service.get("SystemCallFilter", [])
    assert filters and not filters[0].startswith("~"), "expected an allow list first"
    # An allow list always includes @default (systemd.exec(5)); later lines add or remove.
    allowed = expand("@default", groups)
    for value in filters:
        remove = value.startswith("~")
        for item in value.lstrip("~").split():
            names = expand(item, groups)
            allowed = allowed - names if remove else allowed | names
    error_name = service.get("SystemCallErrorNumber", [None])[-1]
    families = service.get("RestrictAddressFamilies")
    return SeccompPolicy(
        allowed=frozenset(allowed),
        errno=None if error_name is None else getattr(errno, error_name),
        deny_write_execute=service.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes",
        families=None
        if families is None
        else frozenset(getattr(socket, f) for f in families[-1].split()),
    )


def load_policy(policy: dict[str, object]) -> None:
    """Load the filters into this process, the way systemd does before exec'ing a service.

    Every filter covers the native architecture only and kills on any other, which is
    what SystemCallArchitectures=native asks for.
    """
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def new(default: int) -> int:
        ctx = lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        return int(ctx)

    def rule(ctx: int, action: int, name: str, *cmps: ArgCmp) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a system call of this architecture
            return
        array = (ArgCmp * max(1, len(cmps)))(*cmps)
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

    def load(ctx: int) -> None:
        rc = lib.seccomp_load(ctx)
        lib.seccomp_release(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")

    if policy["deny_write_execute"]:
        # seccomp_memory_deny_write_execute() of systemd 252 for x86-64/arm64.
        ctx = new(SCMP_ACT_ALLOW)
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        eperm = scmp_act_errno(errno.EPERM)
        rule(ctx, eperm, "mmap", ArgCmp(2, SCMP_CMP_MASKED_EQ, wx, wx))
        rule(ctx, eperm, "mprotect", ArgCmp(2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        rule(
            ctx,
            eperm,
            "pkey_mprotect",
            ArgCmp(2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC),
        )
        rule(ctx, eperm, "shmat", ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        load(ctx)

    families = policy["families"]
    if isinstance(families, list):
        # seccomp_restrict_address_families() with an allow list: socket() only.
        ctx = new(SCMP_ACT_ALLOW)
        refuse = scmp_act_errno(errno.EAFNOSUPPORT)
        top = max(families)
        rule(ctx, refuse, "socket", ArgCmp(0, SCMP_CMP_GT, top, 0))
        for af in range(top):
            if af not in families:
                rule(ctx, refuse, "socket", ArgCmp(0, SCMP_CMP_EQ, af, 0))
        load(ctx)

    # The allow list goes last: it may not include the calls that load filters.
    code = policy["errno"]
    ctx = new(SCMP_ACT_KILL_PROCESS if code is None else scmp_act_errno(int(code)))  # type: ignore[call-overload]
    for name in policy["allowed"]:  # type: ignore[attr-defined]
        rule(ctx, SCMP_ACT_ALLOW, name)
    load(ctx)


# The daemon's stack, plus three controls the unit forbids: if they succeed, the filters
# are not in force and the rest of the run proves nothing.
WORKLOAD = textwrap.dedent(
    """
    import errno, json, mmap, os, socket, sqlite3, sys, tempfile
    report = {}

    def attempt(name, fn):
        try:
            fn()
            report[name] = "ok"
        except OSError as exc:
            report[name] = errno.errorcode.get(exc.errno, str(exc.errno))

    attempt("control_wx_mmap", lambda: mmap.mmap(
        -1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
    attempt("control_netlink", lambda: socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
    attempt("control_setpriority", lambda: os.setpriority(os.PRIO_PROCESS, 0, 5))

    import serial, trio
    import qkdd.daemon  # the whole import graph of `qkdd run`
    from qkdd.crypto.select import select_backend
    from qkdd.crypto.selftest import run_self_tests
    from qkdd.systemd import Notifier
    from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

    backend = select_backend("auto")
    run_self_tests(backend)
    report["backend"] = backend.name
    kem = MLKEM768PrivateKey.generate()
    secret, ct = kem.public_key().encapsulate()
    assert kem.decapsulate(ct) == secret
    dsa = MLDSA65PrivateKey.generate()
    dsa.public_key().verify(dsa.sign(b"hello"), b"hello")

    with tempfile.TemporaryDirectory() as tmp:  # the key store's SQLite settings
        db = sqlite3.connect(os.path.join(tmp, "keys.sqlite3"), isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON"):
            db.execute("PRAGMA " + pragma)
        db.execute("CREATE TABLE k (id BLOB PRIMARY KEY, sealed BLOB)")
        db.execute("INSERT INTO k VALUES (?, ?)", (os.urandom(16), os.urandom(64)))
        assert db.execute("SELECT count(*) FROM k").fetchone() == (1,)
        db.close()

    master, slave = os.openpty()
    port = serial.Serial(os.ttyname(slave), 115200, timeout=2)
    os.write(master, b"frame")
    assert port.read(5) == b"frame"
    port.close()

    name = "qkdd-seccomp-%d" % os.getpid()
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind("\\0" + name)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
    assert manager.recv(64) == b"READY=1"

    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            async def echo_once(stream):
                await stream.send_all(await stream.receive_some(64))
            nursery.start_soon(trio.serve_listeners, echo_once, listeners)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"peer")
            assert await stream.receive_some(64) == b"peer"
            await stream.aclose()
            assert await trio.to_thread.run_sync(sum, [1, 2, 3]) == 6
            nursery.cancel_scope.cancel()

    trio.run(main)
    report["workload"] = "ok"
    print(json.dumps(report), flush=True)
    """
)


def run_workload(
    policy: SeccompPolicy | None,
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    cmd = [sys.executable, "-c", WORKLOAD]
    if policy is not None:
        cmd = [sys.executable, __file__, policy.to_json(), "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    lines = proc.stdout.strip().splitlines()
    return proc, (json.loads(lines[-1]) if lines else {})


if __name__ == "__main__":
    # python tests/test_systemd_units.py POLICY_JSON -- CMD...
    load_policy(json.loads(sys.argv[1]))
    command = sys.argv[sys.argv.index("--") + 1 :]
    os.execv(command[0], command)


# --- tests ----------------------------------------------------------------------------------

import pytest  # noqa: E402  (the script mode above must not need pytest)

needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd
    )


def exposure(unit_path: Path) -> float:
    proc = analyze("security", "--offline=yes", unit_path.name, cwd=unit_path.parent)
    match = re.search(
        r"Overall exposure level for " + re.escape(unit_path.name) + r": (\d+\.\d)",
        proc.stdout,
    )
    assert match, f"no exposure line in output:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


def instance_copy(tmp_path: Path) -> Path:
    """The emulator template as an instance (the analyzer needs a concrete unit name)."""
    target = tmp_path / "qkd-emulator@lab.service"
    shutil.copy(UNITS / "qkd-emulator@.service", target)
    return target


@needs_analyze
@pytest.mark.parametrize("unit", ["qkdd.service", "qkd-emulator@lab.service"])
def test_security_exposure_within_target(unit: str, tmp_path: Path) -> None:
    path = instance_copy(tmp_path) if "@" in unit else UNITS / unit
    level = exposure(path)
    assert level <= EXPOSURE_TARGET, f"{unit}: exposure {level} > {EXPOSURE_TARGET}"
    # The same bound through systemd's own comparison (exposure is kept in tenths).
    proc = analyze(
        "security",
        "--offline=yes",
        f"--threshold={int(EXPOSURE_TARGET * 10)}",
        path.name,
        cwd=path.parent,
    )
    assert proc.returncode == 0, proc.stdout[-500:]


@needs_analyze
def test_exposure_parser_sees_a_weaker_unit(tmp_path: Path) -> None:
    """Control: dropping two sandbox settings must raise the number the tests read."""
    weaker = tmp_path / "qkdd.service"
    text = (UNITS / "qkdd.service").read_text()
    text = re.sub(r"^(PrivateDevices|ProtectSystem)=.*$", "", text, flags=re.M)
    weaker.write_text(text)
    assert exposure(weaker) > exposure(UNITS / "qkdd.service")


def units_for_verify(tmp_path: Path) -> list[Path]:
    """Copies of the units whose only change is the entry points' absolute path."""
    copies = []
    for name in ("qkdd.service", "qkdd.socket", "qkd-emulator@.service"):
        original = (UNITS / name).read_text()
        text = original
        for expected, installed in INSTALLED_ENTRY_POINTS.items():
            text = text.replace(f"={expected} ", f"={installed} ")
        changed = [
            (a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b
        ]
        assert all(a.startswith("ExecStart=") for a, _ in changed), changed
        target = tmp_path / name.replace("@.", "@lab.")
        target.write_text(text)
        copies.append(target)
    return copies


def verify_problems(paths: list[Path]) -> list[str]:
    proc = analyze("verify", "--man=no", *[str(p) for p in paths])
    names = tuple(p.name for p in paths) + tuple(str(p) for p in paths)
    return [
        line for line in (proc.stderr + proc.stdout).splitlines() if any(n in line for n in names)
    ]


@needs_analyze
def test_verify_reports_nothing_about_the_units(tmp_path: Path) -> None:
    """systemd-analyze verify on the units with ExecStart pointing at this install.

    verify checks that ExecStart's binary exists, and /usr/bin/qkdd does not on a
    development machine. The copies differ from the shipped files only in the absolute
    path of the entry point, replaced by the one this venv installed: the same edit the
    units tell a venv install to make with a drop-in. That is more honest than a fake
    --root with a stub /usr/bin/qkdd, which would only prove that the stub exists; every
    other line, including ExecStartPost's /usr/bin/timeout and /bin/sh, is checked as
    shipped.
    """
    for installed in INSTALLED_ENTRY_POINTS.values():
        if not installed.exists():
            pytest.skip(f"{installed} is not installed: pip install -e . first")
    problems = verify_problems(units_for_verify(tmp_path))
    assert problems == []


@needs_analyze
def test_verify_check_catches_an_unknown_directive(tmp_path: Path) -> None:
    """Control: verify only warns (exit 0) on unknown keys, so the test reads its output."""
    copies = units_for_verify(tmp_path)
    service = copies[0]
    # ImportCredential= appeared in systemd 254: a 252 host must flag it.
    service.write_text(service.read_text().replace("[Install]", "ImportCredential=x\n\n[Install]"))
    problems = verify_problems(copies)
    assert any("ImportCredential" in p for p in problems), problems


def test_api_socket_is_outside_the_service_runtime_directory() -> None:
    """systemd chowns a RuntimeDirectory= recursively and deletes it on stop, which would
    take api.sock from qkdd-users and unlink it under qkdd.socket's feet."""
    socket_path = Path(read_unit(UNITS / "qkdd.socket")["Socket"]["ListenStream"][0])
    service = read_unit(UNITS / "qkdd.service")["Service"]
    for entry in " ".join(service.get("RuntimeDirectory", [])).split():
        runtime = Path("/run") / entry
        assert runtime not in socket_path.parents, f"{socket_path} is under {runtime}"


@pytest.mark.skipif(
    SYSUSERS is None or TMPFILES is None, reason="systemd-sysusers/-tmpfiles missing"
)
def test_sysusers_and_tmpfiles_provide_what_the_units_name(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    assert SYSUSERS is not None and TMPFILES is not None
    for tool, conf in ((SYSUSERS, "qkdd.sysusers.conf"), (TMPFILES, "qkdd.tmpfiles.conf")):
        extra = ["--create"] if tool == TMPFILES else []
        proc = subprocess.run(
            [tool, f"--root={root}", *extra, str(UNITS / conf)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stderr
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }

    user = passwd["qkdd"]
    assert int(user[2]) < 1000, "qkdd must be a system user"
    assert user[5] == "/var/lib/qkdd"
    assert user[6].endswith("nologin")
    assert user[3] == groups["qkdd"][2]

    names_used: set[tuple[str, str]] = set()
    for unit in ("qkdd.service", "qkdd.socket", "qkd-emulator@.service"):
        sections = read_unit(UNITS / unit)
        for section in sections.values():
            for key in ("User", "Group", "SocketUser", "SocketGroup", "SupplementaryGroups"):
                for value in section.get(key, []):
                    names_used.update((key, v) for v in value.split())
    for key, name in names_used:
        if name == "root":
            continue
        table = passwd if key.endswith("User") else groups
        assert name in table, f"{key}={name} is not created by qkdd.sysusers.conf"

    etc_qkdd = (root / "etc/qkdd").stat()
    assert oct(etc_qkdd.st_mode & 0o7777) == oct(0o750)
    assert etc_qkdd.st_uid == 0
    assert etc_qkdd.st_gid == int(groups["qkdd"][2])
    mode = read_unit(UNITS / "qkdd.service")["Service"]["ConfigurationDirectoryMode"][0]
    assert int(mode, 8) == 0o750, "ConfigurationDirectoryMode= would chmod /etc/qkdd"


@needs_analyze
def test_qkdd_stack_runs_under_the_units_seccomp_policy() -> None:
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed")
    policy = policy_from_unit(read_unit(UNITS / "qkdd.service")["Service"], syscall_groups())
    assert policy.deny_write_execute
    proc, report = run_workload(policy)
    assert proc.returncode == 0, f"{report}\n{proc.stderr[-3000:]}"
    assert report["control_wx_mmap"] == "EPERM"
    assert report["control_netlink"] == "EAFNOSUPPORT"
    assert report["control_setpriority"] == "EPERM"
    assert report["workload"] == "ok"


def test_workload_controls_succeed_without_the_policy() -> None:
    """Control: the forbidden operations do work when no filter is loaded."""
    proc, report = run_workload(None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["control_wx_mmap"] == "ok"
    assert report["control_netlink"] == "ok"
    assert report["control_setpriority"] == "ok"
    assert report["workload"] == "ok"


PEERCRED_CHILD = textwrap.dedent(
    """
    import ctypes, json, os, socket, struct, sys
    path, daemon_uid, client_uid, in_userns = sys.argv[1], *map(int, sys.argv[2:5])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen()
    listener.settimeout(10)
    if os.fork() == 0:  # an application, outside any namespace
        try:
            os.setgid(client_uid)
            os.setuid(client_uid)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(10)
            client.connect(path)
            client.recv(1)
        finally:
            os._exit(0)
    os.setgroups([])
    os.setgid(daemon_uid)
    os.setuid(daemon_uid)
    if in_userns:  # what PrivateUsers=yes does: map only the service's own ids
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, cleared by setuid(): to write our maps
        if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
            print(json.dumps({"unshare": os.strerror(ctypes.get_errno())}))
            sys.exit(0)
        for name, text in (("uid_map", f"{daemon_uid} {daemon_uid} 1"),
                           ("setgroups", "deny"),
                           ("gid_map", f"{daemon_uid} {daemon_uid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    conn, _ = listener.accept()
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    conn.send(b"x")
    os.wait()
    print(json.dumps({"unshare": "ok", "peer_uid": uid}))
    """
)


def peer_uid_seen_by_daemon(in_userns: bool, client_uid: int) -> int | None:
    # Both users must reach the socket: pytest's tmp_path is under a 0700 directory.
    directory = Path(tempfile.mkdtemp(prefix="qkdd-peercred-", dir="/tmp"))
    directory.chmod(0o755)
    sock = directory / "api.sock"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PEERCRED_CHILD,
            str(sock),
            "61234",
            str(client_uid),
            str(int(in_userns)),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    shutil.rmtree(directory, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    if result["unshare"] != "ok":
        return None
    return int(result["peer_uid"])


@pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a daemon and a client as two users"
)
def test_private_users_would_hide_api_clients_uids() -> None:
    """Why qkdd.service has no PrivateUsers=yes: the ETSI 014 server identifies callers by
    SO_PEERCRED, and inside a user namespace an unmapped client uid reads as 65534."""
    client_uid = 62001
    assert peer_uid_seen_by_daemon(in_userns=False, client_uid=client_uid) == client_uid
    seen = peer_uid_seen_by_daemon(in_userns=True, client_uid=client_uid)
    if seen is None:
        pytest.skip("user namespaces are unavailable here")
    assert seen == 65534
    service = read_unit(UNITS / "qkdd.service")["Service"]
    assert service.get("PrivateUsers", ["no"])[-1] in ("no", "false", "0")


@needs_analyze
def test_wireguard_drop_in_adds_only_what_wg_needs(tmp_path: Path) -> None:
    """systemd/qkdd-wireguard.conf as qkdd.service.d/wireguard.conf: the analyzer reads it,
    and the only protections it gives up are CAP_NET_ADMIN and netlink sockets."""
    shutil.copy(UNITS / "qkdd.service", tmp_path / "qkdd.service")

    def failed_checks() -> set[str]:
        proc = analyze("security", "--offline=yes", "qkdd.service", cwd=tmp_path)
        return {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("✗")}

    before, level_before = failed_checks(), exposure(tmp_path / "qkdd.service")
    (tmp_path / "qkdd.service.d").mkdir()
    shutil.copy(UNITS / "qkdd-wireguard.conf", tmp_path / "qkdd.service.d" / "wireguard.conf")
    added = failed_checks() - before
    assert added == {
        "CapabilityBoundingSet=~CAP_NET_ADMIN",
        "AmbientCapabilities=",  # it is CAP_NET_ADMIN, as the bounding set says
        "RestrictAddressFamilies=~AF_NETLINK",
    }
    assert level_before < exposure(tmp_path / "qkdd.service") <= EXPOSURE_TARGET + 0.5
