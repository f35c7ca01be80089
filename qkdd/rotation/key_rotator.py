"""The Trio loop that keeps one binding's key fresh at one site, whatever the tunnel:
:class:`KeyRotator`. A tunnel kind (``qkdd.wireguard.psk_rotator.PskRotator``,
``qkdd.ipsec.ppk_rotator.PpkRotator``) supplies what differs: how its key is derived,
installed, taken up by the tunnel and torn down to fail closed, and the words of its logs,
errors and status row.

Theory of operation
-------------------
The link's master site drives every rotation. It takes one ready hybrid key from its
store, asks the peer site over the authenticated peer channel to install that key ID for
the binding, and once the peer has answered OK it installs the same key locally (and, where
the tunnel needs it, has the tunnel take the new key up). The peer takes the key by ID from
its own store. Both derive the tunnel key from the hybrid key with the binding's name and
the key ID bound in, so each site holds the same bytes without them ever crossing the wire.

The loop asks :class:`~qkdd.rotation.policy.RotationPolicy` what to do and does it.

Keys: the driving site takes a hybrid key only while the peer can be asked, in the same
step that sends the call naming it. An attempt that cannot reach the peer consumes nothing;
a key named in a call that went out is consumed whatever the answer (exactly once).
Repeated failures of one kind are logged once (then at DEBUG) until a rotation succeeds.

Fail closed: with no fresh key for ``max_key_age`` (or none within ``startup_timeout`` at
start), each site on its own closes the tunnel so that no traffic flows, instead of
flowing under a key older than the operator allowed, or under none qkdd installed.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar, Generic, TypeVar

import trio

from qkdd.constants import ANNOUNCE_TIMEOUT
from qkdd.rotation.policy import KeyState, RotationAction, RotationPolicy
from qkdd.rotation.tunnel_binding import RotatedBinding, RotationError

__all__ = [
    "Announce",
    "KeyRotator",
    "NoFreshKeyError",
    "NotTheDrivingSiteError",
    "PeerCheck",
    "PeerTooSlowError",
    "PeerUnreachableError",
    "TakeFreshKey",
]

# One ready hybrid key as (key_id, material), or None when the pool is empty.
TakeFreshKey = Callable[[], tuple[str, bytes] | None]
# Asks the peer to install key_id; returns once the peer installed it, raises otherwise.
Announce = Callable[[str], Awaitable[None]]
# Why the peer site cannot be asked to install a key right now, or None if it can.
PeerCheck = Callable[[], str | None]

B = TypeVar("B", bound=RotatedBinding)
InstallerT = TypeVar("InstallerT")


class NotTheDrivingSiteError(RotationError):
    """An announced key reached the site that drives the binding's rotations itself."""


class PeerUnreachableError(RotationError):
    """The peer site cannot be asked now (no session), or its session ended mid-call."""


class NoFreshKeyError(RotationError):
    """No ready hybrid key for the binding's SAE pair."""


class PeerTooSlowError(RotationError):
    """The peer site did not confirm the install in time."""


def _peer_available() -> str | None:
    return None


class FailureLog:
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


class KeyRotator(abc.ABC, Generic[B, InstallerT]):
    """Keeps one binding's key fresh at this site, changing the tunnel through
    ``installer`` (the tunnel kind's own for the binding unless given).

    At the driving (link master) site pass ``take_fresh_key`` (one ready hybrid key as
    ``(key_id, material)``, or None when the pool is empty), ``announce`` (asks the peer
    to install ``key_id``; returns once the peer installed it, raises otherwise) and
    ``peer_unavailable`` (why the peer cannot be asked now, or None). At the other site
    pass none of them, and call :meth:`install_announced` when the peer asks.

    Call :meth:`first_install` before reporting ready, then run :meth:`run` for as long
    as the binding exists.
    """

    # What a tunnel kind supplies besides the abstract methods below.
    log: ClassVar[logging.Logger]
    event_prefix: ClassVar[str]  # "wireguard": events are wireguard_rotation_failed, …
    installed_event: ClassVar[str]  # the event of a fresh key installed
    fail_closed_result: ClassVar[str]  # what first_install returns after failing closed
    # The status and log field of what _take_up reports, if the tunnel reports anything.
    taken_up_field: ClassVar[str | None] = None

    def __init__(
        self,
        binding: B,
        *,
        installer: InstallerT | None = None,
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
        if installer is None:
            installer = self._installer_for(binding)
        self._installer = installer
        self._take_fresh_key = take_fresh_key
        self._announce = announce
        self._peer_unavailable = peer_unavailable or _peer_available
        self._announce_timeout = announce_timeout
        self._wall_clock = wall_clock
        self._policy: RotationPolicy | None = None
        # One change to the tunnel's key at a time, so the last install is always the one
        # the policy records.
        self._install_lock = trio.Lock()
        self._changed = trio.Event()
        self._last_fresh_wall: float | None = None
        self._last_error: str | None = None
        self._taken_up: str | None = None
        self._rotation_failures = FailureLog()  # rotations, and installs at the other site
        self._fail_closed_failures = FailureLog()

    # -- what a tunnel kind supplies ------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def _installer_for(cls, binding: B) -> InstallerT:
        """The installer that changes the binding's tunnel."""

    @abc.abstractmethod
    def _derive(self, material: bytes, key_id: str) -> bytes:
        """The tunnel key from the hybrid key ``key_id``; KeyMaterialError if too short."""

    @abc.abstractmethod
    async def _install(self, key: bytes) -> None:
        """Install ``key`` in the local tunnel; raise RotationError on failure."""

    async def _take_up(self) -> str | None:
        """After the driving site installed a fresh key: have the tunnel take it up and
        return what it reports (None: nothing to do; the key counts once installed). A
        failure is a failed rotation."""
        return None

    @abc.abstractmethod
    async def _close(self) -> str | None:
        """Fail closed: make the tunnel carry no traffic until a fresh key comes; return
        what was done, if there is more to say than the event."""

    @abc.abstractmethod
    def _start_failed(self, reason: str | None) -> RotationError:
        """The error of a first install that could neither install a key nor fail
        closed."""

    @abc.abstractmethod
    def _tunnel_fields(self) -> dict[str, str]:
        """What names the tunnel in the status row and the log lines, e.g.
        ``{"interface": "wg0"}``."""

    def _key_fields(self) -> dict[str, str]:
        """What names the installed key, if more than its key ID, in the status row and
        the line of a fresh install."""
        return {}

    # -- queries ------------------------------------------------------------------------

    @property
    def drives_rotation(self) -> bool:
        return self._announce is not None

    @property
    def policy(self) -> RotationPolicy:
        """The binding's policy, started at the first use (start-up timing counts from it)."""
        if self._policy is None:
            self._policy = RotationPolicy.for_binding(
                self.binding, drives_rotation=self.drives_rotation, now=trio.current_time()
            )
        return self._policy

    @property
    def _role(self) -> str:
        return "master" if self.drives_rotation else "slave"

    # -- the daemon's entry points ------------------------------------------------------

    async def first_install(self) -> str:
        """Install the first key: fresh if one arrives within startup_timeout; otherwise
        fail closed. Returns what was done. Raises the tunnel's RotationError if not even
        failing closed worked: the tunnel must not run on a key qkdd does not control."""
        policy = self.policy
        while policy.state(trio.current_time()) is KeyState.PENDING:
            if not await self._step() and policy.state(trio.current_time()) is KeyState.PENDING:
                raise self._start_failed(self._last_error)
        if policy.key_id is not None:
            return f"fresh key {policy.key_id}"
        return self.fail_closed_result

    async def run(self) -> None:
        """Rotate (driving site) and fail closed when the policy says so; runs until
        cancelled."""
        while True:
            await self._step()

    async def install_announced(self, key_id: str, material: bytes) -> None:
        """Install the key the driving site announced (the caller took ``material`` from
        the store by ``key_id``). Returns once installed; raises RotationError otherwise,
        so the caller can tell the peer that the rotation failed."""
        if self.drives_rotation:
            raise NotTheDrivingSiteError(
                f"binding {self.binding.name}: this site drives rotations; refusing a key "
                "announced by the peer (is the binding's master configured at both sites?)"
            )
        policy = self.policy
        try:
            key = self._derive(material, key_id)
            async with self._install_lock:
                await self._install(key)
                self._record_fresh(key_id, None)
        except RotationError as exc:
            policy.attempt_failed(trio.current_time())
            self._last_error = str(exc)
            self.log.log(
                self._rotation_failures.level(exc, logging.WARNING),
                "event=%s_install_failed binding=%s key_id=%s reason=%r",
                self.event_prefix,
                self.binding.name,
                key_id,
                str(exc),
            )
            raise

    def status(self, now: float | None = None) -> dict[str, object]:
        """The binding's row in the status view (key IDs are not secret; keys never
        appear)."""
        policy = self._policy
        state, key_id, failures = KeyState.PENDING, None, 0
        if policy is not None:
            state = policy.state(trio.current_time() if now is None else now)
            key_id, failures = policy.key_id, policy.consecutive_failures
        row: dict[str, object] = {"binding": self.binding.name, **self._tunnel_fields()}
        row |= self._key_fields()
        row |= {
            "peer_site": self.binding.peer_site,
            "role": self._role,
            "state": state.value,
            "key_id": key_id,
        }
        if self.taken_up_field is not None:
            row[self.taken_up_field] = self._taken_up
        return row | {
            "last_fresh_install": self._last_fresh_wall,  # wall-clock time, or None
            "consecutive_failures": failures,
            "last_error": self._last_error,
        }

    # -- the steps ----------------------------------------------------------------------

    async def _step(self) -> bool:
        """Do what the policy asks now, or sleep until it may ask something else.
        Returns False if failing closed was due but did not work."""
        policy = self.policy
        action = policy.poll(trio.current_time())
        if action is RotationAction.FAIL_CLOSED:
            return await self._fail_closed()
        if action is RotationAction.ROTATE:
            await self._rotate()
        else:
            # Also woken by a fresh install from install_announced, which moves deadlines.
            with trio.move_on_at(policy.wake_at()):
                await self._changed.wait()
        return True

    def _deadline(self, seconds: float) -> float:
        """A deadline ``seconds`` from now, but never past the moment the current key must
        go: failing closed must not wait for a peer or a tunnel that does not answer."""
        now = trio.current_time()
        deadline = now + seconds
        due = self.policy.fail_closed_at
        if due is not None and due > now:
            deadline = min(deadline, due)
        return deadline

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
            key = self._derive(material, key_id)
            with trio.move_on_at(self._deadline(self._announce_timeout)) as scope:
                await self._announce(key_id)
            if scope.cancelled_caught:
                raise PeerTooSlowError("the peer site did not confirm the install in time")
            # The peer holds the new key now; install ours even if we are being cancelled,
            # so the two ends do not stay apart (each installer has its own timeout).
            with trio.CancelScope(shield=True):
                await self._install_lock.acquire()
            try:
                with trio.CancelScope(shield=True):
                    await self._install(key)
                # Where the tunnel must take the key up, it counts only once it has: until
                # then the tunnel runs on the previous key, whose age the policy counts.
                taken_up = await self._take_up()
                self._record_fresh(key_id, taken_up)
            finally:
                self._install_lock.release()
        except Exception as exc:  # any failure is a failed rotation: log it, retry later
            policy.attempt_failed(trio.current_time())
            self._last_error = str(exc) or type(exc).__name__
            self.log.log(
                self._rotation_failures.level(exc, logging.WARNING),
                "event=%s_rotation_failed binding=%s key_id=%s attempt=%d reason=%r",
                self.event_prefix,
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
            if policy.poll(now) is not RotationAction.FAIL_CLOSED:
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
                done = await self._close()
            except Exception as exc:  # keep the loop alive: retried after the backoff
                policy.fail_closed_failed(trio.current_time())
                self._last_error = str(exc)
                self.log.log(
                    self._fail_closed_failures.level(exc, logging.ERROR),
                    "event=%s_fail_closed_failed binding=%s %s reason=%r",
                    self.event_prefix,
                    self.binding.name,
                    _fields(self._tunnel_fields()),
                    str(exc),
                )
                return False
            policy.failed_closed(trio.current_time())
            self._taken_up = None
            self._fail_closed_failures.succeeded()
        self.log.error(
            "event=%s_fail_closed binding=%s %s key_id=- replaced=%s%s reason=%r",
            self.event_prefix,
            self.binding.name,
            _fields(self._tunnel_fields()),
            replaced or "-",
            f" done={done!r}" if done is not None else "",
            reason,
        )
        self._notify()
        return True

    def _record_fresh(self, key_id: str, taken_up: str | None) -> None:
        policy = self.policy
        recovered = policy.state(trio.current_time()) is KeyState.FAIL_CLOSED
        policy.fresh_installed(trio.current_time(), key_id)
        self._last_fresh_wall = self._wall_clock()
        self._last_error = None
        if taken_up is not None:
            self._taken_up = taken_up
        self._rotation_failures.succeeded()
        self.log.info(
            "event=%s binding=%s %s key_id=%s role=%s%s",
            self.installed_event,
            self.binding.name,
            _fields(self._tunnel_fields() | self._key_fields()),
            key_id,
            self._role,
            f" {self.taken_up_field}={taken_up!r}" if taken_up is not None else "",
        )
        if recovered:
            self.log.warning(
                "event=%s_recovered binding=%s key_id=%s",
                self.event_prefix,
                self.binding.name,
                key_id,
            )
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def _fields(fields: dict[str, str]) -> str:
    return " ".join(f"{name}={value}" for name, value in fields.items())
