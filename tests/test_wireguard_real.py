"""Two qkdd sites keeping the PSK of a real WireGuard tunnel: userspace WireGuard
(wireguard-go) in two network namespaces joined by a veth pair, the QKD link emulator and
both site daemons as subprocesses, and the real wg(8) run by the daemons.

The daemons stay in this network namespace: userspace WireGuard is configured through a
Unix socket in /var/run/wireguard, which `wg` reaches from any network namespace, while
the tunnel's packets go only between the two namespaces made here. Every address used is
in a private /30 inside those namespaces, and everything made is removed at the end.

Checked: after each rotation both interfaces hold the same PSK and traffic passes; with
site B killed, site A fails closed and traffic stops within seconds (WireGuard alone
would keep its current session for up to 180 s), the peer's settings survive, and the
failed rotations take no hybrid key; with B back, the tunnel carries traffic again.

Needs root, /dev/net/tun and network namespaces; installs wireguard-go and wireguard-tools
with apt-get when they are missing, and skips saying why where any of that is impossible.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rotation_helpers import install_debian_packages
from timeouts import timeout, wait_until
from wg_standin import wireguard_bindings

from qkdd.client import BlockingKeyClient
from qkdd.demo import RunningSite, running_demo

pytestmark = pytest.mark.integration

TOOLS = {"wg": "wireguard-tools", "wireguard-go": "wireguard-go", "ping": "iputils-ping"}
PORT = 51820
# Private addresses that exist only inside the namespaces made here: the veth link, and
# the tunnel's inner addresses.
VETH = ("10.213.7.1", "10.213.7.2")
TUNNEL = ("10.213.7.5", "10.213.7.6")


def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=timeout(30), check=False
    )


def _check(*argv: str, stdin: str | None = None) -> str:
    result = _run(*argv, stdin=stdin)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr.strip()}"
    return result.stdout


def _tools() -> dict[str, str]:
    """Paths of wg, wireguard-go and ping; installs the Debian packages if needed."""
    install_debian_packages(
        sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    )
    paths = {tool: shutil.which(tool) for tool in TOOLS}
    absent = [tool for tool, path in paths.items() if path is None]
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed and apt-get is not available")
    return {tool: str(path) for tool, path in paths.items()}


@dataclass
class WgEnd:
    """One end of the tunnel: a namespace with a veth end and a wireguard-go interface."""

    namespace: str
    interface: str
    public_key: str
    veth_address: str
    tunnel_address: str

    def ping(self, address: str) -> bool:
        """One ping inside this namespace (the address is inside the other namespace)."""
        command = ["ip", "netns", "exec", self.namespace, "ping", "-c1", "-W1", "-q", address]
        return _run(*command).returncode == 0

    def show(self, what: str) -> str:
        return _check("wg", "show", self.interface, what).strip()

    def psk(self) -> str:
        (line,) = self.show("preshared-keys").splitlines()
        return line.split("\t")[1]


@dataclass
class Tunnel:
    a: WgEnd
    b: WgEnd


@pytest.fixture
def tunnel(tmp_path: Path) -> Iterator[Tunnel]:
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces and tun devices")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing: userspace WireGuard needs a tun device")
    tools = _tools()
    tag = secrets.token_hex(3)
    namespaces: list[str] = []
    processes: list[subprocess.Popen[bytes]] = []
    interfaces = (f"qkw{tag}a", f"qkw{tag}b")
    try:
        for side in "ab":
            made = _run("ip", "netns", "add", f"qkdd-{tag}-{side}")
            if made.returncode != 0:
                pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
            namespaces.append(f"qkdd-{tag}-{side}")
        ns_a, ns_b = namespaces
        veth_a, veth_b = f"qkv{tag}a", f"qkv{tag}b"
        _check("ip", "link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b,
               "netns", ns_b)  # fmt: skip
        keys = [_check("wg", "genkey").strip() for _ in "ab"]
        public = [_check("wg", "pubkey", stdin=key).strip() for key in keys]
        ends = []
        for i, (ns, veth, interface) in enumerate(
            zip(namespaces, (veth_a, veth_b), interfaces, strict=True)
        ):
            ends.append(WgEnd(ns, interface, public[i], VETH[i], TUNNEL[i]))
            _check("ip", "-n", ns, "addr", "add", f"{VETH[i]}/30", "dev", veth)
            _check("ip", "-n", ns, "link", "set", veth, "up")
            with open(tmp_path / f"{interface}.log", "wb") as log:
                processes.append(  # `ip netns exec` execs wireguard-go: this is its pid
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, tools["wireguard-go"], "-f", interface],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "LOG_LEVEL": "error"},
                    )
                )
            socket = Path(f"/var/run/wireguard/{interface}.sock")
            deadline = time.monotonic() + timeout(20)
            while not socket.exists():
                if processes[-1].poll() is not None or time.monotonic() > deadline:
                    output = (tmp_path / f"{interface}.log").read_text()[-300:]
                    pytest.skip(f"wireguard-go could not make {interface}: {output}")
                time.sleep(0.05)
        for i, end in enumerate(ends):
            other = ends[1 - i]
            key_file = tmp_path / f"{end.interface}.key"
            key_file.write_text(keys[i] + "\n")
            key_file.chmod(0o600)
            _check(
                "wg", "set", end.interface, "private-key", str(key_file), "listen-port", str(PORT),
                "peer", other.public_key, "endpoint", f"{other.veth_address}:{PORT}",
                "allowed-ips", f"{other.tunnel_address}/32", "persistent-keepalive", "25",
            )  # fmt: skip
            _check("ip", "-n", end.namespace, "addr", "add", f"{end.tunnel_address}/30", "dev",
                   end.interface)  # fmt: skip
            _check("ip", "-n", end.namespace, "link", "set", end.interface, "up")
        yield Tunnel(*ends)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout(10))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for namespace in namespaces:
            _run("ip", "netns", "del", namespace)  # takes the veth and tun devices with it
        for interface in interfaces:
            with contextlib.suppress(FileNotFoundError):
                Path(f"/var/run/wireguard/{interface}.sock").unlink()


def _wait(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    wait_until(condition, what, seconds, interval=0.1)


def _status(site: RunningSite) -> dict:  # type: ignore[type-arg]
    with BlockingKeyClient(str(site.socket_path)) as client:
        return client.site_status()


def _wg_pool(status: dict) -> int:  # type: ignore[type-arg]
    (pool,) = [
        level
        for level in status["peers"]["site-b"]["pools"]
        if (level["master_SAE_ID"], level["slave_SAE_ID"]) == ("wg-a", "wg-b")
    ]
    return int(pool["ready"])


def _both_ways(tunnel: Tunnel) -> bool:
    return tunnel.a.ping(tunnel.b.tunnel_address) and tunnel.b.ping(tunnel.a.tunnel_address)


def test_real_tunnel_rotates_fails_closed_and_recovers(tmp_path, tunnel):
    a, b = tunnel.a, tunnel.b
    bindings = wireguard_bindings(
        (a.interface, b.interface),
        (a.public_key, b.public_key),
        wg_command=shutil.which("wg"),
        interval=1,
        max_key_age=4,
    )
    with running_demo(tmp_path, bindings) as (site_a, site_b):
        # Rotations: after each, both interfaces hold the same (new) PSK.
        seen: list[str] = []

        def next_shared_psk() -> bool:
            psk_a, psk_b = a.psk(), b.psk()
            if psk_a == psk_b != "(none)" and psk_a not in seen:
                seen.append(psk_a)
                return True
            return False

        for rotation in range(3):
            _wait(next_shared_psk, f"both sites share PSK number {rotation + 1}")
        _wait(lambda: _both_ways(tunnel), "traffic passes through the tunnel")
        settings = [a.show(what) for what in ("endpoints", "allowed-ips", "persistent-keepalive")]

        # Site B gone: A keeps its key until max_key_age, then fails closed.
        def fail_closed_events() -> int:
            return site_a.log_file.read_text().count("event=wireguard_fail_closed ")

        closed_before = fail_closed_events()
        down_since = time.time()
        site_b.process.send_signal(signal.SIGKILL)
        site_b.process.wait(timeout(10))
        _wait(lambda: fail_closed_events() > closed_before, "site A fails closed")
        failed_closed_at = time.monotonic()
        pings_through = 0  # pings sent after the event that still got through

        def traffic_stopped() -> bool:
            nonlocal pings_through
            if a.ping(b.tunnel_address):
                pings_through += 1
                return False
            return True

        _wait(traffic_stopped, "traffic stops", seconds=30)
        stopped_after = time.monotonic() - failed_closed_at
        assert not any(a.ping(b.tunnel_address) for _ in range(3))  # and stays stopped
        assert not b.ping(a.tunnel_address)
        assert a.psk() not in seen and a.psk() != b.psk()
        # The peer was re-created with all its settings, only the PSK is new.
        assert [a.show(w) for w in ("endpoints", "allowed-ips", "persistent-keepalive")] == (
            settings
        )

        # Failed rotations during the outage take no hybrid key.
        before = _status(site_a)
        attempts = int(before["wireguard"][0]["consecutive_failures"])
        _wait(
            lambda: _status(site_a)["wireguard"][0]["consecutive_failures"] >= attempts + 3,
            "three more failed rotations at site A",
        )
        after = _status(site_a)
        assert _wg_pool(after) == _wg_pool(before)
        outage_errors = [
            event
            for event in after["recent_errors"]
            if event["time"] >= down_since and "wireguard_rotation_failed" in event["message"]
        ]
        assert len(outage_errors) == 1
        print(
            f"\ntraffic stopped {stopped_after:.1f} s after site A's fail-closed event was "
            f"seen ({pings_through} pings got through after it; a failed ping waits 1 s); "
            f"pool wg-a->wg-b {_wg_pool(before)} -> {_wg_pool(after)} over "
            f"{after['wireguard'][0]['consecutive_failures'] - attempts} failed rotations; "
            f"{len(outage_errors)} rotation error held for the outage"
        )

        # Site B back: the next rotation gives both the same fresh PSK, and traffic flows.
        site_b.spawn()
        _wait(lambda: _status(site_a)["wireguard"][0]["state"] == "fresh", "site A recovers")
        _wait(next_shared_psk, "both sites share a fresh PSK again")
        _wait(lambda: _both_ways(tunnel), "traffic passes again")
