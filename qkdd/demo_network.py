"""``qkdd demo --sites N``: N site daemons joined by emulated QKD links in a line (or a
ring), as real subprocesses; the two end sites have no link of their own and get keys
relayed through the others (docs/protocol.md §10–§12). An application at each end asks
for the same keys through ETSI GS QKD 014, and each site shows its view of the network:
its links, its routes, the transfers it started, relayed or received.

Sites are ``site-1`` … ``site-N`` with SAEs ``sae-1`` … ``sae-N``; the link between sites i
and j is one emulator process whose ends are ``qkd-i-j.tty`` (site i's) and ``qkd-j-i.tty``.
The emulators hand out random keys at a fixed rate (``--physics random``): the demo is
about the network, and N BB84 simulations would share this machine's cores with N daemons.
``running_network`` is also what the network tests and ``bench/bench_relay.py`` start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdd.client import BlockingKeyClient, ClientError
from qkdd.constants import DEMO_STARTUP_TIMEOUT
from qkdd.crypto.select import select_backend
from qkdd.demo import (
    PYTHON_MODULE,
    DemoError,
    RunningSite,
    _free_port,
    _wait_for_line,
    exchange_keys,
    stop_processes,
    wait_for_keys,
)
from qkdd.demo_sites import DemoSite
from qkdd.identity import public_key_text, write_identity, write_key_encryption_key

TOPOLOGIES = ("line", "ring")
# Each emulated link's key rate (256-bit keys per second): enough for the demo's relay pads
# and keys within seconds, light enough for N links and N daemons on two cores.
LINK_KEY_RATE = 4000
# Relay pads each site keeps per direction of each link ([relay] pad_bytes).
RELAY_PAD_BYTES = 65536
# Keys kept ready per SAE pair: between the end sites; a relay site has no applications.
END_POOL_SIZE = 64
# How long the demo waits for the first relayed keys (several handshakes and transfers).
NETWORK_STARTUP_TIMEOUT = 4 * DEMO_STARTUP_TIMEOUT


@dataclass(frozen=True)
class NetworkPlan:
    """Which sites, which links, which two sites get relayed keys."""

    count: int
    topology: str = "line"

    def __post_init__(self) -> None:
        if not 3 <= self.count <= 8:
            raise ValueError("a demo network has 3 to 8 sites")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology is one of {', '.join(TOPOLOGIES)}")

    @property
    def site_ids(self) -> list[str]:
        return [site_id(i) for i in range(1, self.count + 1)]

    @property
    def links(self) -> list[tuple[int, int]]:
        pairs = [(i, i + 1) for i in range(1, self.count)]
        if self.topology == "ring":
            pairs.append((1, self.count))
        return pairs

    @property
    def ends(self) -> tuple[int, int]:
        """The two sites that get relayed keys: the line's ends, or opposite on the ring
        (two paths of (nearly) equal length between them)."""
        return (1, self.count) if self.topology == "line" else (1, self.count // 2 + 1)

    def neighbours(self, index: int) -> list[int]:
        return sorted(
            {j for i, j in self.links if i == index} | {i for i, j in self.links if j == index}
        )


def site_id(index: int) -> str:
    return f"site-{index}"


def sae_id(index: int) -> str:
    return f"sae-{index}"


def device_link(index: int, other: int) -> str:
    return f"qkd-{index}-{other}.tty"


def render_site(plan: NetworkPlan, index: int, ports: dict[int, int]) -> str:
    """One site's config: its neighbours as [[peers]], the far end as a [[remote]]."""
    me = site_id(index)
    first, last = plan.ends
    far = last if index == first else first if index == last else None
    talks_to = f'["{sae_id(far)}"]' if far else "[]"
    lines = [
        f"# qkdd demo network site {me}: rendered by qkdd.demo_network ({plan.topology} of "
        f"{plan.count}).",
        f'site_id = "{me}"',
        f'listen = "127.0.0.1:{ports[index]}"',
        f'state_directory = "{me}/state"',
        'pqc_backend = "auto"',
        "",
        "[identity]",
        f'private_key = "{me}/identity.key"',
        "",
        "[store]",
        f'key_encryption_key = "{me}/kek.bin"',
        "key_lifetime = 3600",
        "",
        "[api]",
        f'socket = "{me}/api.sock"',
        "socket_mode = 0o600",
        "key_size = 256",
        "max_keys_per_request = 64",
        "",
        "[[consumers]]",
        f'sae_id = "{sae_id(index)}"',
        f"talks_to = {talks_to}",
        "",
        "# Relay pads kept per direction of each link: they seal relayed QKD material.",
        "[relay]",
        f"pad_bytes = {RELAY_PAD_BYTES}",
    ]
    for other in plan.neighbours(index):
        lines += [
            "",
            "[[peers]]",
            f'site_id = "{site_id(other)}"',
            f'address = "127.0.0.1:{ports[other]}"',
            f'public_key_file = "{site_id(other)}/identity.pub"',
            f'remote_sae_ids = ["{sae_id(other)}"]',
            "pool_size = 8",
            "",
            "[peers.device]",
            'kind = "serial"',
            f'path = "{device_link(index, other)}"',
            "baudrate = 115200",
        ]
    if far is not None:
        lines += [
            "",
            "# No QKD link of our own: keys relayed through the sites between, hybrid with an",
            "# ML-KEM exchange end to end (relays never learn them).",
            "[[remote]]",
            f'site_id = "{site_id(far)}"',
            f'public_key_file = "{site_id(far)}/identity.pub"',
            f'remote_sae_ids = ["{sae_id(far)}"]',
            f"pool_size = {END_POOL_SIZE}",
        ]
    return "\n".join(lines) + "\n"


def prepare_network(directory: Path, plan: NetworkPlan) -> dict[str, Path]:
    """Identities, key-encryption keys and configs of every site; each site's config file."""
    backend = select_backend("auto")
    ports = {i: _free_port() for i in range(1, plan.count + 1)}
    configs = {}
    for i in range(1, plan.count + 1):
        me = site_id(i)
        key = write_identity(directory / me / "identity.key", backend)
        (directory / me / "identity.pub").write_text(public_key_text(key) + "\n")
        write_key_encryption_key(directory / me / "kek.bin")
    for i in range(1, plan.count + 1):
        config = directory / f"{site_id(i)}.toml"
        config.write_text(render_site(plan, i, ports))
        configs[site_id(i)] = config
    return configs


def start_link(
    directory: Path, a: int, b: int, link_key_rate: int = LINK_KEY_RATE
) -> subprocess.Popen[bytes]:
    """The emulated QKD link between sites a and b (``link_key_rate`` keys/s), ready once
    this returns."""
    with open(directory / f"link-{a}-{b}.log", "wb") as link_log:
        emulator = subprocess.Popen(
            [
                *PYTHON_MODULE,
                "qkdd_drivers.emulator.command",
                "pty",
                *("--link-a", str(directory / device_link(a, b))),
                *("--link-b", str(directory / device_link(b, a))),
                *("--site-a", site_id(a), "--site-b", site_id(b)),
                *("--physics", "random", "--rate", str(link_key_rate)),
            ],
            stdout=subprocess.PIPE,
            stderr=link_log,
        )
    try:
        _wait_for_line(emulator, DEMO_STARTUP_TIMEOUT, f"the QKD link {a}-{b}")
    except DemoError:
        emulator.kill()
        emulator.wait()
        raise
    return emulator


@dataclass
class RunningNetwork:
    plan: NetworkPlan
    directory: Path
    sites: dict[str, RunningSite] = field(default_factory=dict)
    links: dict[tuple[int, int], subprocess.Popen[bytes]] = field(default_factory=dict)

    def end_sites(self) -> tuple[RunningSite, RunningSite]:
        first, last = self.plan.ends
        return self.sites[site_id(first)], self.sites[site_id(last)]

    def status(self, index: int) -> dict[str, Any]:
        with BlockingKeyClient(str(self.sites[site_id(index)].socket_path)) as client:
            return client.site_status()


@contextlib.contextmanager
def running_network(
    directory: Path,
    plan: NetworkPlan,
    *,
    tamper: Callable[[Path], object] | None = None,
    programs: Mapping[str, tuple[str, ...]] | None = None,
    link_key_rate: int = LINK_KEY_RATE,
) -> Iterator[RunningNetwork]:
    """Start every link's emulator and every site's daemon; stop them all on exit.

    ``tamper(directory)`` runs once the files are written, before anything starts (tests
    rewrite addresses with it); ``programs`` runs a site's daemon with another command
    than ``python -m qkdd`` (a test's instrumented relay); ``link_key_rate`` is each link's
    keys/s (a bench sets it)."""
    configs = prepare_network(directory, plan)
    if tamper is not None:
        tamper(directory)
    network = RunningNetwork(plan, directory)
    try:
        for a, b in plan.links:
            network.links[(a, b)] = start_link(directory, a, b, link_key_rate)
        for i in range(1, plan.count + 1):
            site = DemoSite(site_id(i), sae_id(i), "")
            program = (programs or {}).get(site.site_id)
            network.sites[site.site_id] = RunningSite.start(site, configs[site.site_id], program)
        yield network
    finally:
        stop_processes([s.process for s in network.sites.values()])
        stop_processes(list(network.links.values()))


def wait_for_relayed_keys(network: RunningNetwork, number: int, timeout: float) -> None:
    """Until the first end site holds ``number`` keys for the other end's SAE."""
    first, last = network.plan.ends
    wait_for_keys(
        network.sites[site_id(first)],
        sae_id(last),
        number,
        timeout,
        also_running=list(network.sites.values()),
    )


def exchange_relayed_keys(network: RunningNetwork, number: int) -> list[dict[str, Any]]:
    """App at one end: enc_keys for the other end's SAE; app there: dec_keys by ID."""
    first, last = network.plan.ends
    return exchange_keys(
        network.sites[site_id(first)],
        network.sites[site_id(last)],
        number,
        saes=(sae_id(first), sae_id(last)),
        columns=("first", "last"),
    )


def network_views(network: RunningNetwork) -> dict[str, dict[str, Any]]:
    """Each site's ``network`` status: links up, routes, transfers by role."""
    return {
        site_id(i): dict(network.status(i).get("network", {}))
        for i in range(1, network.plan.count + 1)
    }


def run_network_demo(sites: int, topology: str, number: int = 8, as_json: bool = False) -> int:
    try:
        plan = NetworkPlan(sites, topology)
    except ValueError as exc:
        print(f"qkdd demo: {exc}", file=sys.stderr)
        return 2
    if not 1 <= number <= END_POOL_SIZE:
        print(f"qkdd demo: --keys must be from 1 to {END_POOL_SIZE}", file=sys.stderr)
        return 2
    started = time.monotonic()
    directory = Path(
        tempfile.mkdtemp(prefix="qkdd-net-", dir="/tmp" if os.path.isdir("/tmp") else None)
    )
    try:
        with running_network(directory, plan) as network:
            wait_for_relayed_keys(network, number, NETWORK_STARTUP_TIMEOUT)
            ready = time.monotonic() - started
            rows = exchange_relayed_keys(network, number)
            views = network_views(network)
        ok = bool(rows) and all(row["match"] for row in rows)
        if as_json:
            print(json.dumps({"keys": rows, "sites": views, "all_match": ok, "ready_s": ready}))
        else:
            _print_network(plan, rows, views, ready, ok)
        return 0 if ok else 1
    except (DemoError, ClientError) as exc:
        print(f"qkdd demo: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _print_network(
    plan: NetworkPlan,
    rows: list[dict[str, Any]],
    views: dict[str, dict[str, Any]],
    ready: float,
    ok: bool,
) -> None:
    first, last = (site_id(i) for i in plan.ends)
    print(
        f"{plan.topology} of {plan.count} sites; {first} and {last} have no QKD link of their "
        "own: their keys are relayed"
    )
    print(f"{'key_ID':36}  {first:16}  {last:16}  match")
    for row in rows:
        print(
            f"{row['key_ID']:36}  {row['first_fingerprint']:16}  "
            f"{row['last_fingerprint'] or '-':16}  {'yes' if row['match'] else 'NO'}"
        )
    print(f"{sum(r['match'] for r in rows)}/{len(rows)} keys match; ready after {ready:.1f} s")
    print()
    print(
        f"{'site':8} {'links up':22} {'path to the far end':32} {'started':>7} {'relayed':>7} "
        f"{'received':>8} {'abandoned':>9}"
    )
    for name, view in views.items():
        far = last if name == first else first if name == last else None
        path = view.get("routes", {}).get(far) if far else None
        shown = "-".join(path) if path else "-" if far else "(relays only)"
        print(
            f"{name:8} {','.join(view.get('links_up', [])):22} "
            f"{shown:32} {view.get('transfers_started', 0):>7} "
            f"{view.get('transfers_relayed', 0):>7} {view.get('transfers_delivered', 0):>8} "
            f"{view.get('transfers_abandoned', 0):>9}"
        )
    print(
        "a relay site sees the relayed QKD material, never the keys: they are derived with an "
        "ML-KEM secret the end sites exchanged end to end"
    )
    if not ok:
        print("MISMATCH: the end sites do not hold the same keys", file=sys.stderr)
