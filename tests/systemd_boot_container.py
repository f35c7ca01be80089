"""A Debian 12 container with a real systemd as PID 1, for tests that install qkdd the way an
operator does (``systemd-nspawn -b``).

* ``ensure_tools()`` installs systemd-container and debootstrap with apt when they are
  missing, or says why the test must be skipped (not root, no network, no apt).
* ``cached_rootfs()`` builds a Debian 12 root file system with debootstrap once per
  machine, under /var/tmp/qkdd-nspawn/ in a directory named by a hash of what goes into it
  (suite, mirror, packages): a changed package list builds a new one, a rerun reuses it.
  Trees of other recipes stay until removed by hand (``rm -r /var/tmp/qkdd-nspawn``).
* ``Container`` boots a private copy of that tree (the cache is never written to) and runs
  commands in it with ``nsenter``, which needs nothing from the host's init: a host without
  systemd has no systemd-machined, so ``systemd-run --machine`` and ``machinectl`` would
  not work there. The container shares the host's network (the install needs PyPI).

The host's own extra CA certificates (/usr/local/share/ca-certificates) are trusted in the
container too: where HTTPS goes through an intercepting proxy, pip could not reach the
package index without that proxy's CA.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from timeouts import timeout

CACHE = Path("/var/tmp/qkdd-nspawn")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# debootstrap's default variant (every "required" and "important" package, as on a fresh
# Debian install) plus what the README's install steps use.
PACKAGES = (
    "ca-certificates",
    "dbus",
    "python3",
    "python3-venv",
    "systemd",
    "systemd-sysv",
)
# Bumped when the recipe below changes in a way the inputs above do not show.
RECIPE = 1
HOST_TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap"}
HOST_CA_DIRECTORY = Path("/usr/local/share/ca-certificates")
OWNER_FILE = "owner.pid"  # "TEST_PID NSPAWN_PID" of the run that made a copy
# Where the container finds pip's download cache (see Container.run).
CONTAINER_PIP_CACHE = "/var/cache/qkdd-test-pip"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """The host cannot run the container; the message says why (a skip reason)."""


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout(10)):
            return True
    except OSError:
        return False


def ensure_tools() -> None:
    """Make sure systemd-nspawn and debootstrap exist, installing them with apt if needed,
    and that the package mirrors the run needs answer."""
    if os.geteuid() != 0:
        raise Unavailable("booting a container with systemd-nspawn needs root")
    if not _reachable("pypi.org", 443):
        raise Unavailable("pypi.org:443 is not reachable (the README's pip install needs it)")
    building = not (CACHE / f"{SUITE}-{cache_key()}" / "rootfs").is_dir()
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if (building or missing) and not _reachable("deb.debian.org", 80):
        raise Unavailable("deb.debian.org:80 is not reachable (needed to install Debian)")
    if missing and shutil.which("apt-get") is None:
        raise Unavailable(f"no apt-get to install {', '.join(missing)}")
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout(900)
        )
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {proc.stderr.strip()[-2000:]}")
    still = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if still:
        raise Unavailable(f"{', '.join(still)} still missing after installing {missing}")


def cache_key() -> str:
    recipe = {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "recipe": RECIPE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per machine (parallel test runs wait for the first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_rootfs() -> Path:
    """The Debian 12 root file system for this recipe, built now if not cached yet."""
    key = cache_key()
    done = CACHE / f"{SUITE}-{key}"
    rootfs = done / "rootfs"
    with _locked(CACHE / "build.lock"):
        if rootfs.is_dir():
            return rootfs
        # Built aside and renamed into place: an interrupted build is never taken as done,
        # and (holding the lock) whatever another build left aside is debris.
        for debris in CACHE.glob("building-*"):
            shutil.rmtree(debris, ignore_errors=True)
        building = CACHE / f"building-{key}-{os.getpid()}"
        building.mkdir(parents=True)
        try:
            _debootstrap(building / "rootfs")
            building.rename(done)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return rootfs


def _debootstrap(target: Path) -> None:
    command = [
        "debootstrap",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(target),
        MIRROR,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout(1800))
    if proc.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        detail = log.read_text()[-3000:] if log.exists() else proc.stderr[-3000:]
        raise Unavailable(f"{' '.join(command)} failed:\n{detail}")
    # Downloaded .debs are not needed in the image; an empty machine-id makes each boot
    # generate its own.
    subprocess.run(["chroot", str(target), "apt-get", "clean"], check=True, timeout=timeout(60))
    (target / "etc" / "machine-id").write_text("")


@dataclass
class Result:
    command: str
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {self.command}\n(exit status {self.returncode})\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


class Container:
    """A booted copy of ``rootfs``; ``run()`` executes shell commands inside it as root."""

    def __init__(self, rootfs: Path, *, binds: Sequence[tuple[Path, str]] = ()) -> None:
        self.name = f"qkdd-test-{secrets.token_hex(4)}"
        self.workdir = CACHE / "runs" / self.name
        self.root = self.workdir / "rootfs"
        self.console_log = self.workdir / "console.log"
        self._source = rootfs
        self._binds = binds
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    @property
    def _owner_file(self) -> Path:
        return self.workdir / OWNER_FILE

    # -- before boot --------------------------------------------------------------------

    def prepare(self) -> None:
        """Copy the cached tree (hard links would let the container write to the cache)."""
        sweep_orphaned_runs()
        self.workdir.mkdir(parents=True)
        self._owner_file.write_text(f"{os.getpid()}\n")
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(self._source), str(self.root)],
            check=True,
            timeout=timeout(600),
        )
        self._trust_host_cas()

    def _trust_host_cas(self) -> None:
        extra = sorted(HOST_CA_DIRECTORY.glob("*.crt")) if HOST_CA_DIRECTORY.is_dir() else []
        if not extra:
            return
        target = self.root / HOST_CA_DIRECTORY.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        for cert in extra:
            shutil.copy2(cert, target / cert.name)
        subprocess.run(
            ["chroot", str(self.root), "update-ca-certificates"],
            check=True,
            capture_output=True,
            timeout=timeout(120),
        )

    def copy_in(self, source: Path, files: Sequence[str], destination: str) -> None:
        """Copy ``files`` (relative to ``source``) to ``destination`` inside the container."""
        target = self.root / destination.lstrip("/")
        for name in files:
            path, copy = source / name, target / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                copy.symlink_to(os.readlink(path))
            elif path.is_file():
                shutil.copy2(path, copy)

    # -- boot and run -------------------------------------------------------------------

    def boot(self) -> None:
        command = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            # Both need nothing from the host's init: registering would need
            # systemd-machined, and a scope unit of its own the host's systemd.
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            *(f"--bind={host}:{inside}" for host, inside in self._binds),
        ]
        with self.console_log.open("wb") as log:
            self._nspawn = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._owner_file.write_text(f"{os.getpid()} {self._nspawn.pid}\n")
        self.leader = self._wait_for_leader()
        state = self._wait_booted()
        if state not in ("running", "degraded"):
            raise AssertionError(
                f"the container did not finish booting: {state}\n{self.console_tail()}"
            )

    def console_tail(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _wait_for_leader(self) -> int:
        """The container's PID 1 as the host sees it: a descendant of systemd-nspawn whose
        own PID namespace calls it 1."""
        assert self._nspawn is not None
        deadline = time.monotonic() + timeout(60)
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise AssertionError(
                    f"systemd-nspawn exited with {self._nspawn.returncode}:\n{self.console_tail()}"
                )
            leader = _namespace_init_below(self._nspawn.pid)
            if leader is not None:
                return leader
            time.sleep(0.1)
        raise AssertionError(f"no container init appeared:\n{self.console_tail()}")

    def _wait_booted(self) -> str:
        deadline = time.monotonic() + timeout(180)
        last = ""
        while time.monotonic() < deadline:
            result = self.run("systemctl is-system-running --wait", check=False, limit=120)
            last = result.stdout.strip()
            if last in ("running", "degraded", "maintenance", "stopping"):
                return last
            time.sleep(0.2)
        return f"still {last!r}"

    def run(
        self,
        script: str,
        *,
        user: str | None = None,
        cwd: str = "/",
        check: bool = True,
        limit: float = 120,
    ) -> Result:
        """Run ``script`` with bash inside the container (as ``user`` if given, through
        runuser); ``limit`` seconds (scaled) only catch a hang."""
        assert self.leader is not None
        inner = ["/bin/bash", "-c", f"cd {shlex.quote(cwd)} && {script}"]
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        command = [
            "nsenter",
            f"--target={self.leader}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--cgroup",
            "--root",
            "--wd",
            "env",
            "-i",
            f"PATH={PATH}",
            "HOME=/root" if user is None else f"HOME=/home/{user}",
            "LANG=C.UTF-8",
            # pip's download cache inside the container (bound from the host's cache).
            f"PIP_CACHE_DIR={CONTAINER_PIP_CACHE}",
            *inner,
        ]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout(limit))
        result = Result(script, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(result.describe())
        return result

    # -- teardown -----------------------------------------------------------------------

    def destroy(self) -> None:
        """Power the container off (SIGTERM to nspawn), kill what is left, delete the copy."""
        nspawn, leader = self._nspawn, self.leader
        if nspawn is not None and nspawn.poll() is None:
            nspawn.send_signal(signal.SIGTERM)
            try:
                nspawn.wait(timeout=timeout(60))
            except subprocess.TimeoutExpired:
                if leader is not None:
                    # Killing a PID namespace's init kills everything inside it.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)
                nspawn.kill()
                nspawn.wait(timeout=timeout(60))
        _remove_run(self.workdir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_run(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    # systemd-nspawn cannot remove this one where /run is not a tmpfs.
    shutil.rmtree(Path("/run/systemd/nspawn/propagate") / workdir.name, ignore_errors=True)


def sweep_orphaned_runs() -> None:
    """Remove the copies (and stop the containers) of runs whose test process was killed
    before it could clean up."""
    runs = CACHE / "runs"
    if not runs.is_dir():
        return
    for workdir in runs.iterdir():
        try:
            pids = [int(word) for word in (workdir / OWNER_FILE).read_text().split()]
        except (OSError, ValueError):
            continue  # being set up right now, or not ours
        owner, nspawn = pids[0], (pids[1] if len(pids) > 1 else None)
        if _alive(owner):
            continue
        if nspawn is not None and _alive(nspawn) and _is_nspawn_of(nspawn, workdir.name):
            leader = _namespace_init_below(nspawn)
            for pid in (leader, nspawn):  # killing a PID namespace's init ends it all
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        _remove_run(workdir)


def _is_nspawn_of(pid: int, machine: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"--machine={machine}".encode() in argv


def _namespace_init_below(ancestor: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        nspid = fields.get("NSpid", "").split()
        if len(nspid) < 2 or nspid[-1] != "1":
            continue
        if _descends_from(int(entry.name), ancestor):
            return int(entry.name)
    return None


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        # The command name may contain spaces and parentheses: the ppid follows the last ")".
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False
