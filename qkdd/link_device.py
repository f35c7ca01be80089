"""A direct link's QKD device: the driver its config names, built (``make_device``), and
the store sink it feeds (``StoreSink``: the key store, with back-pressure when the link's
QKD buffer is full). ``qkdd check-config`` builds the drivers too, without starting them
(``device_setup_problems``).
"""

from __future__ import annotations

from collections.abc import Sequence

from qkdd_drivers.base import DeviceError, QkdDevice, QkdKey
from qkdd_drivers.kme import Etsi014Device
from qkdd_drivers.serial.driver import SerialDevice
from qkdd_drivers.serial.serial_messages import Identity

from qkdd.config import Etsi014DeviceConfig, PeerConfig, RelayedDeviceConfig, SiteConfig
from qkdd.constants import QKD_BUFFER_MAX
from qkdd.durability import Durable, already_durable
from qkdd.errors import DeviceSetupError
from qkdd.keystore import KeyStore
from qkdd.link_params import is_link_master
from qkdd.wakeup import Wakeup


class StoreSink:
    """Where a device's keys go: the key store, with back-pressure when the buffer is full.

    ``arrived`` is set when keys were stored (the link's agreement may make a batch);
    the link sets ``space`` when it used buffered keys (a full buffer may take more)."""

    def __init__(
        self,
        store: KeyStore,
        peer_site_id: str,
        buffer_max: int = QKD_BUFFER_MAX,
        arrived: Wakeup | None = None,
        durable: Durable = already_durable,
    ) -> None:
        self._store = store
        self._peer = peer_site_id
        self._buffer_max = buffer_max
        self._durable = durable
        self.arrived = arrived or Wakeup()
        self.space = Wakeup()

    def qkd_keys_buffered(self) -> int:
        """How many of the peer's QKD keys wait here (a pulling device fills up to a target)."""
        return self._store.qkd_key_count(self._peer)

    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        while True:
            self.space.arm()
            if self._store.qkd_key_count(self._peer) < self._buffer_max:
                break
            await self.space.wait()
        self._store.store_qkd_keys(self._peer, keys)
        self.arrived.set()
        # The driver acknowledges the keys to the device once this returns.
        await self._durable()


def make_device(peer: PeerConfig, is_master: bool, local_site_id: str = "") -> QkdDevice:
    device = peer.device
    if isinstance(device, Etsi014DeviceConfig):
        # The link master pulls keys from its KME; the slave fetches the IDs the master
        # names (see fetch_awaited_keys).
        return Etsi014Device(
            device.url,
            cert_file=str(device.certificate),
            key_file=str(device.private_key) if device.private_key else None,
            ca_file=str(device.ca) if device.ca else None,
            own_sae_id=device.own_sae_id,
            peer_sae_id=device.peer_sae_id,
            role="master" if is_master else "slave",
            key_size_bits=device.key_size,
        )
    if isinstance(device, RelayedDeviceConfig):
        raise ValueError(f"{peer.site_id} is a [[remote]] site, relayed: it has no QKD device")
    # A serial device that says which end of which link it is must be ours to the peer.
    expected = Identity(local_site_id, peer.site_id) if local_site_id else None
    return SerialDevice(str(device.path), device.baudrate, expected_identity=expected)


def built_device(config: SiteConfig, peer: PeerConfig, is_master: bool) -> QkdDevice:
    """The peer's device; a driver refusing its settings is a DeviceSetupError naming the
    config file and the peer's device table (the one place a device error can end the
    daemon: drivers retry every fault once running)."""
    try:
        return make_device(peer, is_master, config.site_id)
    except (DeviceError, ValueError) as exc:
        index = next((i for i, p in enumerate(config.peers) if p.site_id == peer.site_id), None)
        table = "peers[].device" if index is None else f"peers[{index}].device"
        what = f"{table} (the {peer.device.kind} device for {peer.site_id})"
        raise DeviceSetupError(config.file, what, str(exc)) from exc


def device_setup_problems(config: SiteConfig) -> list[DeviceSetupError]:
    """What ``qkdd check-config`` learns from building each peer's device driver, without
    starting it: the settings a driver refuses (a KME's URL or TLS files, say)."""
    problems = []
    for peer in config.direct_peers:
        try:
            built_device(config, peer, is_link_master(config.site_id, peer.site_id))
        except DeviceSetupError as exc:
            problems.append(exc)
    return problems
