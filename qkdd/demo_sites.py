"""The two demo sites' config files. ``config/site-a.toml`` and ``config/site-b.toml`` are
these templates rendered with the default ports (a test keeps them in step), and
``qkdd demo`` renders them into its own directory with free ports.

Paths are relative to the config file, so a demo directory is self-contained:

    site-a.toml  site-a/identity.key  site-a/identity.pub  site-a/state/  site-a/api.sock
    site-b.toml  site-b/...           qkd-a.tty qkd-b.tty (links made by qkd-emulator)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORTS = {"site-a": 47101, "site-b": 47102}


@dataclass(frozen=True)
class DemoSite:
    site_id: str
    sae_id: str
    device_link: str

    @property
    def directory(self) -> str:
        return self.site_id


SITE_A = DemoSite("site-a", "sae-a", "qkd-a.tty")
SITE_B = DemoSite("site-b", "sae-b", "qkd-b.tty")
SITES = (SITE_A, SITE_B)

_TEMPLATE = """\
# qkdd demo site {site_id}: rendered by qkdd.demo_sites (`qkdd demo` writes the same file).
# Relative paths start at this file's directory.
site_id = "{site_id}"
# TCP address where this site accepts its peers' daemons.
listen = "127.0.0.1:{port}"
state_directory = "{directory}/state"
# auto: liboqs-python where the liboqs library is installed, else pyca/cryptography.
pqc_backend = "auto"

[identity]
# ML-DSA-65 seed, created by `qkdd keygen --out {directory}/identity.key`.
private_key = "{directory}/identity.key"

[store]
# 32-byte key-encryption key sealing keys at rest, created by
# `qkdd keygen --kek {directory}/kek.bin` (or "credential:NAME" under systemd).
key_encryption_key = "{directory}/kek.bin"
# Seconds a key waits for its application before it is erased.
key_lifetime = 3600

[api]
# ETSI GS QKD 014 over HTTP/1.1 on this Unix socket.
socket = "{directory}/api.sock"
socket_mode = 0o600
key_size = 256
# Keys per enc_keys request; at most the peers' pool_size (more could never be served).
max_keys_per_request = 64

# Local applications (SAEs). Without `uid`, any process that can open the socket may act
# as this SAE; set `uid` to restrict it to one user.
[[consumers]]
sae_id = "{sae_id}"

[[peers]]
site_id = "{peer_site_id}"
address = "127.0.0.1:{peer_port}"
# The peer's pinned ML-DSA-65 public key: the trust anchor of the bootstrap handshake.
public_key_file = "{peer_directory}/identity.pub"
remote_sae_ids = ["{peer_sae_id}"]
pool_size = 64

[peers.device]
kind = "serial"
path = "{device_link}"
baudrate = 115200
"""


def render(site: DemoSite, ports: dict[str, int] | None = None) -> str:
    ports = ports or DEFAULT_PORTS
    peer = SITE_B if site is SITE_A else SITE_A
    return _TEMPLATE.format(
        site_id=site.site_id,
        port=ports[site.site_id],
        directory=site.directory,
        sae_id=site.sae_id,
        peer_site_id=peer.site_id,
        peer_port=ports[peer.site_id],
        peer_directory=peer.directory,
        peer_sae_id=peer.sae_id,
        device_link=site.device_link,
    )
