"""Keys relayed between sites without a QKD link of their own: the key rate an application
gets end to end over 1, 2 and 3 relay sites against a direct link's, the QKD material each
hop spends per end-to-end key, and how long the network takes to route around a relay that
dies.

Every network is ``qkdd.demo_network.running_network``'s: one ``qkd-emulator pty --physics
random --rate R`` per link (``--link-rate``, 256-bit keys) and one daemon per site, all
subprocesses on this machine. The pools of the pairs measured hold ``--pool-size`` keys (at
both ends); the rest is the demo's config (relay pads, QKD buffers, 64 keys per request).

Each run, in this order (load drifts alike for all):

- a line of N sites (N = 3, 4, 5): site-1's consumer talks to its neighbour's SAE (sae-2)
  as well as to the far end's (sae-N). Once both pairs have keys, site-1's application
  takes keys for sae-2 over the direct link between them (the floor: the same network,
  the same link rate and emulator; the relayed pair meanwhile idle, its buffers full), then
  for sae-N, relayed through N-2 sites. Each pair: ``--warmup`` seconds taking keys, then
  ``--window`` seconds counted. The application takes every key ready (the pool's count
  from the Status call, at most one request's worth per enc_keys); the first key of each
  answer is fetched at the far end with dec_keys at least once a second and compared: a
  key missing or different there is an error, not a figure. Keys/s are the keys made
  ready over the window (taken, plus the pool's growth).
- a ring of 4 (ends site-1 and site-3, two paths of two hops): keys taken as above for
  ``--warmup`` seconds; then the relay on site-1's current path to site-3 is SIGKILLed,
  and the bench measures, from the kill, (a) until site-1's route to site-3 avoids it, (b)
  until site-1 counts a transfer confirmed after that, (c) until enc_keys at site-1 returns
  keys again after it first found none following the kill (dec_keys at site-3 checks
  them). Site-1's status is polled every ``POLL_SECONDS``.

QKD material per hop: from the sites' counters over the relayed window (transfers started
at site-1 for hop 0, relayed by site-k for hop k-1) times the relay pads each takes
(``qkdd.relay_node``: 8 KiB of material per transfer; every hop takes 8 pads of 1 KiB for
its one-time pad and 1 for its MAC keys; hop 0's pads are the material itself), and from
the link's devices (keys the sending site's driver stored, less the growth of its QKD
buffer: a cross-check of the constants, within a batch of keys in flight at either end of
the window). Both are divided by the relayed bytes the far end received, then multiplied
by the relayed keys site-1 used per key made (the end-to-end agreement takes one 256-bit
relayed key per 256-bit key; the relayed buffer's change over the window is subtracted).

Usage: python bench/bench_relay.py [--lines 3,4,5] [--runs 3] [--warmup 5] [--window 15]
       [--link-rate 4000] [--pool-size 1024] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peer_daemons import cpu_seconds, load_average, md_header, md_row

from qkdd.client import BlockingKeyClient, ClientError, DeliveredKey
from qkdd.client.client_errors import KeyServiceClientError
from qkdd.demo_network import (
    LINK_KEY_RATE,
    NETWORK_STARTUP_TIMEOUT,
    RELAY_PAD_BYTES,
    NetworkPlan,
    RunningNetwork,
    running_network,
    sae_id,
    site_id,
)
from qkdd.relay.hop_seal import MAC_MATERIAL_SIZE
from qkdd.relay_node import PAD_BYTES, RELAYED_KEY_BITS, TRANSFER_KEYS

KEY_BYTES = 32  # the emulators' QKD keys, the relayed keys and the API's keys: 256 bits
MATERIAL_BYTES = TRANSFER_KEYS * RELAYED_KEY_BITS // 8  # relayed per transfer
MATERIAL_PADS = -(-MATERIAL_BYTES // PAD_BYTES)
# Relay pads each hop takes per transfer: its one-time pad and its MAC keys (hop 0's pads
# are the material itself: qkdd.relay_node's source sends what the first relay also holds).
HOP_PADS = MATERIAL_PADS + -(-MAC_MATERIAL_SIZE // PAD_BYTES)
POOL_SIZE = 1024
EMPTY_SLEEP = 0.01  # between Status calls while the pool is empty
CHECK_SECONDS = 1.0  # the sampled keys are fetched at the far end this often
CHECK_RETRY_SECONDS = 10.0  # a key taken here may reach the far end's store a moment later
POLL_SECONDS = 0.01
ROUTE_TIMEOUT = 180.0  # each route-change figure: "> this" when not seen within it
RING = 4


class KeysDiffer(RuntimeError):
    """A key taken at one end is missing or different at the other."""


# -- an application pair ---------------------------------------------------------------------


class KeyTaker:
    """The application at ``near`` takes keys for the SAE at ``far`` as they become ready;
    the first key of each answer is fetched at the far end with dec_keys and compared.
    One thread at a time."""

    def __init__(self, network: RunningNetwork, near: int, far: int, per_request: int) -> None:
        self.master_sae, self.slave_sae = sae_id(near), sae_id(far)
        self._near = BlockingKeyClient(str(network.sites[site_id(near)].socket_path))
        self._far = BlockingKeyClient(str(network.sites[site_id(far)].socket_path))
        self._per_request = per_request
        self._sample: dict[str, DeliveredKey] = {}
        self._checked_at = time.monotonic()
        self.taken = 0
        self.checked = 0

    def close(self) -> None:
        self._near.close()
        self._far.close()

    def ready(self) -> int:
        return int(self._near.status(self.slave_sae)["stored_key_count"])

    def take(self) -> int:
        """Keys taken now: those ready, at most one request's worth (0 if none is)."""
        ready = self.ready()
        if not ready:
            return 0
        try:
            keys = self._near.enc_keys(self.slave_sae, number=min(ready, self._per_request))
        except KeyServiceClientError as exc:
            if exc.status != 503:
                raise
            return 0
        self.taken += len(keys)
        self._sample[keys[0].key_id] = keys[0]
        if time.monotonic() - self._checked_at >= CHECK_SECONDS:
            self.check()
        return len(keys)

    def check(self) -> None:
        """dec_keys at the far end for the sampled keys: each must be there, the same."""
        self._checked_at = time.monotonic()
        ids = list(self._sample)[: self._per_request]
        if not ids:
            return
        deadline = time.monotonic() + CHECK_RETRY_SECONDS
        while True:
            try:
                far = {key.key_id: key for key in self._far.dec_keys(self.master_sae, ids)}
                break
            except KeyServiceClientError as exc:
                if time.monotonic() > deadline:
                    raise KeysDiffer(
                        f"keys {self.master_sae} took for {self.slave_sae} are not at the far "
                        f"end: {exc}"
                    ) from None
                time.sleep(0.1)
        differ = [key_id for key_id in ids if far.get(key_id) != self._sample[key_id]]
        if differ:
            raise KeysDiffer(f"{len(differ)} keys differ at {self.slave_sae}: {differ[:3]}")
        for key_id in ids:
            del self._sample[key_id]
        self.checked += len(ids)

    def take_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.take():
                time.sleep(EMPTY_SLEEP)


# -- what a window measured ------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    at: float
    sites: dict[int, dict[str, Any]]  # each site's status
    cpu: dict[str, float]  # CPU seconds per process


def snapshot(network: RunningNetwork) -> Snapshot:
    count = network.plan.count
    cpu = {
        site_id(i): cpu_seconds(network.sites[site_id(i)].process.pid) for i in range(1, count + 1)
    }
    cpu |= {f"link {a}-{b}": cpu_seconds(link.pid) for (a, b), link in network.links.items()}
    sites = {i: network.status(i) for i in range(1, count + 1)}
    return Snapshot(time.monotonic(), sites, cpu)


@dataclass(frozen=True)
class Window:
    made: int  # keys made ready for the pair over the window (taken + the pool's growth)
    checked: int  # keys fetched at the far end and compared
    first: Snapshot
    last: Snapshot

    @property
    def seconds(self) -> float:
        return self.last.at - self.first.at

    @property
    def rate(self) -> float:
        return self.made / self.seconds

    def counter(self, index: int, name: str) -> int:
        """Growth of a network counter of a site (``qkdd.relay_node.RelayNode.status``)."""
        return int(self.last.sites[index]["network"][name]) - int(
            self.first.sites[index]["network"][name]
        )

    def buffered(self, index: int, other: int) -> int:
        """Growth of site ``index``'s buffer of QKD keys with ``other`` (stored, unused)."""
        peer = site_id(other)
        last, first = self.last.sites[index]["peers"][peer], self.first.sites[index]["peers"][peer]
        return int(last["qkd_keys_buffered"]) - int(first["qkd_keys_buffered"])

    def received(self, index: int, other: int) -> int:
        """QKD keys site ``index``'s driver took from its device toward ``other``."""
        peer = site_id(other)
        last, first = self.last.sites[index]["peers"][peer], self.first.sites[index]["peers"][peer]
        return int(last["device"]["keys_received"]) - int(first["device"]["keys_received"])

    def consumed(self, index: int, other: int) -> int:
        """QKD keys of the link between sites ``index`` and ``other`` used over the window:
        those site ``index``'s driver stored, less its QKD buffer's growth."""
        return self.received(index, other) - self.buffered(index, other)

    def cpu(self) -> dict[str, float]:
        """% of one core per process."""
        return {
            name: 100 * (self.last.cpu[name] - self.first.cpu[name]) / self.seconds
            for name in self.last.cpu
        }


def measure(network: RunningNetwork, taker: KeyTaker, warmup: float, window: float) -> Window:
    taker.take_for(warmup)
    taken, ready, first = taker.taken, taker.ready(), snapshot(network)
    taker.take_for(window)
    last = snapshot(network)
    made = taker.taken - taken + taker.ready() - ready
    taker.check()
    checked = taker.checked
    return Window(made, checked, first, last)


# -- the networks ----------------------------------------------------------------------------


def set_option(config: Path, table: str, within: str | None, key: str, value: object) -> None:
    """Set ``key`` in each ``table`` section of the config (only those holding the line
    ``within``, if given)."""
    blocks = re.split(r"(?m)^(?=\[)", config.read_text())
    changed = 0
    for i, block in enumerate(blocks):
        if block.startswith(table + "\n") and (within is None or within in block.splitlines()):
            blocks[i], found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", block)
            changed += found
    if not changed:
        raise RuntimeError(f"{config}: no {key} in a {table} section (the demo config changed)")
    config.write_text("".join(blocks))


def configure(plan: NetworkPlan, pool_size: int, *, floor: bool) -> Callable[[Path], None]:
    """The edits of the demo's configs: the end sites' [[remote]] pools hold ``pool_size``
    keys; with ``floor``, site-1 also gets keys for its neighbour's SAE, from a pool as big."""
    first, last = plan.ends

    def edit(directory: Path) -> None:
        def config(index: int) -> Path:
            return directory / f"{site_id(index)}.toml"

        for index in (first, last):
            set_option(config(index), "[[remote]]", None, "pool_size", pool_size)
        if floor:
            neighbour = plan.neighbours(first)[0]
            saes = f'["{sae_id(neighbour)}", "{sae_id(last)}"]'
            set_option(config(first), "[[consumers]]", None, "talks_to", saes)
            for here, there in ((first, neighbour), (neighbour, first)):
                within = f'site_id = "{site_id(there)}"'
                set_option(config(here), "[[peers]]", within, "pool_size", pool_size)

    return edit


def keys_per_request(network: RunningNetwork) -> int:
    text = network.sites[site_id(1)].config_file.read_text()
    found = re.search(r"(?m)^max_keys_per_request = (\d+)$", text)
    return int(found[1]) if found else 1


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for_keys(network: RunningNetwork, near: int, fars: Sequence[int]) -> None:
    """Until site ``near`` holds keys for the SAE of each site in ``fars``."""
    socket = str(network.sites[site_id(near)].socket_path)
    deadline = time.monotonic() + NETWORK_STARTUP_TIMEOUT
    last_seen = "no answer yet"
    while True:
        for site in network.sites.values():
            if site.process.poll() is not None:
                raise RuntimeError(f"{site.site.site_id} exited:\n{tail(site.log_file)}")
        try:
            with BlockingKeyClient(socket) as client:
                counts = [int(client.status(sae_id(f))["stored_key_count"]) for f in fars]
            if all(counts):
                return
            last_seen = f"keys ready: {counts}"
        except ClientError as exc:
            last_seen = str(exc)
        if time.monotonic() > deadline:
            log = network.sites[site_id(near)].log_file
            raise RuntimeError(
                f"no keys at {site_id(near)} for {[sae_id(f) for f in fars]} within "
                f"{NETWORK_STARTUP_TIMEOUT:g} s ({last_seen}):\n{tail(log)}"
            )
        time.sleep(0.2)


@dataclass(frozen=True)
class LineRun:
    count: int
    floor: Window
    relayed: Window


def line_run(directory: Path, count: int, args: argparse.Namespace) -> LineRun:
    plan = NetworkPlan(count, "line")
    first, last = plan.ends
    neighbour = plan.neighbours(first)[0]
    edit = configure(plan, args.pool_size, floor=True)
    with running_network(directory, plan, tamper=edit, link_key_rate=args.link_rate) as network:
        wait_for_keys(network, first, [neighbour, last])
        per_request = keys_per_request(network)
        windows = []
        for far in (neighbour, last):
            taker = KeyTaker(network, first, far, per_request)
            try:
                windows.append(measure(network, taker, args.warmup, args.window))
            finally:
                taker.close()
        return LineRun(count, *windows)


@dataclass(frozen=True)
class RouteChange:
    victim: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    route: float  # seconds from the kill; math.inf: not within ROUTE_TIMEOUT
    confirmed: float
    keys_again: float
    checked: int


def ring_run(directory: Path, args: argparse.Namespace) -> RouteChange:
    plan = NetworkPlan(RING, "ring")
    first, last = plan.ends
    far = site_id(last)
    edit = configure(plan, args.pool_size, floor=False)
    with running_network(directory, plan, tamper=edit, link_key_rate=args.link_rate) as network:
        wait_for_keys(network, first, [last])
        taker = KeyTaker(network, first, last, keys_per_request(network))
        answers: list[tuple[float, int]] = []  # (when, keys) of each turn of the application
        stop = threading.Event()
        failed: list[BaseException] = []

        def application() -> None:
            try:
                while not stop.is_set():
                    taken = taker.take()
                    answers.append((time.monotonic(), taken))
                    if not taken:
                        time.sleep(EMPTY_SLEEP)
            except BaseException as exc:  # reported by the main thread
                failed.append(exc)

        thread = threading.Thread(target=application, name="application", daemon=True)
        thread.start()
        admin = BlockingKeyClient(str(network.sites[site_id(first)].socket_path))
        try:

            def view() -> dict[str, Any]:
                if failed:
                    raise failed[0]
                return dict(admin.site_status()["network"])

            time.sleep(args.warmup)
            before = tuple(view()["routes"][far])
            victim = before[1]
            killed = time.monotonic()
            network.sites[victim].process.send_signal(signal.SIGKILL)
            route = confirmed = keys_again = math.inf
            after: tuple[str, ...] = ()
            confirmed_then = 0
            while time.monotonic() - killed < ROUTE_TIMEOUT:
                now, seen = time.monotonic(), view()
                path = tuple(seen["routes"].get(far, ()))
                if route == math.inf and path and victim not in path:
                    route, after, confirmed_then = now - killed, path, seen["transfers_confirmed"]
                elif (
                    route < math.inf
                    and confirmed == math.inf
                    and seen["transfers_confirmed"] > confirmed_then
                ):
                    confirmed = now - killed
                keys_again = again(answers, killed)
                if confirmed < math.inf and keys_again < math.inf:
                    break
                time.sleep(POLL_SECONDS)
            stop.set()
            thread.join()
            if failed:
                raise failed[0]
            taker.check()  # the keys taken since the application's last check
            return RouteChange(
                victim, before, after, route, confirmed, keys_again - killed, taker.checked
            )
        finally:
            stop.set()
            thread.join()
            admin.close()
            taker.close()


def again(answers: Sequence[tuple[float, int]], killed: float) -> float:
    """When the application got keys again after it first found none following the kill
    (math.inf: not yet)."""
    empty = False
    for when, taken in list(answers):
        if when <= killed:
            continue
        if not taken:
            empty = True
        elif empty:
            return when
    return math.inf


# -- the tables ------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def keys(rate: float) -> str:
    return f"{rate:,.0f}"


def ratio(part: float, whole: float) -> str:
    return f"{part / whole:.2f}" if whole else "-"


def seconds(value: float) -> str:
    return f"> {ROUTE_TIMEOUT:g}" if value == math.inf else f"{value:.3f}"


def header(args: argparse.Namespace, runs: int) -> str:
    return (
        f"link key rate {args.link_rate:,} keys/s per link (256-bit keys, qkd-emulator "
        f"--physics random), pool_size {args.pool_size:,} per measured pair, relay pads "
        f"{RELAY_PAD_BYTES // 1024} KiB per direction of each link, warm-up {args.warmup:g} s, "
        f"window {args.window:g} s, median of {runs} run(s); {os.cpu_count()} CPUs; "
        f"{args.load_at_start} at the start, {load_average()} at the end"
    )


def bound(link_rate: float) -> float:
    """Keys/s a hop's QKD material allows end to end: each key takes one relayed key,
    each relayed byte HOP_PADS * PAD_BYTES / MATERIAL_BYTES bytes of the hop's QKD keys."""
    return link_rate * MATERIAL_BYTES / (HOP_PADS * PAD_BYTES)


def print_rates(lines: dict[int, list[LineRun]], args: argparse.Namespace, runs: int) -> None:
    print(f"\nKey rates: {header(args, runs)}")
    print(
        "floor: keys site-1's application gets for sae-2 over the direct link between them, "
        "in the same network; relayed: keys it gets for the far end's SAE through the relay "
        "sites; link QKD keys/s: what the direct link's device delivered over the floor "
        "window (one QKD key per key: the floor exceeds it while the QKD buffers drain); "
        "relayed QKD keys/s: what the far end received; hop bound: keys/s each hop's QKD "
        f"keys allow relayed (link rate x {MATERIAL_BYTES} / ({HOP_PADS} x {PAD_BYTES})); "
        "CPU over the relayed window, % of one core\n"
    )
    print(
        md_header(
            "sites", "relay sites", "floor keys/s", "link QKD keys/s", "relayed keys/s",
            "relayed/floor",
            "relayed QKD keys/s", "hop bound keys/s", "relayed/bound", "keys checked",
            "busiest process", "busiest CPU %", "all CPU %",
        )
    )  # fmt: skip
    limit = bound(args.link_rate)
    for count, each in lines.items():
        floor = median([run.floor.rate for run in each])
        relayed = median([run.relayed.rate for run in each])
        delivered = median([run.floor.received(1, 2) / run.floor.seconds for run in each])
        received = median(
            [run.relayed.counter(count, "keys_relayed") / run.relayed.seconds for run in each]
        )
        cpus = [run.relayed.cpu() for run in each]
        shares = {name: median([cpu[name] for cpu in cpus]) for name in cpus[0]}
        busiest = max(shares, key=shares.__getitem__)
        print(
            md_row(
                count,
                count - 2,
                keys(floor),
                keys(delivered),
                keys(relayed),
                ratio(relayed, floor),
                keys(received),
                keys(limit),
                ratio(relayed, limit),
                f"{sum(run.floor.checked + run.relayed.checked for run in each):,}",
                busiest,
                f"{shares[busiest]:.0f}",
                f"{median([sum(cpu.values()) for cpu in cpus]):.0f}",
            )
        )


@dataclass(frozen=True)
class Material:
    transfers: int
    counted: float  # QKD bytes per relayed byte, from the counters and the constants
    devices: float  # the same from the link's devices
    used: float  # relayed keys site-1 used per key made


def hop_material(run: LineRun, hop: int) -> Material:
    window, count = run.relayed, run.count
    # Hop 0 is site-1's (the transfers it started); hop k is site-(k+1)'s (those it relayed).
    if hop == 0:
        transfers = window.counter(1, "transfers_started")
    else:
        transfers = window.counter(hop + 1, "transfers_relayed")
    received = window.counter(count, "keys_relayed") * KEY_BYTES
    used = window.counter(1, "keys_relayed") - window.buffered(1, count)
    qkd = window.consumed(hop + 1, hop + 2) * KEY_BYTES
    return Material(
        transfers,
        transfers * HOP_PADS * PAD_BYTES / received if received else math.nan,
        qkd / received if received else math.nan,
        used / window.made if window.made else math.nan,
    )


def print_material(lines: dict[int, list[LineRun]], args: argparse.Namespace, runs: int) -> None:
    print(f"\nQKD material per end-to-end key: {header(args, runs)}")
    print(
        "transfers: over the relayed window on that hop; QKD B per relayed B: bytes of the "
        "hop's QKD keys per byte the far end received, from the counters (transfers x pads x "
        f"{PAD_BYTES} B) and from the link's devices (keys the sending site stored less its "
        "QKD buffer's growth); relayed per key: relayed keys site-1 used per key made; QKD B "
        "per key B: the product; expected: the transfer constants, one relayed key per key. "
        "direct: the floor's link, QKD keys used per key made\n"
    )
    print(
        md_header(
            "sites", "hop", "link", "transfers", "QKD B per relayed B (counters)",
            "QKD B per relayed B (devices)", "relayed per key", "QKD B per key B (counters)",
            "QKD B per key B (devices)", "expected",
        )
    )  # fmt: skip
    for count, each in lines.items():
        direct = median([run.floor.consumed(1, 2) / run.floor.made for run in each])
        print(
            md_row(
                count, "direct", "site-1 > site-2", "-", "-", "-", "-", "-", f"{direct:.2f}", "1.00"
            )
        )
        for hop in range(count - 1):
            found = [hop_material(run, hop) for run in each]
            counted = median([m.counted for m in found])
            devices = median([m.devices for m in found])
            used = median([m.used for m in found])
            print(
                md_row(
                    count,
                    f"hop {hop}",
                    f"{site_id(hop + 1)} > {site_id(hop + 2)}",
                    f"{median([m.transfers for m in found]):.0f}",
                    f"{counted:.3f}",
                    f"{devices:.3f}",
                    f"{used:.3f}",
                    f"{counted * used:.3f}",
                    f"{devices * used:.3f}",
                    f"{HOP_PADS * PAD_BYTES / MATERIAL_BYTES:.3f}",
                )
            )


def print_route_changes(changes: list[RouteChange], args: argparse.Namespace) -> None:
    print(f"\nRoute change on a ring of {RING}: {header(args, len(changes))}")
    print(
        "seconds from the SIGKILL of the relay on site-1's path to site-3 until: site-1's "
        "route avoids it; site-1 counts a transfer confirmed after that; site-1's application "
        "(taking keys all along) gets keys again after it first found none (checked at site-3 "
        f"with dec_keys); site-1's status polled every {POLL_SECONDS * 1000:g} ms\n"
    )
    print(
        md_header(
            "run", "relay killed", "path before", "path after", "route avoids it s",
            "transfer confirmed s", "keys again s", "keys checked",
        )
    )  # fmt: skip
    for index, change in enumerate(changes, 1):
        print(
            md_row(
                index,
                change.victim,
                " > ".join(change.before),
                " > ".join(change.after) or "-",
                seconds(change.route),
                seconds(change.confirmed),
                seconds(change.keys_again),
                f"{change.checked:,}",
            )
        )
    print(
        md_row(
            "median",
            "-",
            "-",
            "-",
            seconds(median([c.route for c in changes])),
            seconds(median([c.confirmed for c in changes])),
            seconds(median([c.keys_again for c in changes])),
            f"{sum(c.checked for c in changes):,}",
        )
    )


def print_runs(lines: dict[int, list[LineRun]]) -> None:
    print("\nEach run, in order: floor / relayed keys/s, and keys relayed to the far end /s\n")
    for count, each in lines.items():
        shown = [
            f"{keys(run.floor.rate)} / {keys(run.relayed.rate)} "
            f"({keys(run.relayed.counter(count, 'keys_relayed') / run.relayed.seconds)} relayed)"
            for run in each
        ]
        print(f"- {count} sites: " + "; ".join(shown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default="3,4,5", help="sites per line, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs of each network")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds taking keys first")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured")
    parser.add_argument(
        "--link-rate", type=int, default=LINK_KEY_RATE, help="keys/s of each emulated link"
    )
    parser.add_argument(
        "--pool-size", type=int, default=POOL_SIZE, help="ready keys per measured pair"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one run, a line of 3 and the ring, short windows"
    )
    args = parser.parse_args()
    if args.quick:
        args.lines, args.runs, args.warmup, args.window = "3", 1, 1.0, 3.0
    counts = [int(count) for count in args.lines.split(",")]
    args.load_at_start = load_average()
    print(f"Relayed keys; {args.load_at_start} at the start ({os.cpu_count()} CPUs)")
    lines: dict[int, list[LineRun]] = {count: [] for count in counts}
    changes: list[RouteChange] = []
    with tempfile.TemporaryDirectory(prefix="qkdd-relay-") as tmp:
        for index in range(args.runs):  # the networks interleaved: load drifts alike
            for count in counts:
                where = Path(tmp) / f"line-{count}-{index}"
                where.mkdir()
                lines[count].append(line_run(where, count, args))
            where = Path(tmp) / f"ring-{index}"
            where.mkdir()
            changes.append(ring_run(where, args))
    print_rates(lines, args, args.runs)
    print_material(lines, args, args.runs)
    print_route_changes(changes, args)
    print_runs(lines)
    print(f"\n{load_average()} at the end (/proc/loadavg)")


if __name__ == "__main__":
    main()
