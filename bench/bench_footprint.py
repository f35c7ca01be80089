"""Footprint of an idle site daemon against how many keys its store holds: time from start
to READY, resident memory, and CPU use while idle.

One site of ``qkdd demo`` (``qkdd.demo.prepare_directory``: identity, KEK, config) runs
alone: its peer never starts and its QKD device's path does not exist, so the link stays
down and nothing comes in; the daemon only serves its API and retries the link. Before it
starts, its store is filled with either N ready hybrid keys of one SAE pair (blocks of
BATCH_KEYS as agreement makes them: ``add_batch`` + ``commit_batch``) or N buffered QKD
keys (``store_qkd_keys``), and the config says so (``pool_size`` or ``qkd_buffer_keys``
of N). Each run starts the daemon on a fresh copy of that filled store (warm in the page
cache, as after a restart), with NOTIFY_SOCKET pointing at a datagram socket bound here:

- start -> READY: from spawning the process to the READY=1 datagram (what systemd waits
  for; the daemon sends it once its API socket answers);
- RSS at READY and after the idle span (VmRSS of /proc/<pid>/status), and the peak
  (VmHWM);
- idle CPU: utime + stime (/proc/<pid>/stat) used over the idle span after READY, as a
  share of one core.

The same with 1,000 keys gives the ratio (what holding N keys costs). Targets at N = 1M:
RSS <= 100 MB, start -> READY <= 1 s, idle CPU < 2 % of a core. The floor line is the
interpreter alone importing the daemon's modules; a note names the daemon's modules that
have no up-to-date bytecode cache (every start then compiles them). ``--profile`` runs the
daemon with N keys once more under cProfile (CPU time), once for start-up (until READY,
by stage) and once for the idle span (from READY to its stop), breaks its RSS at READY
down by mapping (/proc/<pid>/smaps), and gives the import time by package.

    python bench/bench_footprint.py            # 1,000,000 keys, median of 3 runs, 10 s idle
    python bench/bench_footprint.py --quick    # 20,000 keys, 1 run, 2 s idle
    python bench/bench_footprint.py [--keys N] [--runs R] [--idle S] [--profile]
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peer_daemons import cpu_seconds, fill_qkd_keys, load_average, md_header, md_row

from qkdd.config import load_config
from qkdd.daemon import STORE_FILE
from qkdd.demo import PYTHON_MODULE, prepare_directory
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.identity import read_key_encryption_key
from qkdd.key_ids import uuid_prefix
from qkdd.keystore import KeyStore, NewKeyBlock
from qkdd.peer.agreement import BATCH_KEYS

FULL_KEYS = 1_000_000
QUICK_KEYS = 20_000
SMALL_KEYS = 1_000
KEY_BITS = 256
READY_TIMEOUT = 300.0  # only catches a daemon that never becomes ready
STOP_TIMEOUT = 30.0
TARGET_RSS_MB = 100.0
TARGET_READY_S = 1.0
TARGET_IDLE_CPU = 2.0  # % of one core
# What the store holds: a label, and the config line that makes room for N of them.
VARIANTS = {
    "ready": ("ready hybrid keys", "pool_size = {n}"),
    "qkd": ("buffered QKD keys", "pool_size = 64\nqkd_buffer_keys = {n}"),
}

# Runs ``qkdd`` (argv[3:]) under cProfile (CPU time): with "startup" from the start until
# READY=1 is sent, with "idle" from READY until the daemon exits; the stats go to argv[2].
_PROFILED_QKDD = """\
import cProfile, runpy, sys, time
from qkdd import systemd
mode, out = sys.argv[1], sys.argv[2]
sys.argv = ["qkdd", *sys.argv[3:]]
profiler = cProfile.Profile(time.process_time)
ready = systemd.Notifier.ready
def on_ready(self, *args, **kwargs):
    if mode == "startup":
        profiler.disable()
        profiler.dump_stats(out)
    sent = ready(self, *args, **kwargs)
    if mode == "idle":
        profiler.enable()
    return sent
systemd.Notifier.ready = on_ready
if mode == "startup":
    profiler.enable()
try:
    runpy.run_module("qkdd", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    if mode == "idle":
        profiler.disable()
        profiler.dump_stats(out)
"""


@dataclass(frozen=True)
class Measurement:
    ready_s: float  # spawn -> READY=1
    rss_ready_mb: float
    rss_idle_mb: float  # after the idle span
    peak_mb: float  # VmHWM after the idle span
    idle_cpu: float  # % of one core over the idle span


def proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def fill_ready(store: KeyStore, count: int) -> None:
    """``count`` ready keys of A's pair, in committed batches of up to BATCH_KEYS keys."""
    batch = store.next_batch_id(SITE_B.site_id)
    for start in range(0, count, BATCH_KEYS):
        n = min(BATCH_KEYS, count - start)
        block = NewKeyBlock(
            uuid_prefix(os.urandom(12)),
            SITE_A.sae_id,
            SITE_B.sae_id,
            KEY_BITS,
            n,
            os.urandom(n * KEY_BITS // 8),
        )
        store.add_batch(SITE_B.site_id, batch, [block], [])
        store.commit_batch(SITE_B.site_id, batch)
        batch += 1


def fill_qkd(store: KeyStore, count: int) -> None:
    fill_qkd_keys([(store, SITE_B.site_id)], count)


class Site:
    """Site A's files prepared once; a filled store per (variant, keys) kept as a template."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = prepare_directory(directory)[SITE_A.site_id]
        self.original = self.config.read_text()
        loaded = load_config(self.config)
        self.store = loaded.state_directory / STORE_FILE
        self.kek = read_key_encryption_key(loaded.key_encryption_key)
        self.templates: dict[tuple[str, int], Path] = {}

    def template(self, variant: str, keys: int) -> Path:
        """The filled store (made on first use); its size on disk is the store's."""
        path = self.templates.get((variant, keys))
        if path is None:
            path = self.directory / f"{variant}-{keys}.sqlite3"
            store = KeyStore(path, self.kek)
            try:
                (fill_ready if variant == "ready" else fill_qkd)(store, keys)
                held = (
                    store.ready_count(SITE_A.sae_id, SITE_B.sae_id)
                    if variant == "ready"
                    else store.qkd_key_count(SITE_B.site_id)
                )
            finally:
                store.close()  # checkpoints the WAL into the file
            if held != keys:
                raise RuntimeError(f"the {variant} store holds {held} keys, not {keys}")
            self.templates[(variant, keys)] = path
        return path

    def configure(self, variant: str, keys: int) -> None:
        line = VARIANTS[variant][1].format(n=max(64, keys))
        text = self.original.replace("pool_size = 64", line)
        if text.count(line) != 1:
            raise RuntimeError(f"the demo config {self.config} changed: cannot set {line!r}")
        self.config.write_text(text)

    def install(self, variant: str, keys: int) -> None:
        """A fresh copy of the filled store where the daemon keeps its store."""
        self.configure(variant, keys)
        state = self.store.parent
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(mode=0o700, parents=True)
        shutil.copyfile(self.template(variant, keys), self.store)


@contextmanager
def notify_socket(directory: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notification socket."""
    path = str(directory / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)


def wait_for_ready(sock: socket.socket, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no READY=1 within {READY_TIMEOUT:g} s")
        sock.settimeout(min(left, 0.5))
        try:
            message = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            if daemon.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"the daemon exited before READY:\n{tail}") from None
            continue
        if "READY=1" in message.split("\n"):
            return


def run_daemon(
    site: Site,
    idle: float,
    prefix: tuple[str, ...] = (),
    at_ready: Callable[[int], None] | None = None,
) -> Measurement:
    """Start the daemon on the installed store, measure, stop it (SIGTERM)."""
    log = site.directory / "site-a.log"
    with notify_socket(site.directory) as (sock, path), open(log, "ab") as handle:
        started = time.monotonic()
        daemon = subprocess.Popen(
            [*(prefix or (*PYTHON_MODULE, "qkdd")), "run", "--config", str(site.config)],
            env={**os.environ, "NOTIFY_SOCKET": path},
            stdout=subprocess.DEVNULL,
            stderr=handle,
        )
        try:
            wait_for_ready(sock, daemon, log)
            ready_s = time.monotonic() - started
            rss_ready = proc_status_mb(daemon.pid, "VmRSS")
            if at_ready is not None:
                at_ready(daemon.pid)
            cpu_before, idle_from = cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(idle)
            cpu = cpu_seconds(daemon.pid) - cpu_before
            span = time.monotonic() - idle_from
            rss_idle = proc_status_mb(daemon.pid, "VmRSS")
            peak = proc_status_mb(daemon.pid, "VmHWM")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                status = daemon.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
                raise RuntimeError("the daemon did not stop on SIGTERM") from None
        if status != 0:
            raise RuntimeError(f"the daemon stopped with status {status}; see {log}")
    return Measurement(ready_s, rss_ready, rss_idle, peak, cpu / span * 100)


def floor() -> tuple[float, float]:
    """(seconds, peak RSS MB) of the interpreter importing the daemon's modules."""
    # VmHWM, not ru_maxrss: Linux carries the parent's peak across fork and exec into it.
    code = (
        "import qkdd.cli, qkdd.daemon; "
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    )
    return time.monotonic() - started, int(done.stdout) / 1024


# Prints the modules that ``import qkdd.cli, qkdd.daemon`` (what the daemon imports at
# start-up) loads whose bytecode cache is missing or older than the source.
_UNCACHED = """\
import os, sys, qkdd.cli, qkdd.daemon
for name, module in sorted(sys.modules.items()):
    spec, source = getattr(module, "__spec__", None), getattr(module, "__file__", None)
    if spec is None or not spec.cached or not source or not source.endswith(".py"):
        continue
    try:
        with open(spec.cached, "rb") as pyc:
            header = pyc.read(16)
    except OSError:
        header = b""
    checked_by_hash = header[4:8] != bytes(4)
    if len(header) < 16 or not checked_by_hash and (
        int.from_bytes(header[8:12], "little") != int(os.stat(source).st_mtime)
    ):
        print(name)
"""


def uncached_modules() -> list[str]:
    """The daemon's modules whose bytecode cache is missing or stale: each daemon start
    compiles them from source (e.g. with PYTHONDONTWRITEBYTECODE set when they were last
    changed), which a start-up time then includes."""
    done = subprocess.run(
        [sys.executable, "-P", "-c", _UNCACHED], capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def median_of(results: list[Measurement]) -> Measurement:
    """Each figure's median over the runs."""
    return Measurement(
        *(
            statistics.median(getattr(r, name) for r in results)
            for name in Measurement.__dataclass_fields__
        )
    )


def print_table(
    figures: dict[tuple[str, int], Measurement], sizes: dict[tuple[str, int], float], keys: int
) -> None:
    print(
        md_header(
            "store holds",
            "keys",
            "store MB",
            "start -> READY s",
            "RSS at READY MB",
            "RSS after idle MB",
            "peak RSS MB",
            "idle CPU % of a core",
        )
    )
    for variant, (label, _) in VARIANTS.items():
        small, big = figures[(variant, SMALL_KEYS)], figures[(variant, keys)]
        for count, m in ((SMALL_KEYS, small), (keys, big)):
            print(
                md_row(
                    label,
                    f"{count:,}",
                    f"{sizes[(variant, count)]:.1f}",
                    f"{m.ready_s:.3f}",
                    f"{m.rss_ready_mb:.1f}",
                    f"{m.rss_idle_mb:.1f}",
                    f"{m.peak_mb:.1f}",
                    f"{m.idle_cpu:.2f}",
                )
            )

        def ratio(a: float, b: float) -> str:
            return f"{b / a:.2f}x" if a > 0 else "-"

        print(
            md_row(
                label,
                f"ratio {keys:,} / {SMALL_KEYS:,}",
                ratio(sizes[(variant, SMALL_KEYS)], sizes[(variant, keys)]),
                ratio(small.ready_s, big.ready_s),
                ratio(small.rss_ready_mb, big.rss_ready_mb),
                ratio(small.rss_idle_mb, big.rss_idle_mb),
                ratio(small.peak_mb, big.peak_mb),
                ratio(small.idle_cpu, big.idle_cpu),
            )
        )


def verdicts(figures: dict[tuple[str, int], Measurement], keys: int) -> list[str]:
    out = []
    for variant, (label, _) in VARIANTS.items():
        m = figures[(variant, keys)]
        rss = max(m.rss_ready_mb, m.rss_idle_mb, m.peak_mb)
        checks = (
            (f"RSS <= {TARGET_RSS_MB:g} MB", rss <= TARGET_RSS_MB, f"peak {rss:.1f} MB"),
            (
                f"start -> READY <= {TARGET_READY_S:g} s",
                m.ready_s <= TARGET_READY_S,
                f"{m.ready_s:.3f} s",
            ),
            (
                f"idle CPU < {TARGET_IDLE_CPU:g} %",
                m.idle_cpu < TARGET_IDLE_CPU,
                f"{m.idle_cpu:.2f} %",
            ),
        )
        out.append(
            f"{label}, {keys:,}: "
            + "; ".join(f"{name}: {'met' if ok else 'MISSED'} ({got})" for name, ok, got in checks)
        )
    return out


# -- profiles -----------------------------------------------------------------------------


def smaps_breakdown(pid: int, top: int = 8) -> list[tuple[str, float]]:
    """Resident MB by mapping name (file, [heap], [anon] ...), largest first."""
    resident: dict[str, float] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            name = (
                Path(parts[5]).name
                if len(parts) > 5 and parts[5].startswith("/")
                else (parts[5] if len(parts) > 5 else "[anon]")
            )
        elif parts and parts[0] == "Rss:":
            resident[name] = resident.get(name, 0.0) + int(parts[1]) / 1024
    return sorted(resident.items(), key=lambda item: item[1], reverse=True)[:top]


def breakdown_into(found: list[tuple[str, float]]) -> Callable[[int], None]:
    def take(pid: int) -> None:
        found.extend(smaps_breakdown(pid))

    return take


# Start-up stages: the cumulative time of the function that does each (file, function).
# Stages nest (the daemon's run includes opening the store), so shares do not add up.
_STAGES = {
    "imports (module loading and module-level code)": (
        "<frozen importlib._bootstrap>",
        "_find_and_load",
    ),
    "qkdd run (config on)": ("cli.py", "_cmd_run"),
    "  crypto self-test": ("daemon.py", "_self_test"),
    "  load the identity": ("identity.py", "load_identity"),
    "  open the key store": ("keystore.py", "__init__"),
    "    count ready keys": ("key_blocks.py", "_count_ready_keys"),
    "    count buffered QKD keys": ("qkd_buffer.py", "_upgrade_qkd_buffer"),
}


def print_profile(path: Path, title: str, top: int = 12, *, stages: bool = False) -> None:
    """The ``top`` functions by cumulative time (import and runpy machinery left out),
    and with ``stages`` the cumulative time of each start-up stage."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = max((row[3] for row in entries.values()), default=0.0) or 1e-9
    print(f"\n{title} (cProfile, CPU time; {total:.3f} s in all)\n")
    if stages:
        print(md_header("stage", "s", "share", "calls"))
        for stage, (file, name) in _STAGES.items():
            found = [
                (calls, cumulative)
                for (path_, _, function), (_, calls, _, cumulative, _) in entries.items()
                if function == name and (path_ == file or Path(path_).name == file)
            ]
            spent = sum(t for _, t in found)
            print(md_row(stage, f"{spent:.3f}", f"{spent / total:.0%}", sum(c for c, _ in found)))
        print()
    print(md_header("cumulative s", "own s", "calls", "function"))
    rows = sorted(
        (
            item
            for item in entries.items()
            if not item[0][0].startswith("<frozen")
            and item[0][2] != "<built-in method builtins.exec>"
        ),
        key=lambda item: item[1][3],
        reverse=True,
    )
    for (file, line, function), (_, calls, own, cumulative, _) in rows[:top]:
        where = f" ({Path(file).name}:{line})" if line else ""
        print(md_row(f"{cumulative:.3f}", f"{own:.3f}", calls, f"`{function}`{where}"))


def import_times(top: int = 10) -> list[tuple[str, float]]:
    """Seconds spent importing each top-level package's own modules (their self time in
    ``python -X importtime``, whoever imported them) with the daemon's modules, largest
    first."""
    done = subprocess.run(
        [sys.executable, "-P", "-X", "importtime", "-c", "import qkdd.cli, qkdd.daemon"],
        capture_output=True,
        text=True,
        check=True,
    )
    spent: dict[str, float] = {}
    for line in done.stderr.splitlines():
        # "import time:  self [us] | cumulative | imported package"
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3:
            continue
        self_us = parts[0].strip()
        if not self_us.isdigit():
            continue
        package = parts[2].strip().split(".")[0]
        spent[package] = spent.get(package, 0.0) + int(self_us) / 1e6
    return sorted(spent.items(), key=lambda item: item[1], reverse=True)[:top]


def profile(site: Site, keys: int, idle: float) -> None:
    for variant, (label, _) in VARIANTS.items():
        site.install(variant, keys)
        breakdown: list[tuple[str, float]] = []
        out = site.directory / f"{variant}-startup.prof"
        wrapper = (sys.executable, "-P", "-c", _PROFILED_QKDD)
        run_daemon(site, 0.0, (*wrapper, "startup", str(out)), breakdown_into(breakdown))
        print(f"\nRSS at READY by mapping, {label}, {keys:,} (MB):\n")
        print(md_header("mapping", "resident MB"))
        for name, mb in breakdown:
            print(md_row(f"`{name}`", f"{mb:.1f}"))
        print_profile(out, f"Start-up until READY, {label}, {keys:,}", stages=True)
        site.install(variant, keys)
        out = site.directory / f"{variant}-idle.prof"
        run_daemon(site, idle, (*wrapper, "idle", str(out)))
        print_profile(out, f"Idle for {idle:g} s after READY, {label}, {keys:,}")
    print("\nImport time of the daemon's modules by package (-X importtime self time, s):\n")
    print(md_header("package", "s"))
    for package, seconds in import_times():
        print(md_row(f"`{package}`", f"{seconds:.3f}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_KEYS:,} keys, 1 run, 2 s idle"
    )
    parser.add_argument("--keys", type=int, help=f"keys held (default {FULL_KEYS:,})")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; quick 1)")
    parser.add_argument("--idle", type=float, help="idle span in s (default 10; quick 2)")
    parser.add_argument("--profile", action="store_true", help="also profile one run")
    parser.add_argument("--dir", help="where the stores live (default: /tmp)")
    args = parser.parse_args(argv)
    keys = args.keys or (QUICK_KEYS if args.quick else FULL_KEYS)
    runs = args.runs or (1 if args.quick else 3)
    idle = args.idle if args.idle is not None else (2.0 if args.quick else 10.0)
    if keys <= SMALL_KEYS or runs < 1 or idle <= 0:
        print(
            f"bench_footprint: --keys above {SMALL_KEYS:,}, --runs and --idle positive",
            file=sys.stderr,
        )
        return 2
    # A short base path: the API socket's path is limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="qkdd-fp-", dir=args.dir or "/tmp") as tmp:
        site = Site(Path(tmp))
        cases = [(variant, n) for variant in VARIANTS for n in (SMALL_KEYS, keys)]
        started = time.monotonic()
        sizes = {case: site.template(*case).stat().st_size / 1e6 for case in cases}
        print(f"stores filled in {time.monotonic() - started:.1f} s")
        results: dict[tuple[str, int], list[Measurement]] = {case: [] for case in cases}
        floors = []
        for _ in range(runs):  # interleaved, so a busy spell spreads over every case
            floors.append(floor())
            for case in cases:
                site.install(*case)
                results[case].append(run_daemon(site, idle))
        figures = {case: median_of(found) for case, found in results.items()}
        floor_s = statistics.median(s for s, _ in floors)
        floor_mb = statistics.median(mb for _, mb in floors)
        print(
            f"\nIdle site daemon (link down, no peer, no device), {KEY_BITS}-bit keys; "
            f"median of {runs} run(s) per figure, {idle:g} s idle; {load_average()}\n"
        )
        print_table(figures, sizes, keys)
        print(
            f"\nfloor: the interpreter importing the daemon's modules: {floor_s:.3f} s, "
            f"peak RSS {floor_mb:.1f} MB"
        )
        print("\n" + "\n".join(verdicts(figures, keys)))
        stale = uncached_modules()
        if stale:
            print(
                f"\nnote: {len(stale)} modules have no up-to-date bytecode cache, so every "
                f"start compiles them (PYTHONDONTWRITEBYTECODE?): {', '.join(stale[:8])}"
                + (" ..." if len(stale) > 8 else "")
            )
        if args.profile:
            profile(site, keys, idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
