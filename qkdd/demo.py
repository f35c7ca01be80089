"""``qkdd demo``: an emulated QKD link and two site daemons as real subprocesses on this
machine, then two local applications asking for the same keys through ETSI GS QKD 014.

Everything lives in a fresh temporary directory that is removed at the end; every child
process is stopped (SIGTERM, then SIGKILL after a grace period) whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdd.client import BlockingKeyClient, ClientError
from qkdd.constants import DEMO_STARTUP_TIMEOUT, DEMO_STOP_GRACE
from qkdd.crypto.select import select_backend
from qkdd.demo_sites import SITE_A, SITE_B, SITES, DemoSite, render
from qkdd.errors import QkddError
from qkdd.identity import public_key_text, write_identity, write_key_encryption_key

# The daemons and the emulator run from this interpreter's installed packages; -P keeps
# the working directory off sys.path, so a folder named ``qkdd`` there cannot shadow them.
PYTHON_MODULE = (sys.executable, "-P", "-m")


class DemoError(QkddError):
    """A demo site or the emulator did not start or stop as it should."""


@dataclass
class RunningSite:
    site: DemoSite
    config_file: Path
    socket_path: Path
    log_file: Path
    process: subprocess.Popen[bytes]
    # What runs the daemon: ``qkdd`` from this interpreter (tests may run it otherwise).
    program: tuple[str, ...] = (*PYTHON_MODULE, "qkdd")

    @classmethod
    def start(
        cls, site: DemoSite, config_file: Path, program: tuple[str, ...] | None = None
    ) -> RunningSite:
        directory = config_file.parent
        running = cls(
            site,
            config_file,
            directory / site.directory / "api.sock",
            directory / f"{site.site_id}.log",
            None,  # type: ignore[arg-type]
            program or (*PYTHON_MODULE, "qkdd"),
        )
        running.spawn()
        return running

    def spawn(self) -> None:
        """Start the daemon; its log is appended to (it survives restarts)."""
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [*self.program, "run", "--config", str(self.config_file)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def restart(self, *, kill: bool = False) -> None:
        """Stop the daemon (SIGTERM, or SIGKILL with ``kill``) and start it again."""
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.process.wait(timeout=DEMO_STOP_GRACE * 4)
        self.spawn()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fingerprint(material: bytes) -> str:
    """A short fingerprint safe to print: SHA-256 of the key, first 8 bytes in hex."""
    return hashlib.sha256(material).hexdigest()[:16]


def prepare_directory(directory: Path) -> dict[str, Path]:
    """Write identities and configs for both sites; return each site's config file."""
    backend = select_backend("auto")
    ports = {site.site_id: _free_port() for site in SITES}
    configs = {}
    for site in SITES:
        key = write_identity(directory / site.directory / "identity.key", backend)
        (directory / site.directory / "identity.pub").write_text(public_key_text(key) + "\n")
        write_key_encryption_key(directory / site.directory / "kek.bin")
    for site in SITES:
        config = directory / f"{site.site_id}.toml"
        config.write_text(render(site, ports))
        configs[site.site_id] = config
    return configs


def _wait_for_line(process: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise DemoError(f"{what} did not start within {timeout:.0f} s")
    line = process.stdout.readline().decode().strip()
    if not line:
        raise DemoError(f"{what} exited during start-up (status {process.wait()})")
    return line


def start_emulator(directory: Path) -> subprocess.Popen[bytes]:
    """The emulated QKD link of the demo sites, ready once this returns."""
    with open(directory / "emulator.log", "wb") as emulator_log:
        emulator = subprocess.Popen(
            [
                *PYTHON_MODULE,
                "qkdd_drivers.emulator.command",
                "pty",
                "--link-a",
                str(directory / SITE_A.device_link),
                "--link-b",
                str(directory / SITE_B.device_link),
                # Each end tells its daemon whose it is: a daemon at the wrong end refuses it.
                *("--site-a", SITE_A.site_id, "--site-b", SITE_B.site_id),
                # A simulated 10 km BB84 link (the defaults), computed in smaller blocks for
                # a quick first key.
                *("--block-detections", "200000"),
            ],
            stdout=subprocess.PIPE,
            stderr=emulator_log,
        )
    try:
        _wait_for_line(emulator, DEMO_STARTUP_TIMEOUT, "the QKD link emulator")
    except DemoError:
        emulator.kill()
        emulator.wait()
        raise
    return emulator


@contextlib.contextmanager
def running_demo(
    directory: Path,
    tamper: Callable[[Path], object] | None = None,
    *,
    b_first: bool = False,
    gap: float = 0.0,
) -> Iterator[list[RunningSite]]:
    """Start the emulator and both daemons in ``directory``; stop them on exit. The sites
    are yielded as [A, B] whatever order they were started in.

    ``tamper(directory)`` runs after the files are written and before anything starts
    (tests use it to break a site's config); ``b_first`` and ``gap`` (seconds between the
    two starts) let tests start the sites in either order."""
    configs = prepare_directory(directory)
    if tamper is not None:
        tamper(directory)
    emulator: subprocess.Popen[bytes] | None = None
    sites: list[RunningSite] = []
    try:
        emulator = start_emulator(directory)
        for index, site in enumerate(reversed(SITES) if b_first else SITES):
            if index:
                time.sleep(gap)
            sites.append(RunningSite.start(site, configs[site.site_id]))
        sites.sort(key=lambda running: running.site.site_id)
        yield sites
    finally:
        # The sites' current processes (a test may have restarted them), then the link.
        stop_processes([s.process for s in sites] + ([emulator] if emulator else []))


def stop_processes(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stops ``processes`` with SIGTERM, all within one grace period, then SIGKILL."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + DEMO_STOP_GRACE
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_keys(
    site: RunningSite,
    slave_sae_id: str,
    number: int,
    timeout: float,
    *,
    also_running: Sequence[RunningSite] = (),
) -> None:
    """Poll the master site's status until ``number`` keys are ready for the pair; a
    DemoError if it (or a site in ``also_running``) exits first, or on timeout."""
    deadline = time.monotonic() + timeout
    last = "the daemon's API socket did not appear"
    while time.monotonic() < deadline:
        for running in (site, *also_running):
            if running.process.poll() is not None:
                raise DemoError(
                    f"{running.site.site_id} daemon exited with status "
                    f"{running.process.returncode}; see {running.log_file}:\n"
                    f"{_tail(running.log_file)}"
                )
        if site.socket_path.exists():
            try:
                with BlockingKeyClient(str(site.socket_path)) as client:
                    count = int(client.status(slave_sae_id)["stored_key_count"])
                if count >= number:
                    return
                last = f"{count} of {number} keys ready"
            except ClientError as exc:
                last = str(exc)
        time.sleep(0.1)
    raise DemoError(
        f"no keys at {site.site.site_id} within {timeout:.0f} s ({last}); "
        f"log:\n{_tail(site.log_file)}"
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def exchange_keys(
    site_a: RunningSite,
    site_b: RunningSite,
    number: int,
    *,
    saes: tuple[str, str] = (SITE_A.sae_id, SITE_B.sae_id),
    columns: tuple[str, str] = ("site_a", "site_b"),
) -> list[dict[str, Any]]:
    """App at A (SAE ``saes[0]``): enc_keys for ``saes[1]``; app at B: dec_keys by ID.
    Compare what each got; each row names the two fingerprints after ``columns``."""
    with BlockingKeyClient(str(site_a.socket_path)) as app_a:
        keys_a = app_a.enc_keys(saes[1], number=number)
    with BlockingKeyClient(str(site_b.socket_path)) as app_b:
        keys_b = {k.key_id: k for k in app_b.dec_keys(saes[0], [k.key_id for k in keys_a])}
    rows = []
    for key in keys_a:
        other = keys_b.get(key.key_id)
        rows.append(
            {
                "key_ID": key.key_id,
                f"{columns[0]}_fingerprint": fingerprint(key.material),
                f"{columns[1]}_fingerprint": fingerprint(other.material) if other else None,
                "match": other is not None and other.material == key.material,
            }
        )
    return rows


def describe(sites: list[RunningSite]) -> dict[str, Any]:
    out = {}
    for running in sites:
        peer = SITE_B if running.site is SITE_A else SITE_A
        out[running.site.site_id] = {
            "site_id": running.site.site_id,
            "config_file": str(running.config_file),
            "api_socket": str(running.socket_path),
            # The local SAE is master toward the peer's SAE, and slave for keys it sends.
            "master_SAE_ID": running.site.sae_id,
            "slave_SAE_ID": peer.sae_id,
        }
    return {"sites": out}


def run_demo(number: int = 8, as_json: bool = False, serve: bool = False) -> int:
    if not 1 <= number <= 128:
        print("qkdd demo: --keys must be from 1 to 128", file=sys.stderr)
        return 2
    started = time.monotonic()
    # A short base path: Unix socket paths are limited to 107 bytes.
    directory = Path(
        tempfile.mkdtemp(prefix="qkdd-demo-", dir="/tmp" if os.path.isdir("/tmp") else None)
    )
    try:
        with running_demo(directory) as sites:
            site_a, site_b = sites
            wait_for_keys(site_a, SITE_B.sae_id, number, DEMO_STARTUP_TIMEOUT)
            ready_at = time.monotonic()
            if serve:
                return _serve(sites, as_json)
            rows = exchange_keys(site_a, site_b, number)
            done = time.monotonic()
        stopped = time.monotonic()
        timings = {
            "start_to_keys_ready_s": round(ready_at - started, 3),
            "exchange_s": round(done - ready_at, 3),
            "shutdown_s": round(stopped - done, 3),
            "total_s": round(stopped - started, 3),
        }
        ok = bool(rows) and all(row["match"] for row in rows)
        if as_json:
            print(json.dumps({"keys": rows, "timings": timings, "all_match": ok}))
        else:
            _print_table(rows, timings, ok)
        return 0 if ok else 1
    except (DemoError, ClientError) as exc:
        print(f"qkdd demo: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _serve(sites: list[RunningSite], as_json: bool) -> int:
    description = describe(sites)
    if as_json:
        print(json.dumps(description), flush=True)
    else:
        for site in description["sites"].values():
            print(
                f"{site['site_id']}: socket {site['api_socket']}  "
                f"master SAE {site['master_SAE_ID']}"
                f"  slave SAE {site['slave_SAE_ID']}  config {site['config_file']}"
            )
        first = description["sites"][SITE_A.site_id]
        print(f"try: qkdctl --socket {first['api_socket']} enc-keys {SITE_B.sae_id} --number 2")
        print("press Ctrl-C to stop", flush=True)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop:
        for site in sites:
            if site.process.poll() is not None:
                print(
                    f"qkdd demo: {site.site.site_id} daemon exited; "
                    f"see its log:\n{_tail(site.log_file)}",
                    file=sys.stderr,
                )
                return 1
        time.sleep(0.2)
    return 0


def _print_table(rows: list[dict[str, Any]], timings: dict[str, float], ok: bool) -> None:
    print(f"{'key_ID':36}  {'site A':16}  {'site B':16}  match")
    for row in rows:
        print(
            f"{row['key_ID']:36}  {row['site_a_fingerprint']:16}  "
            f"{row['site_b_fingerprint'] or '-':16}  {'yes' if row['match'] else 'NO'}"
        )
    print(
        f"{sum(r['match'] for r in rows)}/{len(rows)} keys match; keys ready after "
        f"{timings['start_to_keys_ready_s']:.2f} s, total {timings['total_s']:.2f} s"
    )
    if not ok:
        print("MISMATCH: the two sites do not hold the same keys", file=sys.stderr)
