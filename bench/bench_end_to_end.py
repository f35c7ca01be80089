"""End to end at line rate: an emulated QKD device delivering keys at a paced rate over two
ptys, two real ``qkdd`` daemons agreeing hybrid keys over TCP on loopback, and whether the
link master's ready keys grow at the device's rate.

For each device rate (keys/s, ``qkd-emulator pty --physics random --rate R``), two kinds of run
with the same emulator settings, in this order:

- floor: the emulator alone, each pty read by a ``SerialDevice`` in a process of its own
  with a sink that only counts: the most keys/s the device and the serial driver deliver
  at that rate on this machine, measured in the same run as the daemons;
- daemons: ``qkdd demo``'s two sites (``qkdd.demo``), each with its end of the emulated link
  as its serial device, a pool of ``POOL_SIZE`` ready keys per SAE pair and a QKD buffer
  big enough that neither fills during the run (no key is taken out: the pool must not
  fill, or agreement stops; a run whose pool came close says so).

Each run starts fresh (new identities and stores), waits until keys flow (the master has
made a ready key; in the floor run, both counters have counted one), lets ``--warmup``
seconds pass, then measures a steady window of ``--window`` seconds: keys each daemon's
driver took from the device and stored (``device.keys_received`` of ``qkdctl status``; the
faster side is the device's delivery rate, as the emulator pauses when either side's
buffer is full), the master's ready keys (the sum of its pools' ``ready``), the growth of
each daemon's QKD buffer (QKD keys stored but not yet agreed), and each process's CPU time
from /proc/<pid>/stat (CPU % of one core, and CPU microseconds per key delivered). A
process at >= ``SATURATED`` % of a core is marked as the one that saturates.

Usage: python bench/bench_end_to_end.py [--rates 13700,26000,53000] [--runs 3]
       [--warmup 5] [--window 10] [--key-bits 256] [--device-buffer N] [--device-window N]
       [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from peer_daemons import MASTER, PEER_OF, SLAVE, cpu_seconds, load_average, md_header, md_row
from qkdd_drivers.base import QkdKey
from qkdd_drivers.serial.driver import SerialDevice

from qkdd.client import BlockingKeyClient, ClientError
from qkdd.demo import PYTHON_MODULE, RunningSite, prepare_directory
from qkdd.demo_sites import SITES

# Ready keys per SAE pair (the config's maximum): two pairs, so 2M keys before agreement
# stops, 37 s at 53k keys/s.
POOL_SIZE = 1_000_000
QKD_BUFFER_MAX = 10_000_000  # the config's maximum
SATURATED = 95.0  # % of one core
START_SECONDS = 60.0  # emulator links, daemons up and the first ready key
STOP_SECONDS = 20.0
POLL_SECONDS = 0.1
EMULATOR, FLOOR_HOST = "emulator", "counting host"
WAL_BYTES_PER_KEY = 64  # what a durable floor host appends per key before its fdatasync
Counter = Any  # a multiprocessing RawValue("q"): .value, shared with a child process


# -- the emulated device ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSettings:
    rate: float  # keys/s
    key_bits: int
    buffer: int  # keys each side holds at most
    window: int  # keys each side keeps in flight before an ACK


def start_emulator(directory: Path, device: DeviceSettings) -> subprocess.Popen[bytes]:
    """``qkd-emulator pty`` with random keys at the paced rate, linked at the demo sites'
    device paths; returned once both links exist."""
    links = [directory / site.device_link for site in SITES]
    with open(directory / "emulator.log", "ab") as log:
        emulator = subprocess.Popen(
            [
                *PYTHON_MODULE,
                "qkdd_drivers.emulator.command",
                "pty",
                *("--link-a", str(links[0]), "--link-b", str(links[1])),
                *("--site-a", SITES[0].site_id, "--site-b", SITES[1].site_id),
                *("--physics", "random", "--rate", str(device.rate)),
                *("--key-bits", str(device.key_bits), "--buffer", str(device.buffer)),
                *("--window", str(device.window)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    wait_for(lambda: all(link.exists() for link in links), [emulator], "the emulator's ptys")
    return emulator


def wait_for(
    done: Callable[[], bool], processes: Sequence[subprocess.Popen[bytes]], what: str
) -> None:
    deadline = time.monotonic() + START_SECONDS
    while not done():
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{what}: {process.args!r} exited ({process.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {START_SECONDS:g} s")
        time.sleep(POLL_SECONDS)


def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- what a run measured ---------------------------------------------------------------------


def machine_cpu() -> tuple[int, int]:
    """(busy, all) clock ticks of every core so far, from /proc/stat."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


@dataclass(frozen=True)
class Sample:
    at: float
    received: dict[str, int]  # keys each host took from the device
    ready: int  # the master's ready keys (0 in a floor run)
    buffered: dict[str, int]  # QKD keys stored and not yet agreed, per daemon
    cpu: dict[str, float]  # CPU seconds per process
    machine: tuple[int, int]  # machine_cpu()
    deliveries: int = 0  # sink calls of both counting hosts (floor runs)


@dataclass(frozen=True)
class Run:
    seconds: float
    received: dict[str, float]  # keys/s per host
    ready: float  # keys/s
    backlog: dict[str, float]  # QKD buffer growth keys/s per daemon
    cpu: dict[str, float]  # % of one core per process
    machine: float  # % of one core busy on the whole machine (all cores: 100 x cores)
    keys_per_delivery: float  # floor runs: keys per sink call (0: not counted)
    ready_at_end: int

    @property
    def device(self) -> float:
        """Keys/s the device delivered: the faster side (both get the same keys; the
        emulator pauses only while either side's buffer is full)."""
        return max(self.received.values())

    @property
    def others(self) -> float:
        """% of one core that processes other than this run's used meanwhile."""
        return max(0.0, self.machine - sum(self.cpu.values()))

    def us_per_key(self, process: str) -> float:
        return self.cpu[process] / 100 / self.device * 1e6 if self.device else 0.0


def window_run(first: Sample, last: Sample) -> Run:
    span = last.at - first.at

    def rate(before: float, after: float) -> float:
        return (after - before) / span

    busy = last.machine[0] - first.machine[0]
    ticks = max(1, last.machine[1] - first.machine[1])
    keys = sum(last.received.values()) - sum(first.received.values())
    deliveries = last.deliveries - first.deliveries
    return Run(
        span,
        {side: rate(first.received[side], last.received[side]) for side in last.received},
        rate(first.ready, last.ready),
        {side: rate(first.buffered[side], last.buffered[side]) for side in last.buffered},
        {name: 100 * rate(first.cpu[name], last.cpu[name]) for name in last.cpu},
        100 * (os.cpu_count() or 1) * busy / ticks,
        keys / deliveries if deliveries else 0.0,
        last.ready,
    )


def measure_window(sample: Callable[[], Sample], warmup: float, window: float) -> Run:
    time.sleep(warmup)
    first = sample()
    time.sleep(window)
    return window_run(first, sample())


# -- the floor: the emulator into counting serial drivers ------------------------------------


def count_keys(path: str, counted: Counter, calls: Counter, sync_to: str) -> None:
    """A counting host (its own process): ``SerialDevice`` on ``path``, keys only counted;
    with ``sync_to``, each delivery also appends to that file and waits for one fdatasync
    of it in a worker thread before the driver acknowledges the keys, as the daemon's store
    does (its group commit)."""
    sync_fd = os.open(sync_to, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if sync_to else -1

    class CountingSink:
        async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
            if sync_fd >= 0:
                os.write(sync_fd, bytes(WAL_BYTES_PER_KEY * len(keys)))
                await trio.to_thread.run_sync(os.fdatasync, sync_fd)
            counted.value += len(keys)
            calls.value += 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(SerialDevice(path).run, CountingSink())

    trio.run(main)


def floor_run(
    directory: Path, device: DeviceSettings, warmup: float, window: float, *, sync: bool
) -> Run:
    """The emulator into two counting hosts (with ``sync``, each delivery waits for an
    fdatasync)."""
    directory.mkdir(parents=True)
    emulator = start_emulator(directory, device)
    spawn = multiprocessing.get_context("spawn")
    counted: dict[str, Counter] = {}
    calls: dict[str, Counter] = {}
    hosts: dict[str, Any] = {}
    try:
        for site in SITES:
            side = site.site_id
            counted[side] = spawn.RawValue("q", 0)
            calls[side] = spawn.RawValue("q", 0)
            sync_to = str(directory / f"{side}.wal") if sync else ""
            hosts[side] = spawn.Process(
                target=count_keys,
                args=(str(directory / site.device_link), counted[side], calls[side], sync_to),
            )
            hosts[side].start()

        def sample() -> Sample:
            cpu = {EMULATOR: cpu_seconds(emulator.pid)}
            cpu |= {f"{FLOOR_HOST} {side}": cpu_seconds(host.pid) for side, host in hosts.items()}
            return Sample(
                time.monotonic(),
                {side: int(count.value) for side, count in counted.items()},
                0,
                dict.fromkeys(counted, 0),
                cpu,
                machine_cpu(),
                sum(int(count.value) for count in calls.values()),
            )

        wait_for(lambda: min(sample().received.values()) > 0, [emulator], "keys to the hosts")
        return measure_window(sample, warmup, window)
    finally:
        for host in hosts.values():
            host.terminate()
            host.join(STOP_SECONDS)
        stop([emulator])


# -- the daemons -----------------------------------------------------------------------------


def size_pools(config: Path, device: DeviceSettings) -> None:
    """Pools and QKD buffer big enough that neither fills during a run."""
    buffer = min(QKD_BUFFER_MAX, max(100_000, int(device.rate * 120)))
    text, found = re.subn(
        r"^pool_size = \d+$",
        f"pool_size = {POOL_SIZE}\nqkd_buffer_keys = {buffer}",
        config.read_text(),
        flags=re.M,
    )
    if found != 1 or "key_size = 256" not in text:
        raise RuntimeError(f"the demo config {config} changed: cannot size its pool")
    config.write_text(text.replace("key_size = 256", f"key_size = {device.key_bits}"))


def site_figures(site: RunningSite) -> dict[str, Any]:
    """This daemon's status toward its peer (``qkdctl status``), or {} before it answers."""
    if not site.socket_path.exists():
        return {}
    try:
        with BlockingKeyClient(str(site.socket_path)) as client:
            peers: dict[str, Any] = client.site_status()["peers"]
    except ClientError:
        return {}
    return dict(peers.get(PEER_OF[site.site.site_id], {}))


def daemons_run(directory: Path, device: DeviceSettings, warmup: float, window: float) -> Run:
    directory.mkdir(parents=True)
    configs = prepare_directory(directory)
    for config in configs.values():
        size_pools(config, device)
    emulator = start_emulator(directory, device)
    sites: dict[str, RunningSite] = {}
    try:
        for demo_site in sorted(SITES, key=lambda s: s.site_id != SLAVE):  # slave listens
            sites[demo_site.site_id] = RunningSite.start(demo_site, configs[demo_site.site_id])
        processes = [emulator, *(site.process for site in sites.values())]

        def sample() -> Sample:
            figures = {name: site_figures(site) for name, site in sites.items()}
            cpu = {EMULATOR: cpu_seconds(emulator.pid)}
            cpu |= {name: cpu_seconds(site.process.pid) for name, site in sites.items()}
            return Sample(
                time.monotonic(),
                {
                    name: int(f.get("device", {}).get("keys_received", 0))
                    for name, f in figures.items()
                },
                sum(int(pool["ready"]) for pool in figures[MASTER].get("pools", [])),
                {name: int(f.get("qkd_keys_buffered", 0)) for name, f in figures.items()},
                cpu,
                machine_cpu(),
            )

        try:
            wait_for(lambda: sample().ready > 0, processes, "the master's first ready key")
            run = measure_window(sample, warmup, window)
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!r} exited during the window")
            return run
        except RuntimeError as exc:
            tails = [f"{p.name}:\n{tail(p)}" for p in directory.glob("*.log")]
            raise RuntimeError("\n".join([str(exc), *tails])) from None
    finally:
        stop([site.process for site in sites.values()] + [emulator])


def tail(log: Path, lines: int = 10) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# -- the tables ------------------------------------------------------------------------------

FLOOR, SYNCED, DAEMONS = "floor", "floor + fdatasync", "daemons"
Results = dict[float, dict[str, list[Run]]]  # by device rate, by kind of run


def median_of(runs: Sequence[Run], figure: Callable[[Run], float]) -> float:
    return statistics.median(figure(run) for run in runs)


def keys(rate: float) -> str:
    return f"{rate:,.0f}"


def ratio(part: float, whole: float) -> str:
    return f"{part / whole:.2f}" if whole else "-"


def print_rates(results: Results, runs: int) -> None:
    print(
        f"\nKeys/s over the steady window, median of {runs} run(s) of each kind. floor: the "
        "emulator into counting serial drivers; floor + fdatasync: the same, each delivery "
        "waiting for one fdatasync before its ACK (as the daemon's store does); ready/floor "
        "1.00: the daemons keep up with the device\n"
    )
    print(
        md_header(
            "device rate set", "floor keys/s", "keys per delivery", "floor + fdatasync keys/s",
            "keys per delivery (fdatasync)", "device keys/s (daemons)", f"ingest {MASTER} (master)",
            f"ingest {SLAVE} (slave)", "ready keys/s (master)", "ready/device", "ready/floor",
            f"QKD backlog growth {MASTER}", f"QKD backlog growth {SLAVE}", "ready at end",
        )
    )  # fmt: skip
    for rate, kinds in results.items():
        floors, synced, daemons = kinds[FLOOR], kinds[SYNCED], kinds[DAEMONS]
        floor = median_of(floors, lambda r: r.device)
        device = median_of(daemons, lambda r: r.device)
        ready = median_of(daemons, lambda r: r.ready)
        print(
            md_row(
                keys(rate),
                keys(floor),
                f"{median_of(floors, lambda r: r.keys_per_delivery):.0f}",
                keys(median_of(synced, lambda r: r.device)),
                f"{median_of(synced, lambda r: r.keys_per_delivery):.0f}",
                keys(device),
                keys(median_of(daemons, lambda r: r.received[MASTER])),
                keys(median_of(daemons, lambda r: r.received[SLAVE])),
                keys(ready),
                ratio(ready, device),
                ratio(ready, floor),
                keys(median_of(daemons, lambda r: r.backlog[MASTER])),
                keys(median_of(daemons, lambda r: r.backlog[SLAVE])),
                f"{max(r.ready_at_end for r in daemons):,}",
            )
        )


def print_runs(results: Results) -> None:
    print("\nEach run, in order: keys/s the device delivered (floor, floor + fdatasync, daemons)")
    print("and the master's ready keys/s; % of one core used by other processes meanwhile\n")
    for rate, kinds in results.items():
        runs = zip(kinds[FLOOR], kinds[SYNCED], kinds[DAEMONS], strict=True)
        each = [
            f"{keys(floor.device)} / {keys(synced.device)} / {keys(daemons.device)} -> "
            f"ready {keys(daemons.ready)} (others {daemons.others:.0f}%)"
            for floor, synced, daemons in runs
        ]
        print(f"- {keys(rate)}: " + "; ".join(each))


def print_cpu(results: Results) -> None:
    cores = os.cpu_count() or 1
    print(
        f"\nWhere the time goes: CPU of each process over the window, % of one core ({cores} "
        f"cores: {100 * cores}% in all), and CPU microseconds per key the device delivered; "
        f"saturated at >= {SATURATED:g}% of a core. 'other processes' is the rest of the "
        "machine's busy time meanwhile (this machine is shared). Medians of the runs.\n"
    )
    print(
        md_header("device rate set", "run", "process", "CPU % of a core", "CPU us/key", "saturated")
    )
    for rate, kinds in results.items():
        for kind, runs in kinds.items():
            for process in runs[0].cpu:
                share = statistics.median(run.cpu[process] for run in runs)
                per_key = statistics.median(run.us_per_key(process) for run in runs)
                saturated = "yes" if share >= SATURATED else "no"
                print(
                    md_row(keys(rate), kind, process, f"{share:.1f}", f"{per_key:.1f}", saturated)
                )
            ours = median_of(runs, lambda r: sum(r.cpu.values()))
            others = median_of(runs, lambda r: r.others)
            print(md_row(keys(rate), kind, "these three", f"{ours:.1f}", "-", "-"))
            print(md_row(keys(rate), kind, "other processes", f"{others:.1f}", "-", "-"))


def print_notes(results: Results) -> None:
    print(
        "\nVerdict per rate (keeps up: ready/floor >= 0.95; the daemons' device rate falls "
        "below the floor when a daemon acknowledges keys slower than the device makes them)\n"
    )
    for rate, kinds in results.items():
        daemons = kinds[DAEMONS]
        ready = median_of(daemons, lambda r: r.ready)
        floor = median_of(kinds[FLOOR], lambda r: r.device)
        shares = {p: statistics.median(run.cpu[p] for run in daemons) for p in daemons[0].cpu}
        busiest = max(shares, key=shares.__getitem__)
        share = shares[busiest]
        print(
            f"- {keys(rate)} keys/s: "
            + ("keeps up" if floor and ready >= 0.95 * floor else "does NOT keep up")
            + f" (ready/floor {ratio(ready, floor)}); busiest process {busiest} at "
            f"{share:.0f}% of a core" + (" (saturated)" if share >= SATURATED else "")
        )
    for rate, kinds in results.items():
        fullest = max(run.ready_at_end for run in kinds[DAEMONS])
        if fullest >= 0.9 * 2 * POOL_SIZE:
            print(f"\nNote: at {keys(rate)} keys/s a pool came close to full ({fullest:,} keys)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates", default="13700,26000,53000", help="device rates, keys/s, comma-separated"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind per rate")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after the first key")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--key-bits", type=int, default=256, help="key size (default 256)")
    parser.add_argument(
        "--device-buffer", type=int, default=0, help="emulator --buffer (default: 1 s of keys)"
    )
    parser.add_argument(
        "--device-window", type=int, default=1024, help="emulator --window (default 1024)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one run at 53k keys/s, short window (smoke test)"
    )
    args = parser.parse_args()
    if args.quick:
        args.rates, args.runs, args.warmup, args.window = "53000", 1, 1.0, 2.0
    rates = [float(rate) for rate in args.rates.split(",")]
    print(
        f"{args.key_bits}-bit keys, device window {args.device_window} keys, warm-up "
        f"{args.warmup:g} s, window {args.window:g} s, pool_size {POOL_SIZE:,} per SAE pair; "
        f"{load_average()} at start"
    )
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="qkdd-e2e-") as tmp:
        for rate in rates:
            buffer = args.device_buffer or max(4096, int(rate))
            device = DeviceSettings(rate, args.key_bits, buffer, args.device_window)
            kinds: dict[str, list[Run]] = {FLOOR: [], SYNCED: [], DAEMONS: []}
            for index in range(args.runs):  # the kinds interleaved: load drifts alike
                base = Path(tmp) / f"{rate:.0f}-{index}"
                for kind, runs in kinds.items():
                    where = base / kind.replace(" + ", "-")
                    if kind == DAEMONS:
                        runs.append(daemons_run(where, device, args.warmup, args.window))
                    else:
                        sync = kind == SYNCED
                        runs.append(floor_run(where, device, args.warmup, args.window, sync=sync))
            results[rate] = kinds
    print_rates(results, args.runs)
    print_runs(results)
    print_cpu(results)
    print_notes(results)
    print(f"\n{load_average()} at the end (/proc/loadavg)")


if __name__ == "__main__":
    main()
