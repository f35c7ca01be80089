"""When to rotate a binding's key and when to fail closed, sans-IO: time is an argument.

:class:`RotationPolicy` records fresh installs, failed attempts and fail-closed steps of one
binding at one site, and answers when to try next and whether the tunnel must be closed.
Failing closed means, for WireGuard, a random PSK that nobody else holds (and the session
ended), and for IPsec, the PPK removed and the IKE SAs ended: either way no traffic flows
under a key older than ``max_key_age``, or without a key qkdd installed.
"""

from __future__ import annotations

import enum
import math

from qkdd.constants import RETRY_BACKOFF, STARTUP_RETRY_BACKOFF
from qkdd.rotation.tunnel_binding import RotatedBinding

__all__ = ["KeyState", "RotationAction", "RotationPolicy"]


class KeyState(enum.Enum):
    """What the installed key is, as the status view shows it."""

    PENDING = "pending"  # nothing installed yet (start-up)
    FRESH = "fresh"  # a key from a hybrid key, recent, and the last rotation worked
    STALE = "stale"  # a key from a hybrid key, but a rotation failed or is overdue
    FAIL_CLOSED = "fail-closed"  # no usable key: the tunnel is down on purpose


class RotationAction(enum.Enum):
    """What :meth:`RotationPolicy.poll` asks for now."""

    WAIT = "wait"  # nothing to do before wake_at()
    ROTATE = "rotate"  # driving site: rotate to a fresh key now
    FAIL_CLOSED = "fail-closed"  # close the tunnel now (no key anybody else holds)


class _Installed(enum.Enum):
    NOTHING = "nothing"
    FRESH_KEY = "fresh-key"
    CLOSED = "closed"


class RotationPolicy:
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
    ``failed_closed``           FAIL_CLOSED; nothing more to fail closed until the next
                                fresh key; the driving site keeps its attempt schedule
    ``fail_closed_failed``      still due; asked again after the backoff, not every tick
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
        cls, binding: RotatedBinding, *, drives_rotation: bool, now: float
    ) -> RotationPolicy:
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
        """When the installed key (or the lack of one) must give way to a closed tunnel."""
        if self._installed is _Installed.FRESH_KEY:
            assert self._last_fresh_at is not None
            return self._last_fresh_at + self.max_key_age
        if self._installed is _Installed.NOTHING:
            return self._startup_deadline
        return None

    def state(self, now: float) -> KeyState:
        if self._installed is _Installed.NOTHING:
            return KeyState.PENDING
        if self._installed is _Installed.CLOSED:
            return KeyState.FAIL_CLOSED
        assert self._last_fresh_at is not None
        age = now - self._last_fresh_at
        if self._failures or age >= self.interval + self._backoff:
            return KeyState.STALE
        return KeyState.FRESH

    def must_fail_closed(self, now: float) -> bool:
        """True while failing closed is due and not yet done: the fresh key reached
        max_key_age, or nothing was installed within startup_timeout."""
        due = self.fail_closed_at
        return due is not None and now >= due

    def poll(self, now: float) -> RotationAction:
        """What to do now. Failing closed comes first: it must not wait for a rotation
        that may never succeed."""
        if self.must_fail_closed(now) and (
            self._fail_closed_retry_at is None or now >= self._fail_closed_retry_at
        ):
            return RotationAction.FAIL_CLOSED
        if self._next_attempt_at is not None and now >= self._next_attempt_at:
            return RotationAction.ROTATE
        return RotationAction.WAIT

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

    def failed_closed(self, now: float) -> None:
        """The tunnel is closed: its key replaced by one nobody else holds, or removed."""
        self._installed = _Installed.CLOSED
        self._key_id = None
        self._fail_closed_retry_at = None

    def fail_closed_failed(self, now: float) -> None:
        self._fail_closed_retry_at = now + self._backoff
