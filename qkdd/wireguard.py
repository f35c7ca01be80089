"""WireGuard pre-shared keys kept fresh from hybrid keys.

This module owns one thing: for each configured binding (a WireGuard interface and one
peer on it), keeping that peer's pre-shared key (PSK) set to a key both sites derived from
the same hybrid key, and failing closed when no fresh key can be had. Wiring it into the
daemon (the store, the peer channel, the status view) is not done here.

Theory of operation
-------------------
The link's master site drives every rotation. It takes one ready hybrid key from its
store, asks the peer site over the authenticated peer channel to install that key ID for
the binding, and once the peer has answered OK it installs the same key locally. The
peer takes the key by ID from its own store. Both derive the PSK with :func:`derive_psk`,
so each site holds the same 32 bytes without the PSK ever crossing the wire.

Three layers, each testable alone:

- :class:`PskPolicy` is the decision table, sans-IO: time is an argument. It records fresh
  installs, failed attempts and random installs, and answers when to try next and whether
  the installed key must be replaced by a random one.
- :class:`~qkdd.wg_tool.WgInstaller` (``qkdd/wg_tool.py``) is the only code that runs
  ``wg``. The PSK goes to ``wg`` on stdin, never on its command line.
- :class:`PskRotator` is the thin Trio loop that asks the policy what to do and does it.

Keys: the driving site takes a hybrid key only while the peer can be asked, in the same
step that sends the call naming it. An attempt that cannot reach the peer consumes nothing;
a key named in a call that went out is consumed whatever the answer (exactly once).
Repeated failures of one kind are logged once (then at DEBUG) until a rotation succeeds.

Fail closed: the PSK is set to 32 random bytes that nobody else holds and the peer's
current WireGuard session is ended with it, so no handshake completes and traffic stops at
once, instead of flowing under a key older than the operator allowed (``max_key_age``), or
under no PSK at all when the service starts.
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from qkdd import labels
from qkdd.crypto import hkdf
from qkdd.hybrid import lp
from qkdd.wg_tool import PSK_SIZE, KeyMaterialError, PskInstaller, WgInstaller, WireGuardError
from qkdd.wg_tool import WgCommandError as WgCommandError  # re-exported: the errors of
from qkdd.wg_tool import WgNotFoundError as WgNotFoundError  # WireGuard PSKs, in one place

log = logging.getLogger("qkdd.wireguard")

PUBLIC_KEY_SIZE: Final = 32  # a Curve25519 public key
# WireGuard itself starts a new handshake every 120 s (REKEY_AFTER_TIME); a new PSK takes
# effect at the next handshake, so rotating more often buys nothing.
DEFAULT_INTERVAL: Final = 120.0
DEFAULT_MAX_KEY_AGE: Final = 600.0
DEFAULT_STARTUP_TIMEOUT: Final = 15.0
# After a failed rotation: try again soon, long before the key gets too old, but do not
# hammer an empty pool or a peer that is down.
RETRY_BACKOFF: Final = 5.0
# Before the first key the service is not ready yet; keys usually arrive within seconds of
# the first peer session, so waiting a full RETRY_BACKOFF would only delay start-up.
STARTUP_RETRY_BACKOFF: Final = 1.0
# Upper bound on one request to the peer: a hung peer must not stall the loop that
# enforces max_key_age.
ANNOUNCE_TIMEOUT: Final = 10.0

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace; a
# leading '-' is refused too so the name can never be read as an option by `wg`.
_INTERFACE_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,14}$")


class BindingValueError(ValueError):
    """A bad ``[[wireguard]]`` value: which key, and what was expected (the config loader
    reports both, naming the file)."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"wireguard.{key}: expected {expected}")
        self.key = key
        self.expected = expected


class NotTheDrivingSiteError(WireGuardError):
    """An announced key reached the site that drives the binding's rotations itself."""


class PeerUnreachableError(WireGuardError):
    """The peer site cannot be asked now (no session), or its session ended mid-call."""


class NoFreshKeyError(WireGuardError):
    """No ready hybrid key for the binding's SAE pair."""


class PeerTooSlowError(WireGuardError):
    """The peer site did not confirm the install in time."""


# --------------------------------------------------------------------------------------
# Configuration


def _is_number(value: object) -> bool:
    # bool is an int subclass; `interval = true` is a config mistake, not 1 second.
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class WireGuardBinding:
    """One ``[[wireguard]]`` entry: a peer on a local interface whose PSK qkdd keeps fresh.

    Checked on construction; a bad value raises ValueError naming the key and what is
    expected. ``name`` must be the same at both sites: it names the binding on the peer
    channel and is bound into every PSK.
    """

    name: str
    interface: str
    peer_public_key: str
    peer_site: str
    local_sae: str
    remote_sae: str
    interval: float = DEFAULT_INTERVAL
    max_key_age: float = DEFAULT_MAX_KEY_AGE
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    wg_command: str = "wg"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BindingValueError (a ValueError) for the first bad value, with what was
        expected."""
        for key in ("name", "peer_site", "local_sae", "remote_sae"):
            value = getattr(self, key)
            if not isinstance(value, str) or not _ID_PATTERN.match(value):
                raise BindingValueError(
                    key,
                    "an identifier (letters, digits, '.', '_', ':', '-'; at most 64 "
                    f"characters), got {value!r}",
                )
        if not isinstance(self.interface, str) or not _INTERFACE_PATTERN.match(self.interface):
            raise BindingValueError(
                "interface",
                "a network interface name of at most 15 characters such as 'wg0', "
                f"got {self.interface!r}",
            )
        if not _is_wireguard_key(self.peer_public_key):
            raise BindingValueError(
                "peer_public_key",
                "the peer's WireGuard public key, base64 of 32 bytes as `wg pubkey` prints "
                f"it, got {self.peer_public_key!r}",
            )
        for key in ("interval", "max_key_age", "startup_timeout"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise BindingValueError(key, "a positive number of seconds")
        if self.max_key_age <= self.interval:
            # Otherwise every key would be too old before its successor is even due.
            raise BindingValueError(
                "max_key_age",
                f"more than interval ({self.interval:g} s), got {self.max_key_age:g}",
            )
        if not isinstance(self.wg_command, str) or not self.wg_command.strip():
            raise BindingValueError("wg_command", "the path or name of `wg`")


def _is_wireguard_key(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    # Canonical form only: `wg` prints keys this way, and a non-canonical spelling of the
    # same key would make two configs look different.
    return len(raw) == PUBLIC_KEY_SIZE and base64.b64encode(raw).decode() == value


# --------------------------------------------------------------------------------------
# Key derivation


def derive_psk(material: bytes, binding_name: str, key_id: str) -> bytes:
    """The 32-byte PSK for ``binding_name`` from the hybrid key ``key_id``.

    ``PSK = HKDF-SHA256(salt = "", ikm = material,
    info = lp(LABEL_WIREGUARD_PSK) || lp(binding_name) || lp(key_id), 32)``

    The hybrid key is already uniform and bound to both sites and SAEs; the HKDF step adds
    domain separation (a WireGuard PSK never equals a key an application could also hold)
    and binds the PSK to the binding, so one key can never serve two tunnels alike.
    """
    if len(material) < PSK_SIZE:
        # A PSK never holds less entropy than its own length.
        raise KeyMaterialError(
            f"key {key_id} has {len(material) * 8} bits; a WireGuard PSK needs a hybrid key "
            f"of at least {PSK_SIZE * 8} bits (key_size of the binding's SAE pair)"
        )
    info = lp(labels.LABEL_WIREGUARD_PSK) + lp(binding_name.encode()) + lp(key_id.encode())
    return hkdf(b"", material, info, PSK_SIZE)


# --------------------------------------------------------------------------------------
# The policy (sans-IO)


class PskState(enum.Enum):
    """What the installed PSK is, as the status view shows it."""

    PENDING = "pending"  # nothing installed yet (start-up)
    FRESH = "fresh"  # a key from a hybrid key, recent, and the last rotation worked
    STALE = "stale"  # a key from a hybrid key, but a rotation failed or is overdue
    FAIL_CLOSED = "fail-closed"  # a random key: the tunnel is down on purpose


class PskAction(enum.Enum):
    """What :meth:`PskPolicy.poll` asks for now."""

    WAIT = "wait"  # nothing to do before wake_at()
    ROTATE = "rotate"  # driving site: rotate to a fresh key now
    FAIL_CLOSED = "fail-closed"  # replace the installed key with a random one now


class _Installed(enum.Enum):
    NOTHING = "nothing"
    FRESH_KEY = "fresh-key"
    RANDOM_KEY = "random-key"


class PskPolicy:
    """The rotation and fail-closed decisions for one binding at one site; no clock, no I/O.

    Times are seconds on any monotonic clock, passed in by the caller. The whole table:

    ==========================  =========================================================
    event                       effect
    ==========================  =========================================================
    created at ``now``          PENDING; driving site: attempt due now; fail closed due
                                at ``now + startup_timeout``
    ``fresh_installed``         FRESH; next attempt at ``now + interval``; fail closed due
                                at ``now + max_key_age``
    ``attempt_failed``          key kept, state STALE; next attempt after the backoff
                                (``min(interval, 5 s)``; 1 s before the first key)
    ``random_installed``        FAIL_CLOSED; nothing more to fail closed until the next
                                fresh key; the driving site keeps its attempt schedule
    ``random_install_failed``   still due; asked again after the backoff, not every tick
    ==========================  =========================================================

    A fresh key is reported STALE once it is older than one interval plus one backoff
    (the peer's rotation is overdue), and never FRESH at or after ``max_key_age``.
    """

    def __init__(
        self,
        *,
        interval: float,
        max_key_age: float,
        startup_timeout: float,
        drives_rotation: bool,
        now: float,
        retry_backoff: float = RETRY_BACKOFF,
        startup_retry_backoff: float = STARTUP_RETRY_BACKOFF,
    ) -> None:
        if not 0 < interval < max_key_age or startup_timeout <= 0:
            raise ValueError("need 0 < interval < max_key_age and startup_timeout > 0")
        self.interval = interval
        self.max_key_age = max_key_age
        self.drives_rotation = drives_rotation
        self._backoff = min(interval, retry_backoff)
        self._startup_backoff = min(interval, startup_retry_backoff)
        self._startup_deadline = now + startup_timeout
        self._installed = _Installed.NOTHING
        self._key_id: str | None = None
        self._last_fresh_at: float | None = None
        self._failures = 0
        self._next_attempt_at: float | None = now if drives_rotation else None
        self._fail_closed_retry_at: float | None = None

    @classmethod
    def for_binding(
        cls, binding: WireGuardBinding, *, drives_rotation: bool, now: float
    ) -> PskPolicy:
        return cls(
            interval=binding.interval,
            max_key_age=binding.max_key_age,
            startup_timeout=binding.startup_timeout,
            drives_rotation=drives_rotation,
            now=now,
        )

    # -- queries ------------------------------------------------------------------------

    @property
    def key_id(self) -> str | None:
        """The ID of the installed fresh key; None while pending or failed closed."""
        return self._key_id

    @property
    def last_fresh_at(self) -> float | None:
        return self._last_fresh_at

    @property
    def consecutive_failures(self) -> int:
        """Failed attempts since the last fresh install."""
        return self._failures

    @property
    def next_attempt_at(self) -> float | None:
        """When the driving site should next rotate; None at the other site."""
        return self._next_attempt_at

    @property
    def fail_closed_at(self) -> float | None:
        """When the installed key (or the lack of one) must give way to a random key."""
        if self._installed is _Installed.FRESH_KEY:
            assert self._last_fresh_at is not None
            return self._last_fresh_at + self.max_key_age
        if self._installed is _Installed.NOTHING:
            return self._startup_deadline
        return None

    def state(self, now: float) -> PskState:
        if self._installed is _Installed.NOTHING:
            return PskState.PENDING
        if self._installed is _Installed.RANDOM_KEY:
            return PskState.FAIL_CLOSED
        assert self._last_fresh_at is not None
        age = now - self._last_fresh_at
        if self._failures or age >= self.interval + self._backoff:
            return PskState.STALE
        return PskState.FRESH

    def must_fail_closed(self, now: float) -> bool:
        """True while a random key is due and not yet installed: the fresh key reached
        max_key_age, or nothing was installed within startup_timeout."""
        due = self.fail_closed_at
        return due is not None and now >= due

    def poll(self, now: float) -> PskAction:
        """What to do now. Failing closed comes first: it must not wait for a rotation
        that may never succeed."""
        if self.must_fail_closed(now) and (
            self._fail_closed_retry_at is None or now >= self._fail_closed_retry_at
        ):
            return PskAction.FAIL_CLOSED
        if self._next_attempt_at is not None and now >= self._next_attempt_at:
            return PskAction.ROTATE
        return PskAction.WAIT

    def wake_at(self) -> float:
        """The earliest time at which :meth:`poll` may answer differently (inf: never,
        until one of the recording methods is called)."""
        times = [math.inf]
        if self._next_attempt_at is not None:
            times.append(self._next_attempt_at)
        due = self.fail_closed_at
        if due is not None:
            times.append(max(due, self._fail_closed_retry_at or due))
        return min(times)

    # -- events -------------------------------------------------------------------------

    def fresh_installed(self, now: float, key_id: str) -> None:
        self._installed = _Installed.FRESH_KEY
        self._key_id = key_id
        self._last_fresh_at = now
        self._failures = 0
        self._fail_closed_retry_at = None
        if self.drives_rotation:
            self._next_attempt_at = now + self.interval

    def attempt_failed(self, now: float) -> None:
        """A rotation (driving site) or an announced install (other site) failed; the
        installed key stays."""
        self._failures += 1
        if self.drives_rotation:
            pending = self._installed is _Installed.NOTHING
            self._next_attempt_at = now + (self._startup_backoff if pending else self._backoff)

    def random_installed(self, now: float) -> None:
        self._installed = _Installed.RANDOM_KEY
        self._key_id = None
        self._fail_closed_retry_at = None

    def random_install_failed(self, now: float) -> None:
        self._fail_closed_retry_at = now + self._backoff


# --------------------------------------------------------------------------------------
# The Trio layer

TakeFreshKey = Callable[[], tuple[str, bytes] | None]
Announce = Callable[[str], Awaitable[None]]
# Why the peer site cannot be asked to install a key right now, or None if it can.
PeerCheck = Callable[[], str | None]


def _peer_available() -> str | None:
    return None


class _FailureLog:
    """The log level for a failure: its own level for the first of a run of failures of
    one kind, DEBUG for the repeats, so an outage makes one warning in the log and in the
    status view's recent errors however many attempts it lasts (the status row still
    counts every attempt). A success ends the run."""

    def __init__(self) -> None:
        self._kind: type[BaseException] | None = None

    def level(self, exc: BaseException, level: int) -> int:
        news = type(exc) is not self._kind
        self._kind = type(exc)
        return level if news else logging.DEBUG

    def succeeded(self) -> None:
        self._kind = None


class PskRotator:
    """Keeps one binding's PSK fresh at this site.

    At the driving (link master) site pass ``take_fresh_key`` (one ready hybrid key as
    ``(key_id, material)``, or None when the pool is empty), ``announce`` (asks the peer
    to install ``key_id``; returns once the peer installed it, raises otherwise) and
    ``peer_unavailable`` (why the peer cannot be asked now, or None). At the other site
    pass none of them, and call :meth:`install_announced` when the peer asks.

    Call :meth:`first_install` before reporting ready, then run :meth:`run` for as long
    as the binding exists.
    """

    def __init__(
        self,
        binding: WireGuardBinding,
        *,
        installer: PskInstaller | None = None,
        take_fresh_key: TakeFreshKey | None = None,
        announce: Announce | None = None,
        peer_unavailable: PeerCheck | None = None,
        announce_timeout: float = ANNOUNCE_TIMEOUT,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if (take_fresh_key is None) != (announce is None):
            raise ValueError("the driving site needs both take_fresh_key and announce")
        if peer_unavailable is not None and announce is None:
            raise ValueError("peer_unavailable is for the driving site only")
        self.binding = binding
        self._installer: PskInstaller = installer or WgInstaller(binding.wg_command)
        self._take_fresh_key = take_fresh_key
        self._announce = announce
        self._peer_unavailable = peer_unavailable or _peer_available
        self._announce_timeout = announce_timeout
        self._wall_clock = wall_clock
        self._policy: PskPolicy | None = None
        # One install at a time, so the last `wg set` is always the one the policy records.
        self._install_lock = trio.Lock()
        self._changed = trio.Event()
        self._last_fresh_wall: float | None = None
        self._last_error: str | None = None
        self._rotation_failures = _FailureLog()  # rotations, and installs at the other site
        self._fail_closed_failures = _FailureLog()

    @property
    def drives_rotation(self) -> bool:
        return self._announce is not None

    @property
    def policy(self) -> PskPolicy:
        """The binding's policy, started at the first use (start-up timing counts from it)."""
        if self._policy is None:
            self._policy = PskPolicy.for_binding(
                self.binding, drives_rotation=self.drives_rotation, now=trio.current_time()
            )
        return self._policy

    @property
    def _role(self) -> str:
        return "master" if self.drives_rotation else "slave"

    # -- the daemon's entry points ------------------------------------------------------

    async def first_install(self) -> str:
        """Install the first PSK: fresh if one arrives within startup_timeout, random
        (failing closed) otherwise. Returns what was installed. Raises WireGuardError if
        not even a random key could be installed: the tunnel must not run without one."""
        policy = self.policy
        while policy.state(trio.current_time()) is PskState.PENDING:
            if not await self._step() and policy.state(trio.current_time()) is PskState.PENDING:
                raise WireGuardError(
                    f"binding {self.binding.name}: could not install any pre-shared key on "
                    f"{self.binding.interface}: {self._last_error}"
                )
        if policy.key_id is not None:
            return f"fresh key {policy.key_id}"
        return "random key (fail closed)"

    async def run(self) -> None:
        """Rotate (driving site) and fail closed when the policy says so; runs until
        cancelled."""
        while True:
            await self._step()

    async def install_announced(self, key_id: str, material: bytes) -> None:
        """Install the key the driving site announced (the caller took ``material`` from
        the store by ``key_id``). Returns once installed; raises WireGuardError otherwise,
        so the caller can tell the peer that the rotation failed."""
        if self.drives_rotation:
            raise NotTheDrivingSiteError(
                f"binding {self.binding.name}: this site drives rotations; refusing a key "
                "announced by the peer (is the binding's master configured at both sites?)"
            )
        policy = self.policy
        try:
            psk = derive_psk(material, self.binding.name, key_id)
            async with self._install_lock:
                await self._install(psk)
                self._record_fresh(key_id)
        except WireGuardError as exc:
            policy.attempt_failed(trio.current_time())
            self._last_error = str(exc)
            log.log(
                self._rotation_failures.level(exc, logging.WARNING),
                "event=wireguard_install_failed binding=%s key_id=%s reason=%r",
                self.binding.name,
                key_id,
                str(exc),
            )
            raise

    def status(self, now: float | None = None) -> dict[str, object]:
        """The binding's row in the status view (key IDs are not secret; keys never
        appear)."""
        policy = self._policy
        state, key_id, failures = PskState.PENDING, None, 0
        if policy is not None:
            state = policy.state(trio.current_time() if now is None else now)
            key_id, failures = policy.key_id, policy.consecutive_failures
        return {
            "binding": self.binding.name,
            "interface": self.binding.interface,
            "peer_site": self.binding.peer_site,
            "role": self._role,
            "state": state.value,
            "key_id": key_id,
            "last_fresh_install": self._last_fresh_wall,  # wall-clock time, or None
            "consecutive_failures": failures,
            "last_error": self._last_error,
        }

    # -- the steps ----------------------------------------------------------------------

    async def _step(self) -> bool:
        """Do what the policy asks now, or sleep until it may ask something else.
        Returns False if a random key was due but could not be installed."""
        policy = self.policy
        action = policy.poll(trio.current_time())
        if action is PskAction.FAIL_CLOSED:
            return await self._fail_closed()
        if action is PskAction.ROTATE:
            await self._rotate()
        else:
            # Also woken by a fresh install from install_announced, which moves deadlines.
            with trio.move_on_at(policy.wake_at()):
                await self._changed.wait()
        return True

    async def _rotate(self) -> None:
        """One rotation from the driving site; any failure keeps the installed key.

        A key is taken only when the peer can be asked, and nothing awaits between the
        check, the take and the call going out: an attempt that cannot reach the peer
        takes no key. A key named in a call that went out is consumed whatever the
        outcome, since the peer may have installed it (taken it by ID) even if no answer
        came; it is never handed out again."""
        assert self._take_fresh_key is not None and self._announce is not None
        policy = self.policy
        key_id = "-"
        try:
            unavailable = self._peer_unavailable()
            if unavailable is not None:
                raise PeerUnreachableError(unavailable)
            taken = self._take_fresh_key()
            if taken is None:
                raise NoFreshKeyError("no ready hybrid key for the binding's SAE pair")
            key_id, material = taken
            psk = derive_psk(material, self.binding.name, key_id)
            # Never past the moment the current key must go: failing closed must not wait
            # for a peer that does not answer.
            now = trio.current_time()
            deadline = now + self._announce_timeout
            due = policy.fail_closed_at
            if due is not None and due > now:
                deadline = min(deadline, due)
            with trio.move_on_at(deadline) as scope:
                await self._announce(key_id)
            if scope.cancelled_caught:
                raise PeerTooSlowError("the peer site did not confirm the install in time")
            # The peer holds the new key now; finish the local half even if we are being
            # cancelled, so the two ends do not stay apart (WgInstaller has its own timeout).
            with trio.CancelScope(shield=True):
                async with self._install_lock:
                    await self._install(psk)
                    self._record_fresh(key_id)
        except Exception as exc:  # any failure is a failed rotation: log it, retry later
            policy.attempt_failed(trio.current_time())
            self._last_error = str(exc) or type(exc).__name__
            log.log(
                self._rotation_failures.level(exc, logging.WARNING),
                "event=wireguard_rotation_failed binding=%s key_id=%s attempt=%d reason=%r",
                self.binding.name,
                key_id,
                policy.consecutive_failures,
                self._last_error,
            )
            self._notify()

    async def _fail_closed(self) -> bool:
        policy = self.policy
        async with self._install_lock:
            now = trio.current_time()
            # Check again under the lock: a fresh key may have been installed meanwhile.
            if policy.poll(now) is not PskAction.FAIL_CLOSED:
                return True
            replaced = policy.key_id
            if replaced is None:
                reason = f"no fresh key within startup_timeout ({self.binding.startup_timeout:g} s)"
            else:
                reason = (
                    f"no fresh key for max_key_age ({self.binding.max_key_age:g} s) "
                    f"since key {replaced}"
                )
            try:
                # A new PSK alone would leave WireGuard's current session running (up to
                # 180 s): end it too, so traffic stops now.
                await self._installer.install_ending_session(
                    self.binding.interface,
                    self.binding.peer_public_key,
                    secrets.token_bytes(PSK_SIZE),
                )
            except Exception as exc:  # keep the loop alive: retried after the backoff
                policy.random_install_failed(trio.current_time())
                self._last_error = str(exc)
                log.log(
                    self._fail_closed_failures.level(exc, logging.ERROR),
                    "event=wireguard_fail_closed_failed binding=%s interface=%s reason=%r",
                    self.binding.name,
                    self.binding.interface,
                    str(exc),
                )
                return False
            policy.random_installed(trio.current_time())
            self._fail_closed_failures.succeeded()
        log.error(
            "event=wireguard_fail_closed binding=%s interface=%s key_id=- replaced=%s reason=%r",
            self.binding.name,
            self.binding.interface,
            replaced or "-",
            reason,
        )
        self._notify()
        return True

    async def _install(self, psk: bytes) -> None:
        await self._installer.install(self.binding.interface, self.binding.peer_public_key, psk)

    def _record_fresh(self, key_id: str) -> None:
        policy = self.policy
        recovered = policy.state(trio.current_time()) is PskState.FAIL_CLOSED
        policy.fresh_installed(trio.current_time(), key_id)
        self._last_fresh_wall = self._wall_clock()
        self._last_error = None
        self._rotation_failures.succeeded()
        log.info(
            "event=wireguard_psk_installed binding=%s interface=%s key_id=%s role=%s",
            self.binding.name,
            self.binding.interface,
            key_id,
            self._role,
        )
        if recovered:
            log.warning("event=wireguard_recovered binding=%s key_id=%s", self.binding.name, key_id)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
