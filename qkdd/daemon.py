"""The daemon's Trio wiring, top to bottom, in one place.

run_daemon(config)
  self-test the crypto backend, load the identity, open the key store with group commit:
    every answer, peer send, device acknowledgement and PSK install first awaits the
    store's durability barrier (GroupCommit.durable, qkdd.durability)
  nursery
    per peer: QKD device -> key store            (PeerLink.device.run)
    per peer: dial it while there is no session   (PeerLink.dial_forever)
    the QKD network, if the site relays or has    (RelayNode.run: link state, routes,
      [[remote]] sites                              routed streams, relayed material;
                                                    remote sites are links too:
                                                    RemoteLink, answer_routed_stream)
    peer listener: responder handshakes           (serve_peers)
    ETSI GS QKD 014 API on the Unix socket        (serve_unix; bound here, or
                                                   passed by qkdd.socket), with the
                                                   site status and metrics (qkdd.admin),
                                                   messages (qkdd.messaging.routes) and
                                                   key events (qkdd.events)
    the ETSI API over TLS, if configured           (serve_tls)
    SKIP for routers over TLS, if configured       (serve_skip: [skip], qkdd.skip)
    Prometheus metrics on their own listener,     (serve_metrics: GET /metrics only)
      if configured ([metrics])
    key expiry, STATUS= lines, watchdog pings      (_expire_keys, _report_status, _watchdog)
    key events from links and pools                (_watch_links_and_pools)
    a failed sync of the store ends the daemon     (GroupCommit.watch)
    the first WireGuard PSK of each binding, then its rotation   (PskRotator)
    the first IPsec PPK of each [[ipsec]] binding, then its rotation (PpkRotator)
    READY=1 to systemd, then wait for a signal
  Peer calls (key assignments, messages, WireGuard installs) are answered inside each
  peer session by the handler registered for their kind.
  SIGHUP: re-read the config, apply what can change live, say what needs a restart.
  SIGTERM/SIGINT: STOPPING=1, cancel everything (in-flight work is transactional),
  close the store.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypedDict

import trio

from qkdd.admin import admin_routes
from qkdd.config import (
    ConfigError,
    RelayedDeviceConfig,
    SiteConfig,
    TlsConfig,
    config_warnings,
    load_config,
)
from qkdd.constants import EVENT_POLL_INTERVAL, EXPIRY_INTERVAL, STATUS_INTERVAL
from qkdd.crypto import PqcBackend, SigningKey
from qkdd.crypto.select import select_backend
from qkdd.durability import Durable, GroupCommit
from qkdd.etsi014.hand_outs import GatheredHandOuts
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.key_pool import KeyPool
from qkdd.events import EventBus, PoolWatch, chunks, event_routes
from qkdd.http_server.accept import api_connection_table
from qkdd.http_server.limits import ConnectionTable
from qkdd.http_server.serving import BeforeSend, Observe
from qkdd.http_server.tls import sae_ids_from_certificate, serve_tls
from qkdd.http_server.unix_socket import serve_unix
from qkdd.identity import load_identity, read_key_encryption_key
from qkdd.ipsec.ipsec_wiring import make_ipsec_rotators
from qkdd.ipsec.ppk_rotator import PpkRotator
from qkdd.keystore import ErasedKey, KeyStore, StoreError
from qkdd.messaging.inbox import Inbox
from qkdd.messaging.messenger import Messenger
from qkdd.messaging.routes import SEND_PREFIX, message_routes, send_body_limit
from qkdd.metrics import SiteMetrics
from qkdd.metrics_listener import serve_metrics
from qkdd.peer.calls import CallKind
from qkdd.peer_listener import serve_peers
from qkdd.peering import CallHandler, HandshakeObserver, PeerLink
from qkdd.progress import ProgressWatch
from qkdd.relay_node import RelayNode
from qkdd.remote_link import RemoteLink, answer_routed_stream
from qkdd.rotation.key_rotator import KeyRotator
from qkdd.skip.listener import serve_skip
from qkdd.skip.provider import SkipProvider
from qkdd.skip.skip_config import SkipConfig
from qkdd.status import RecentErrors, site_status
from qkdd.store_pool import StoreKeyPool
from qkdd.systemd import Notifier, listen_fds_with_names, watchdog_interval
from qkdd.wireguard.wireguard_wiring import make_wireguard_rotators

log = logging.getLogger("qkdd.daemon")

STORE_FILE: Final = "keys.sqlite3"


class LiveConfig:
    """The config in force; SIGHUP swaps in what can change without a restart."""

    RELOADABLE = ("consumers", "key_lifetime", "max_keys_per_request")  # incl. quotas

    def __init__(self, config: SiteConfig) -> None:
        self.config = config

    def reload(self) -> tuple[list[str], list[str]]:
        """Re-read the file; return (keys applied, keys that need a restart)."""
        new = load_config(self.config.file)
        reloadable = set(self.RELOADABLE)
        if (new.local_sae_ids, new.talking_pairs()) != (
            self.config.local_sae_ids,
            self.config.talking_pairs(),
        ):
            # Who may act as an SAE can change live; which SAEs exist and which pairs are
            # filled shape the links.
            reloadable.discard("consumers")
        changed = [
            f.name
            for f in dataclasses.fields(SiteConfig)
            if getattr(new, f.name) != getattr(self.config, f.name)
        ]
        applied = [name for name in changed if name in reloadable]
        self.config = dataclasses.replace(
            self.config, **{name: getattr(new, name) for name in applied}
        )
        return applied, [name for name in changed if name not in reloadable]


async def run_daemon(
    config: SiteConfig, *, stop_requested: Callable[[], signal.Signals | None] = lambda: None
) -> None:
    """Run the site until SIGTERM or SIGINT. ``stop_requested`` names a stop signal that
    arrived before the daemon listened for signals itself (while it was starting)."""
    os.umask(0o077)  # every file the daemon creates (store, WAL, socket) is private
    notifier = Notifier()
    backend = select_backend(config.pqc_backend)
    _self_test(backend)
    signing_key = load_identity(config.identity_key, backend)
    store = KeyStore(
        config.state_directory / STORE_FILE,
        read_key_encryption_key(config.key_encryption_key),
        group_commit=True,
    )
    barrier = GroupCommit(store)
    live = LiveConfig(config)
    metrics = SiteMetrics(config.site_id, backend.name, (peer.site_id for peer in config.peers))
    # What every link's sessions need: the store, the crypto, the identity, the metrics.
    session_needs = _SessionNeeds(
        store=store,
        backend=backend,
        signing_key=signing_key,
        on_handshake=metrics.record_handshake,
        durable=barrier.durable,
    )
    direct = {peer.site_id: PeerLink(config, peer, **session_needs) for peer in config.direct_peers}
    # The QKD network (relaying, remote sites) runs over the direct links' sessions.
    node = _relay_node(config, direct, store, barrier.durable)
    remote: dict[str, PeerLink] = {}
    if node is not None:
        remote = {
            peer.site_id: RemoteLink(config, peer, node, **session_needs)
            for peer in config.remote_peers
        }
        # Routed streams remote sites open here: the responder handshake, then the session.
        node.ends.accept = functools.partial(
            answer_routed_stream,
            links=remote,
            config=config,
            backend=backend,
            signing_key=signing_key,
            on_handshake=metrics.record_handshake,
            durable=barrier.durable,
        )
    links = direct | remote
    metrics.watch(links, store)
    recent_errors = RecentErrors()

    def keys_taken() -> None:
        for link in links.values():
            link.store_changed.set()  # its agreement refills the pools it serves

    store.on_keys_taken = keys_taken

    async def call_peer(site: str, kind: int, body: bytes, timeout: float) -> bytes:
        return await links[site].call(kind, body, timeout=timeout)

    # What the API serves beside the links; each answers the peer calls of its kind.
    store_pool = StoreKeyPool(live, store, lambda site: links[site].why_unavailable(), call_peer)
    messenger = Messenger(
        live,
        store,
        Inbox(store, config.message_max_pending),
        lambda site: links[site].why_unavailable(),
        call_peer,
        max_size=config.message_max_size,
    )
    for site, link in links.items():
        link.call_handlers[CallKind.KEY_ASSIGN] = _sync_call_handler(
            functools.partial(store_pool.accept_assignment, site)
        )
        link.call_handlers[CallKind.MESSAGE] = _sync_call_handler(
            functools.partial(messenger.accept_call, site)
        )
    # WG_INSTALL where this site is slave.
    rotators = make_wireguard_rotators(config.wireguard, links, store, barrier.durable)
    # IPSEC_INSTALL where this site is slave.
    ipsec_rotators = make_ipsec_rotators(config.ipsec, links, store, barrier.durable)
    pool = metrics.counting_pool(store_pool)
    metrics.watch_quotas(
        lambda: {sae: store_pool.quota_state(sae) for sae in live.config.local_sae_ids}
    )
    bus = EventBus()
    store.on_erased = functools.partial(_publish_erased, bus)

    def status() -> dict[str, object]:
        site = site_status(
            site_id=config.site_id,
            backend=backend.name,
            links=links,
            store=store,
            recent_errors=recent_errors.events(),
            wireguard=[rotator.status() for rotator in rotators.values()],
        )
        if node is not None:
            site["network"] = node.status()
        return _with_ipsec(ipsec_rotators, site)

    def is_local_sae(sae: str) -> bool:
        return sae in live.config.local_sae_ids

    # enc_keys of the requests ready at one moment share a store transaction.
    hand_outs = GatheredHandOuts(store.handing_out, barrier)
    handler = RequestHandler(
        pool,
        extensions=admin_routes(status, metrics.exposition)
        | message_routes(messenger, is_local_sae)
        | event_routes(bus, is_local_sae),
        body_limits={SEND_PREFIX: send_body_limit(config.message_max_size)},
        hand_outs=hand_outs,
    )
    # The TLS listener's callers are remote SAEs: the ETSI API only, no site status.
    etsi_only = RequestHandler(pool, hand_outs=hand_outs)
    # Both API listeners draw on one budget of file descriptors.
    api_connections = api_connection_table()

    def identify(uid: int, gid: int) -> frozenset[str]:
        return live.config.sae_ids_for_uid(uid)

    api_listener = _activated_api_listener()
    for warning in config_warnings(config):
        log.warning("event=config_warning reason=%r", warning)
    log.info(
        "event=starting site=%s backend=%s peers=%s api_socket=%s",
        config.site_id,
        backend.name,
        ",".join(links) or "-",
        "from systemd" if api_listener else config.api_socket,
    )
    try:
        with (
            recent_errors.installed("qkdd"),
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
        ):
            asked_while_starting = stop_requested()
            if asked_while_starting is not None:
                log.info("event=stopping signal=%s", asked_while_starting.name)
                notifier.stopping()
                return
            async with trio.open_nursery() as nursery:
                for link in links.values():
                    await nursery.start(link.device.run, link.sink)
                    nursery.start_soon(link.dial_forever)  # both ends of a link dial
                if node is not None:
                    await nursery.start(node.run)
                await nursery.start(
                    functools.partial(
                        serve_peers,
                        config,
                        direct,
                        backend,
                        signing_key,
                        on_handshake=metrics.record_handshake,
                        durable=barrier.durable,
                    )
                )
                await nursery.start(
                    functools.partial(
                        serve_unix,
                        str(config.api_socket),
                        handler,
                        identify,
                        mode=config.api_socket_mode,
                        listener=api_listener,
                        observe=metrics.observe_request,
                        connections=api_connections,
                        before_send=barrier.durable,
                    )
                )
                if config.api_tls is not None:
                    await nursery.start(
                        _tls_listener(
                            config.api_tls,
                            etsi_only,
                            metrics.observe_request,
                            api_connections,
                            barrier.durable,
                        )
                    )
                if config.skip is not None:  # SKIP for routers: the same pool and barrier
                    await nursery.start(
                        _skip_listener(config.skip, live, pool, api_connections, barrier.durable)
                    )
                if config.metrics is not None:  # Prometheus: /metrics only, no key API
                    await nursery.start(serve_metrics, config.metrics, metrics.exposition)
                nursery.start_soon(_report_status, notifier, config, links, store)
                nursery.start_soon(_expire_keys, live, store)
                nursery.start_soon(_watch_links_and_pools, bus, links, store)
                nursery.start_soon(barrier.watch)
                period = watchdog_interval()
                if period is not None:
                    nursery.start_soon(_watchdog, notifier, ProgressWatch(links, store), period)
                # The first WireGuard PSK (fresh, or random to fail closed) is in place
                # before READY, so no tunnel runs without one.
                await _first_keys(notifier, rotators, "WireGuard PSK", "wireguard_ready")
                await _first_keys(notifier, ipsec_rotators, "IPsec PPK", "ipsec_ready")
                for ipsec_rotator in ipsec_rotators.values():
                    nursery.start_soon(ipsec_rotator.run)
                for rotator in rotators.values():
                    nursery.start_soon(rotator.run)
                notifier.ready()
                log.info("event=ready site=%s", config.site_id)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        _reload(live, notifier)
                        continue
                    log.info("event=stopping signal=%s", signal.Signals(signum).name)
                    notifier.stopping()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        barrier.close()
        store.close()
        log.info("event=stopped site=%s", config.site_id)


class _SessionNeeds(TypedDict):
    """What every link's sessions are built with."""

    store: KeyStore
    backend: PqcBackend
    signing_key: SigningKey
    on_handshake: HandshakeObserver
    durable: Durable


def _relay_node(
    config: SiteConfig, direct: dict[str, PeerLink], store: KeyStore, durable: Durable
) -> RelayNode | None:
    """The site's part in the QKD network, if it relays or has remote sites."""
    if not config.relay_pad_bytes:
        return None
    static = {
        peer.site_id: peer.device.via
        for peer in config.remote_peers
        if isinstance(peer.device, RelayedDeviceConfig) and peer.device.via
    }
    return RelayNode(config.site_id, direct, store, durable, static_next_hops=static)


def _sync_call_handler(answer: Callable[[bytes], bytes]) -> CallHandler:
    async def handler(body: bytes) -> bytes:
        return answer(body)

    return handler


def _tls_listener(
    tls: TlsConfig,
    handler: RequestHandler,
    observe: Observe,
    connections: ConnectionTable,
    before_send: BeforeSend,
) -> Callable[..., Awaitable[None]]:
    """The ETSI 014 API over TLS 1.3, callers identified by client certificate."""
    host, port = tls.listen
    return functools.partial(
        serve_tls,
        host,
        port,
        handler,
        functools.partial(sae_ids_from_certificate, allowed=tls.sae_by_name),
        cert_file=str(tls.certificate),
        key_file=str(tls.private_key),
        client_ca_file=str(tls.client_ca),
        observe=observe,
        connections=connections,
        before_send=before_send,
    )


def _skip_listener(
    skip: SkipConfig,
    live: LiveConfig,
    pool: KeyPool,
    connections: ConnectionTable,
    before_send: BeforeSend,
) -> Callable[..., Awaitable[None]]:
    """SKIP (draft-cisco-skip) over TLS 1.3, callers identified by client certificate; it
    lists the remote systems whose pair with the caller's SAE this site fills pools for."""
    provider = SkipProvider(
        pool,
        dict(skip.remote_systems),
        talks_to=lambda local, remote: (local, remote) in live.config.talking_pairs(),
        random_bytes=os.urandom if skip.entropy else None,
    )
    return functools.partial(
        serve_skip, skip, provider, connections=connections, before_send=before_send
    )


def _activated_api_listener() -> trio.SocketListener | None:
    """The API socket passed by qkdd.socket (LISTEN_FDS), if systemd activated us."""
    sockets = listen_fds_with_names()
    sock = sockets.get("api") or (next(iter(sockets.values())) if len(sockets) == 1 else None)
    if sock is None:
        return None
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _reload(live: LiveConfig, notifier: Notifier) -> None:
    """Apply what SIGHUP can; a reload that fails for any reason leaves the running config
    in force and the daemon serving."""
    notifier.reloading()
    try:
        applied, restart = live.reload()
    except (ConfigError, OSError) as exc:
        log.error("event=reload_failed reason=%r kept='the running config'", str(exc))
    except Exception as exc:  # a bug in reloading must not stop the key service
        log.exception(
            "event=reload_failed reason=%r kept='the running config'",
            f"{type(exc).__name__}: {exc}",
        )
    else:
        log.info(
            "event=reloaded applied=%s needs_restart=%s",
            ",".join(applied) or "-",
            ",".join(restart) or "-",
        )
    notifier.ready()


async def _watchdog(notifier: Notifier, watch: ProgressWatch, period: float) -> None:
    """Ping systemd only while the key pipeline progresses or idles for a known reason (and
    the store answers): a wedged pipeline stops the pings, and systemd restarts us."""
    while True:
        try:
            problem = watch.problem(trio.current_time())
        except StoreError as exc:
            problem = str(exc)
        if problem is None:
            notifier.watchdog()
        else:
            log.error("event=watchdog_withheld reason=%r", problem)
        await trio.sleep(period)


def _self_test(backend: object) -> None:
    from qkdd.crypto import selftest

    selftest.run_self_tests(backend)  # type: ignore[arg-type]


async def _expire_keys(live: LiveConfig, store: KeyStore) -> None:
    """Erase keys that waited longer than ``store.key_lifetime`` for their application."""
    while True:
        lifetime = live.config.key_lifetime
        erased = store.erase_expired(time.time() - lifetime)
        if erased:
            log.info("event=keys_expired count=%d lifetime_s=%d", erased, lifetime)
        await trio.sleep(min(EXPIRY_INTERVAL, lifetime / 2))


async def _first_keys(
    notifier: Notifier, rotators: Mapping[str, KeyRotator[Any, Any]], tunnel: str, event: str
) -> None:
    """The first key of each binding of one tunnel kind (or none, failing closed) before
    READY, all bindings at once."""
    if not rotators:
        return
    notifier.status(f"installing the first {tunnel} of {len(rotators)} binding(s)")
    async with trio.open_nursery() as nursery:
        for name, rotator in rotators.items():

            async def first(name: str = name, rotator: KeyRotator[Any, Any] = rotator) -> None:
                installed = await rotator.first_install()
                log.info("event=%s binding=%s installed=%r", event, name, installed)

            nursery.start_soon(first)


def _with_ipsec(rotators: dict[str, PpkRotator], status: dict[str, object]) -> dict[str, object]:
    """The site status with each IPsec binding's row (only when there are bindings)."""
    if rotators:
        status["ipsec"] = [rotator.status() for rotator in rotators.values()]
    return status


def _publish_erased(bus: EventBus, reason: str, keys: list[ErasedKey]) -> None:
    """Tell subscribers which keys were erased uncollected, per SAE pair."""
    by_pair: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        by_pair.setdefault((key.master_sae, key.slave_sae), []).append(key.key_id)
    for (master, slave), key_ids in sorted(by_pair.items()):
        for part in chunks(key_ids):
            bus.publish(
                f"keys_{reason}", master_sae=master, slave_sae=slave, details={"key_IDs": part}
            )


async def _watch_links_and_pools(
    bus: EventBus, links: dict[str, PeerLink], store: KeyStore
) -> None:
    """Publish link_up/link_down and keys_available/pool_low as the links and pools change."""
    session_up = {site: False for site in links}
    pools: dict[tuple[str, str, str], PoolWatch] = {}
    while True:
        for site, link in links.items():
            if link.session_up != session_up[site]:
                session_up[site] = link.session_up
                if link.session_up:
                    bus.publish("link_up", peer_site=site)
                else:
                    bus.publish("link_down", peer_site=site, details={"reason": link.last_error})
            for master, slave in link.params.local_master_pairs():
                watch = pools.setdefault(
                    (site, master, slave), PoolWatch(max(1, link.params.pool_size // 4))
                )
                ready = store.ready_count(master, slave)
                newest = store.newest_ready_at(master, slave) if ready != watch.last else None
                for kind, details in watch.reading(ready, newest):
                    bus.publish(
                        kind, peer_site=site, master_sae=master, slave_sae=slave, details=details
                    )
        await trio.sleep(EVENT_POLL_INTERVAL)


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
