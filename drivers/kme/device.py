"""``Etsi014Device``: QKD keys from a key management entity (KME) that serves ETSI GS QKD 014
over HTTPS with client certificates, at either end of a link.

The model (ETSI014_DEVICES.md gives the operator's view): the KMEs of the two sites already
share keys. At the link master site, ``run`` keeps the sink supplied by calling ``enc_keys``
on the local KME as the master SAE, naming the peer site's SAE as slave. At the link slave
site, the daemon names the IDs the master picked and ``fetch_keys`` collects exactly those
with ``dec_keys``; there ``run`` only checks that the KME answers and keeps ``status``
current. This module holds those role loops, the backoff and the status; the standard's
objects are ``objects``', the connections ``https``'.

Logs go to the ``qkdd.device`` logger, one event per line as ``event key=value``. Key
material is never logged, nor put in an exception message; key IDs are not secret and are
logged at debug level only.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Literal

import trio

from ..base import (
    CANONICAL_KEY_ID,
    DEFAULT_RECONNECT_INITIAL_DELAY,
    DEFAULT_RECONNECT_MAX_DELAY,
    CountingKeySink,
    DeviceStatus,
    FetchByIdDevice,
    KeyDelivery,
    KeySink,
    QkdKey,
)
from ..dedup import DEFAULT_RECENT_IDS
from .https import KmeConnection, kme_ssl_context
from .kme_errors import (
    KmeConfigError,
    KmeError,
    KmeRefusedError,
    KmeResponseError,
    KmeStoreError,
    UnknownKeyIdsError,
    refusal,
)
from .objects import KmeStatus, parse_key_container, parse_kme_url, parse_status

__all__ = ["Etsi014Device", "KmeRole"]

log = logging.getLogger("qkdd.device")

KmeRole = Literal["master", "slave"]

DEFAULT_KEY_SIZE_BITS = 256
#: Keys asked for in one enc_keys call (fewer if the KME's max_key_per_request is lower).
DEFAULT_KEYS_PER_REQUEST = 64
#: Seconds between status calls while there is nothing to fetch.
DEFAULT_POLL_INTERVAL = 1.0
#: Unused keys the master keeps in the sink, when the sink can count them: enough for many
#: batches, while taking no more from the KME than the daemon will use soon.
DEFAULT_BUFFER_TARGET = 1024
#: Bound on connecting, the TLS handshake and one request and its answer.
DEFAULT_REQUEST_TIMEOUT = 10.0


class Etsi014Device(FetchByIdDevice):
    """A QKD link whose keys come from an ETSI GS QKD 014 KME at this site.

    ``role`` must be this site's role on the link: "master" at the link master (it calls
    ``enc_keys`` and fills the sink from ``run``), "slave" at the link slave (the daemon calls
    ``fetch_keys`` with the IDs the master named). ``own_sae_id`` is the SAE ID under which the
    KME knows this daemon (through ``cert_file``), ``peer_sae_id`` the one it knows the peer
    site's daemon by.
    """

    def __init__(
        self,
        url: str,
        *,
        cert_file: str,
        key_file: str | None = None,
        ca_file: str | None = None,
        own_sae_id: str,
        peer_sae_id: str,
        role: KmeRole,
        key_size_bits: int = DEFAULT_KEY_SIZE_BITS,
        keys_per_request: int = DEFAULT_KEYS_PER_REQUEST,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        buffer_target: int = DEFAULT_BUFFER_TARGET,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        reconnect_initial_delay: float = DEFAULT_RECONNECT_INITIAL_DELAY,
        reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
        server_hostname: str | None = None,
        recent_ids: int = DEFAULT_RECENT_IDS,
    ) -> None:
        super().__init__()
        if role not in ("master", "slave"):
            raise ValueError(f"role must be 'master' or 'slave', not {role!r}")
        if not own_sae_id or not peer_sae_id or own_sae_id == peer_sae_id:
            raise ValueError("own_sae_id and peer_sae_id must be two different, non-empty IDs")
        if key_size_bits <= 0 or key_size_bits % 8:
            raise ValueError("key_size_bits must be a positive multiple of 8")
        if keys_per_request < 1 or buffer_target < 1:
            raise ValueError("keys_per_request and buffer_target must be at least 1")
        if poll_interval <= 0 or request_timeout <= 0:
            raise ValueError("poll_interval and request_timeout must be positive")
        self.endpoint = parse_kme_url(url)
        self.url = url
        self.role: KmeRole = role
        self.own_sae_id = own_sae_id
        self.peer_sae_id = peer_sae_id
        self.key_size_bits = key_size_bits
        self.keys_per_request = keys_per_request
        self.poll_interval = poll_interval
        self.buffer_target = buffer_target
        self.reconnect_max_delay = reconnect_max_delay
        self.reconnect_initial_delay = min(reconnect_initial_delay, reconnect_max_delay)

        def make_context() -> ssl.SSLContext:
            return kme_ssl_context(cert_file, key_file, ca_file)

        make_context()  # a configuration error shows at start-up, not as a retry loop
        hostname = server_hostname or self.endpoint.host
        # The status loop and fetch_keys each have their own connection, so a slow status
        # call never delays the keys a batch waits for.
        self._poll_conn = KmeConnection(self.endpoint, make_context, hostname, request_timeout)
        self._fetch_conn = KmeConnection(self.endpoint, make_context, hostname, request_timeout)
        self._delivery = KeyDelivery(self, recent_ids)
        # One fetch at a time, so a fetch sees what the one before it stored and does not
        # ask again for keys the KME has already erased.
        self._fetch_lock = trio.Lock()
        self._sink: KeySink | None = None
        self._unstored: list[QkdKey] = []  # taken from the KME, not yet in the sink
        self._max_per_request: int | None = None  # the KME's, once its status is known
        self._healthy = False
        self.status = DeviceStatus(state="connecting", detail=f"not yet connected to {url}")

    def __repr__(self) -> str:
        return (
            f"Etsi014Device({self.url!r}, role={self.role!r}, own_sae_id={self.own_sae_id!r}, "
            f"peer_sae_id={self.peer_sae_id!r})"
        )

    # -- the reconnect loop --

    async def run(
        self, sink: KeySink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._sink = sink
        delay = self.reconnect_initial_delay
        started = False

        def attempted() -> None:
            nonlocal started
            if not started:
                task_status.started()
                started = True

        try:
            while True:
                self._healthy = False
                error: Exception
                try:
                    if self.role == "master":
                        await self._master_session(sink, attempted)
                    else:
                        await self._slave_session(attempted)
                except KmeError as exc:
                    error = exc
                except Exception as exc:
                    # A fault in this process must not stop key delivery for good; the
                    # traceback goes to the log and the session is retried.
                    log.exception("device.unexpected-error url=%s", self.url)
                    error = exc
                if not isinstance(error, KmeRefusedError):
                    # After a refusal the connection is fine (the KME answered on it);
                    # after anything else the next attempt starts on a fresh one.
                    await self._poll_conn.aclose()
                if self._healthy:
                    delay = self.reconnect_initial_delay
                log.warning(
                    "device.down url=%s role=%s error=%s reason=%r retry_in=%g",
                    self.url,
                    self.role,
                    type(error).__name__,
                    str(error),
                    delay,
                )
                self._update(
                    state="down", detail=f"{error}; retrying in {delay:g} s", keys_buffered=None
                )
                attempted()  # the caller sees this first attempt's outcome in status
                await trio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_delay)
        finally:
            self._sink = None
            with trio.CancelScope(shield=True):
                await self._poll_conn.aclose()
                await self._fetch_conn.aclose()

    def _mark_healthy(self, detail: str, **changes: object) -> None:
        if not self._healthy or self.status.state != "up":
            log.info(
                "device.up url=%s role=%s own_sae=%s peer_sae=%s",
                self.url,
                self.role,
                self.own_sae_id,
                self.peer_sae_id,
            )
        self._healthy = True
        self._update(state="up", detail=detail, **changes)

    async def _status(self, conn: KmeConnection) -> KmeStatus:
        target = self.endpoint.target(self.peer_sae_id, "status")
        status, body = await conn.call("GET", target, None)
        if status != 200:
            raise refusal(status, body, "a status request", self.url)
        st = parse_status(body)
        if st.max_key_per_request:
            self._max_per_request = st.max_key_per_request
        return st

    # -- master: keep the sink supplied --

    async def _master_session(self, sink: KeySink, attempted: Callable[[], None]) -> None:
        while True:
            if self._unstored:  # before anything else, KME or not
                await self._store_taken(sink)
            st = await self._status(self._poll_conn)
            self._check_master_status(st)
            wanted = self._wanted(st, sink)
            if wanted:
                await self._take(wanted, st, sink)
            self._mark_healthy(
                self._master_detail(st),
                keys_buffered=st.stored_key_count,
                key_size_bits=self.key_size_bits,
            )
            attempted()
            if not wanted:  # else ask again at once: the buffer may still be short
                await trio.sleep(self.poll_interval)

    def _check_master_status(self, st: KmeStatus) -> None:
        if st.master_sae_id is not None and st.master_sae_id != self.own_sae_id:
            raise KmeConfigError(
                f"the KME at {self.url} knows this client as SAE {st.master_sae_id!r}, but "
                f"own_sae_id is {self.own_sae_id!r}; fix own_sae_id or use the client "
                "certificate the KME maps to it"
            )
        if st.slave_sae_id is not None and st.slave_sae_id != self.peer_sae_id:
            raise KmeConfigError(
                f"the KME at {self.url} reports status for slave SAE {st.slave_sae_id!r} "
                f"when asked for {self.peer_sae_id!r}"
            )
        low, high = st.min_key_size, st.max_key_size
        if (low is not None and self.key_size_bits < low) or (
            high is not None and self.key_size_bits > high
        ):
            raise KmeConfigError(
                f"the KME at {self.url} serves keys of {'?' if low is None else low} to "
                f"{'?' if high is None else high} bits; "
                f"key_size_bits = {self.key_size_bits} is outside that range, change it"
            )

    def _wanted(self, st: KmeStatus, sink: KeySink) -> int:
        """How many keys to take now: room in the sink, the KME's per-request limit, and
        what the KME holds (counted in its own key size)."""
        wanted = self.keys_per_request
        if isinstance(sink, CountingKeySink):
            wanted = min(wanted, self.buffer_target - sink.qkd_keys_buffered())
        if st.max_key_per_request:
            wanted = min(wanted, st.max_key_per_request)
        available = st.stored_key_count * st.key_size // self.key_size_bits
        return max(0, min(wanted, available))

    def _master_detail(self, st: KmeStatus) -> str:
        kme = f"KME {st.source_kme_id!r}" if st.source_kme_id else "KME"
        detail = (
            f"{kme} at {self.url}: keys for {self.own_sae_id} -> {self.peer_sae_id}, "
            f"{st.stored_key_count} of {st.key_size} bits ready"
        )
        if st.stored_key_count * st.key_size < self.key_size_bits:
            detail += "; waiting for the QKD link to deliver more"
        return detail

    async def _take(self, number: int, st: KmeStatus, sink: KeySink) -> None:
        request: dict[str, int] = {"number": number}
        # Ask for a size only when it is not the KME's default: some KMEs serve one size.
        if self.key_size_bits != st.key_size:
            request["size"] = self.key_size_bits
        status, body = await self._poll_conn.call(
            "POST",
            self.endpoint.target(self.peer_sae_id, "enc_keys"),
            json.dumps(request).encode(),
        )
        if status != 200:
            raise refusal(status, body, f"a request for {number} keys", self.url)
        keys = parse_key_container(body)
        if len(keys) > number:
            raise KmeResponseError(
                f"the KME at {self.url} sent {len(keys)} keys when asked for {number}"
            )
        fresh = self._delivery.sort(keys).keys
        if len(fresh) < len(keys):
            # Dropped: the daemon may already have used the first copy.
            log.error(
                "device.key-id-reused url=%s count=%d action=dropped "
                "hint='the KME handed out key IDs it had handed out before; report this'",
                self.url,
                len(keys) - len(fresh),
            )
        self._unstored += fresh
        await self._store_taken(sink)

    async def _store_taken(self, sink: KeySink) -> None:
        """Store the keys taken from the KME. On failure they stay here and are stored before
        any more are taken: the KME has handed them out and will not give them again."""
        keys = self._unstored
        if not keys:
            return

        def failed(exc: Exception) -> KmeStoreError:
            return KmeStoreError(
                f"storing {len(keys)} keys taken from the KME failed ({exc}); they are held "
                "in memory and stored again before more are taken"
            )

        await self._delivery.store(sink, keys, failed)
        self._unstored = []
        log.debug(
            "device.keys url=%s stored=%d key_ids=%s",
            self.url,
            len(keys),
            ",".join(k.key_id for k in keys),
        )

    # -- slave: health check, and keys by ID --

    async def _slave_session(self, attempted: Callable[[], None]) -> None:
        while True:
            self._mark_healthy(await self._slave_check())
            attempted()
            await trio.sleep(self.poll_interval)

    async def _slave_check(self) -> str:
        kme = "KME"
        try:
            st = await self._status(self._poll_conn)
        except KmeRefusedError as exc:
            # The standard has the master SAE ask for status; a KME may refuse the slave
            # with 400 or 404. It answered over mutual TLS, which is what is checked here.
            if exc.status not in (400, 404):
                raise
        else:
            if st.source_kme_id:
                kme = f"KME {st.source_kme_id!r}"
        return f"{kme} at {self.url} answers; keys from {self.peer_sae_id} are fetched by ID"

    async def fetch_keys(self, key_ids: Sequence[str]) -> None:
        """Collect these keys from the KME with ``dec_keys`` and store them in the sink of the
        running ``run``; see ``FetchByIdDevice.fetch_keys``.

        IDs this device stored recently are skipped (the KME has erased them). Raises
        ``UnknownKeyIdsError`` naming the IDs the KME does not hold, after storing the ones
        it does; ``KmeUnreachableError``, ``KmeRefusedError`` or ``KmeResponseError`` when
        the KME cannot be used; ``KmeStoreError`` when the sink fails (those keys are lost:
        the KME erased them when it handed them out)."""
        if self.role != "slave":
            raise KmeConfigError(
                "fetch_keys is for the link slave; this device is configured as the master"
            )
        sink = self._sink
        if sink is None:
            raise KmeError("fetch_keys needs the device running: start run(sink) first")
        for key_id in key_ids:
            if not isinstance(key_id, str) or not CANONICAL_KEY_ID.fullmatch(key_id):
                raise ValueError(f"key ID {key_id!r} is not a canonical lowercase UUID")
        async with self._fetch_lock:
            await self._fetch(sink, key_ids)

    async def _fetch(self, sink: KeySink, key_ids: Sequence[str]) -> None:
        wanted = [k for k in dict.fromkeys(key_ids) if k not in self._delivery]
        if not wanted:
            return
        chunk = max(1, min(self.keys_per_request, self._max_per_request or self.keys_per_request))
        missing: list[str] = []
        reason = ""
        stored = 0
        for start in range(0, len(wanted), chunk):
            part = wanted[start : start + chunk]
            try:
                keys = await self._dec_keys(part)
            except KmeRefusedError as exc:
                if exc.status not in (400, 404):
                    raise
                reason = exc.message
                keys = []
                if len(part) == 1:
                    missing += part
                else:
                    # The standard's dec_keys is all or nothing: ask one by one to learn
                    # which IDs the KME lacks, and still collect the others.
                    for key_id in part:
                        try:
                            keys += await self._dec_keys([key_id])
                        except KmeRefusedError as one:
                            if one.status not in (400, 404):
                                raise
                            missing.append(key_id)
                            reason = one.message
            if keys:
                await self._store_fetched(sink, keys)
                stored += len(keys)
        log.debug(
            "device.fetched url=%s requested=%d stored=%d missing=%d",
            self.url,
            len(wanted),
            stored,
            len(missing),
        )
        if missing:
            log.info(
                "device.keys-not-held url=%s master_sae=%s count=%d",
                self.url,
                self.peer_sae_id,
                len(missing),
            )
            log.debug("device.keys-not-held url=%s key_ids=%s", self.url, ",".join(missing))
            raise UnknownKeyIdsError(missing, self.peer_sae_id, self.url, reason)

    async def _dec_keys(self, key_ids: Sequence[str]) -> list[QkdKey]:
        body = json.dumps({"key_IDs": [{"key_ID": key_id} for key_id in key_ids]}).encode()
        status, answer = await self._fetch_conn.call(
            "POST", self.endpoint.target(self.peer_sae_id, "dec_keys"), body
        )
        if status != 200:
            raise refusal(status, answer, f"a request for {len(key_ids)} keys by ID", self.url)
        by_id = {key.key_id: key for key in parse_key_container(answer)}
        got = set(by_id)
        if got != set(key_ids):
            extra = sorted(got - set(key_ids))
            lacking = sorted(set(key_ids) - got)
            raise KmeResponseError(
                f"the KME at {self.url} answered a request for keys by ID with other keys "
                f"(not sent: {', '.join(lacking) or 'none'}; not asked for: "
                f"{', '.join(extra) or 'none'})"
            )
        # In the order asked for: the key store keeps keys in arrival order.
        return [by_id[key_id] for key_id in key_ids]

    async def _store_fetched(self, sink: KeySink, keys: list[QkdKey]) -> None:
        def failed(exc: Exception) -> KmeStoreError:
            return KmeStoreError(
                f"storing {len(keys)} keys fetched from the KME failed ({exc}); they are "
                "lost (the KME erased them when it handed them out)"
            )

        await self._delivery.store(sink, keys, failed)
