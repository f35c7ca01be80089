"""Per-SAE quotas: how many keys each master SAE may take through enc_keys in a rolling
hour. Sans-IO (the caller passes the time); the book lives in memory, so a restart gives
every SAE its full quota back, which errs towards serving keys rather than refusing them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from qkdd.errors import KeyServiceError

WINDOW_SECONDS: Final = 3600.0


@dataclass(frozen=True)
class QuotaState:
    limit: int | None
    used: int  # keys taken in the last window

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


class QuotaExceeded(KeyServiceError):
    """The SAE took its quota for the window; the message says when room frees up."""


class QuotaBook:
    """Keys taken per SAE, as (time, count) entries no older than the window."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self._window = window
        self._taken: dict[str, deque[tuple[float, int]]] = {}

    def state(self, sae_id: str, limit: int | None, now: float) -> QuotaState:
        return QuotaState(limit, self._used(sae_id, now))

    def check(self, sae_id: str, limit: int | None, number: int, now: float) -> None:
        """QuotaExceeded (saying when room frees up) if ``number`` more keys would exceed
        ``limit``; nothing is charged (see ``charge``)."""
        if limit is None:
            return
        used = self._used(sae_id, now)
        if used + number <= limit:
            return
        entries = self._taken.get(sae_id, deque())
        # Room for `number` keys comes back when enough of the oldest entries age out.
        need, freed, when = used + number - limit, 0, now
        for at, count in entries:
            freed += count
            when = at + self._window
            if freed >= need:
                break
        if number > limit:
            raise QuotaExceeded(f"SAE {sae_id} may take at most {limit} keys per hour")
        raise QuotaExceeded(
            f"SAE {sae_id} has used {used} of its {limit} keys per hour; room for "
            f"{number} more in {max(0.0, when - now):.0f} s"
        )

    def charge(self, sae_id: str, number: int, now: float) -> None:
        self._taken.setdefault(sae_id, deque()).append((now, number))

    def _used(self, sae_id: str, now: float) -> int:
        entries = self._taken.get(sae_id)
        if not entries:
            return 0
        while entries and entries[0][0] <= now - self._window:
            entries.popleft()
        return sum(count for _, count in entries)
