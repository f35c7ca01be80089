"""A site with several peers: each link has its own QKD device and its own key agreement,
and keys for each remote SAE come only from that SAE's link."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest
from timeouts import timeout

from qkdd.client import BlockingKeyClient, KeyServiceClientError
from qkdd.crypto.select import select_backend
from qkdd.demo import RunningSite, wait_for_keys
from qkdd.demo_sites import DemoSite
from qkdd.identity import public_key_text, write_identity, write_key_encryption_key

HUB = DemoSite("site-a", "sae-a", "")
SPOKES = (DemoSite("site-b", "sae-b", ""), DemoSite("site-c", "sae-c", ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def site_config(site: DemoSite, port: int, peers: list[tuple[DemoSite, int, str]]) -> str:
    text = f"""
site_id = "{site.site_id}"
listen = "127.0.0.1:{port}"
state_directory = "{site.directory}/state"
[identity]
private_key = "{site.directory}/identity.key"
[store]
key_encryption_key = "{site.directory}/kek.bin"
[api]
socket = "{site.directory}/api.sock"
[[consumers]]
sae_id = "{site.sae_id}"
"""
    for peer, peer_port, device in peers:
        text += f"""
[[peers]]
site_id = "{peer.site_id}"
address = "127.0.0.1:{peer_port}"
public_key_file = "{peer.directory}/identity.pub"
remote_sae_ids = ["{peer.sae_id}"]
pool_size = 16
[peers.device]
kind = "serial"
path = "{device}"
"""
    return text


@pytest.fixture
def three_sites(tmp_path):
    backend = select_backend("cryptography")
    sites = (HUB, *SPOKES)
    ports = {site.site_id: free_port() for site in sites}
    for site in sites:
        key = write_identity(tmp_path / site.directory / "identity.key", backend)
        (tmp_path / site.directory / "identity.pub").write_text(public_key_text(key))
        write_key_encryption_key(tmp_path / site.directory / "kek.bin")
    emulators = []
    for spoke in SPOKES:
        hub_end, spoke_end = f"qkd-a-{spoke.site_id}.tty", f"qkd-{spoke.site_id}-a.tty"
        emulators.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qkdd_drivers.emulator.command",
                    "pty",
                    "--physics",
                    "random",
                    "--link-a",
                    str(tmp_path / hub_end),
                    "--link-b",
                    str(tmp_path / spoke_end),
                ],
                stdout=subprocess.PIPE,
            )
        )
        (tmp_path / f"{spoke.site_id}.toml").write_text(
            site_config(spoke, ports[spoke.site_id], [(HUB, ports[HUB.site_id], spoke_end)])
        )
    hub_peers = [(s, ports[s.site_id], f"qkd-a-{s.site_id}.tty") for s in SPOKES]
    (tmp_path / "site-a.toml").write_text(site_config(HUB, ports[HUB.site_id], hub_peers))
    for emulator in emulators:
        assert emulator.stdout.readline()  # ready
    running = [RunningSite.start(site, tmp_path / f"{site.site_id}.toml") for site in sites]
    try:
        yield running
    finally:
        for process in [r.process for r in running] + emulators:
            process.send_signal(signal.SIGTERM)
        for process in [r.process for r in running] + emulators:
            process.wait(timeout=timeout(20))


def test_a_hub_with_two_peers_keeps_each_link_apart(three_sites):
    hub, site_b, site_c = three_sites
    for spoke, sae in ((site_b, "sae-b"), (site_c, "sae-c")):
        wait_for_keys(hub, sae, 4, timeout=timeout(30))
        with BlockingKeyClient(str(hub.socket_path)) as app:
            sent = app.enc_keys(sae, number=4)
        with BlockingKeyClient(str(spoke.socket_path)) as app:
            got = app.dec_keys("sae-a", [k.key_id for k in sent])
        assert [k.material for k in got] == [k.material for k in sent]
    # A key made on the A-B link is unknown on the A-C link.
    with BlockingKeyClient(str(hub.socket_path)) as app:
        (to_b,) = app.enc_keys("sae-b", number=1)
    with BlockingKeyClient(str(site_c.socket_path)) as app, pytest.raises(KeyServiceClientError):
        app.dec_keys("sae-a", [to_b.key_id])
    hub_log = hub.log_file.read_text()
    assert "event=session_established peer=site-b" in hub_log
    assert "event=session_established peer=site-c" in hub_log
