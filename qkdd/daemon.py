"""The daemon's Trio wiring, top to bottom, in one place.

run_daemon(config)
  self-test the crypto backend, load the identity, open the key store
  nursery
    per peer: QKD device -> key store            (PeerLink.device.run)
    per peer we are master of: dial the peer      (PeerLink.dial_forever)
    peer listener: responder handshakes           (serve_peers)
    ETSI GS QKD 014 API on the Unix socket        (serve_unix)
    READY=1 to systemd, then wait for a signal
  SIGTERM/SIGINT: STOPPING=1, cancel everything (in-flight work is transactional),
  close the store.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from typing import Final

import trio

from qkdd.config import SiteConfig
from qkdd.crypto.select import select_backend
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.server import serve_unix
from qkdd.identity import load_identity, read_key_encryption_key
from qkdd.keystore import KeyStore
from qkdd.peering import PeerLink, serve_peers
from qkdd.pool import StoreKeyPool
from qkdd.systemd import Notifier

log = logging.getLogger("qkdd.daemon")

STORE_FILE: Final = "keys.sqlite3"
STATUS_INTERVAL: Final = 5.0
EXPIRY_INTERVAL: Final = 10.0


async def run_daemon(config: SiteConfig) -> None:
    os.umask(0o077)  # every file the daemon creates (store, WAL, socket) is private
    notifier = Notifier()
    backend = select_backend(config.pqc_backend)
    _self_test(backend)
    signing_key = load_identity(config.identity_key, backend)
    store = KeyStore(
        config.state_directory / STORE_FILE, read_key_encryption_key(config.key_encryption_key)
    )
    links = {
        peer.site_id: PeerLink(config, peer, store=store, backend=backend, signing_key=signing_key)
        for peer in config.peers
    }
    pool = StoreKeyPool(config, store, lambda site: links[site].why_unavailable())
    handler = RequestHandler(pool)

    def identify(uid: int, gid: int) -> frozenset[str]:
        return config.sae_ids_for_uid(uid)

    log.info(
        "event=starting site=%s backend=%s peers=%s",
        config.site_id,
        backend.name,
        ",".join(links) or "-",
    )
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                for link in links.values():
                    await nursery.start(link.device.run, link.sink)
                    if link.params.is_master:
                        nursery.start_soon(link.dial_forever)
                await nursery.start(serve_peers, config, links, backend, signing_key)
                await nursery.start(
                    functools.partial(
                        serve_unix,
                        str(config.api_socket),
                        handler,
                        identify,
                        mode=config.api_socket_mode,
                    )
                )
                nursery.start_soon(_report_status, notifier, config, links, store)
                nursery.start_soon(_expire_keys, config, store)
                notifier.ready()
                log.info("event=ready site=%s api_socket=%s", config.site_id, config.api_socket)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info(
                            "event=reload_ignored reason='reload is not supported yet; "
                            "restart to apply changes'"
                        )
                        continue
                    log.info("event=stopping signal=%s", signal.Signals(signum).name)
                    notifier.stopping()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        store.close()
        log.info("event=stopped site=%s", config.site_id)


def _self_test(backend: object) -> None:
    from qkdd.crypto import selftest

    selftest.run_self_tests(backend)  # type: ignore[arg-type]


async def _expire_keys(config: SiteConfig, store: KeyStore) -> None:
    """Erase keys that waited longer than ``store.key_lifetime`` for their application."""
    while True:
        erased = store.erase_expired(time.time() - config.key_lifetime)
        if erased:
            log.info("event=keys_expired count=%d lifetime_s=%d", erased, config.key_lifetime)
        await trio.sleep(min(EXPIRY_INTERVAL, config.key_lifetime / 2))


async def _report_status(
    notifier: Notifier, config: SiteConfig, links: dict[str, PeerLink], store: KeyStore
) -> None:
    """Keep systemd's STATUS= line saying what the daemon is doing."""
    while True:
        parts = []
        for site, link in links.items():
            ready = sum(store.ready_count(m, s) for m, s in link.params.local_master_pairs())
            state = "up" if link.session_up else "down"
            parts.append(
                f"{site}: session {state}, device {link.device.status.state}, {ready} keys ready"
            )
        notifier.status("; ".join(parts) or "no peers configured")
        await trio.sleep(STATUS_INTERVAL)
