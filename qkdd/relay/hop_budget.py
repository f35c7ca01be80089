"""How many QKD keys of one link relay traffic may take now (sans-IO, no clock).

A link's QKD keys serve the link's own purposes first (its application keys, pads and
authentication keys). Relayed transfers earn a share of the keys the link's device
delivers, bank at most a burst of that credit, and never take the link's buffer below a
reserve. So however much relay traffic comes, the link keeps at least ``1 - share`` of its
key rate and a floor of keys; and since every hop charges the budgets at both of its ends
(the sender when it picks the keys, the receiver before it takes the keys the frame names),
a neighbour that ignores its own budget cannot drain this site's link either.
"""

from __future__ import annotations

from typing import Final

from qkdd.errors import PeerError

# Credit is counted in hundredths of a key, so a share in whole percent adds up exactly.
_UNITS: Final = 100


class HopBudgetExceeded(PeerError):
    """Relay traffic asked for more QKD keys of a link than its budget allows now."""


class HopBudget:
    """The relay purpose's budget on one link: ``share_percent`` of every key delivered,
    at most ``burst`` keys banked, never below ``reserve`` keys left in the buffer."""

    def __init__(self, *, share_percent: int, reserve: int, burst: int) -> None:
        if not 0 <= share_percent <= 100 or reserve < 0 or burst < 0:
            raise ValueError("share is 0..100 percent; reserve and burst are not negative")
        self.share_percent = share_percent
        self.reserve = reserve
        self.burst = burst
        self._credit = 0  # in hundredths of a key

    def __repr__(self) -> str:
        return (
            f"HopBudget(share_percent={self.share_percent}, reserve={self.reserve}, "
            f"burst={self.burst}, credit={self._credit / _UNITS:g})"
        )

    def arrived(self, count: int) -> None:
        """The link's device delivered ``count`` QKD keys: relay earns its share."""
        if count < 0:
            raise ValueError("a negative delivery")
        self._credit = min(self.burst * _UNITS, self._credit + count * self.share_percent)

    def allowance(self, available: int) -> int:
        """How many keys relay may take now from a buffer holding ``available`` keys."""
        return max(0, min(self._credit // _UNITS, available - self.reserve))

    def take(self, count: int, available: int) -> None:
        """Charge ``count`` keys taken from a buffer that held ``available`` before;
        ``HopBudgetExceeded`` (nothing charged) if that is over the allowance."""
        if count < 0:
            raise ValueError("a negative charge")
        allowed = self.allowance(available)
        if count > allowed:
            raise HopBudgetExceeded(
                f"relay may take {allowed} QKD keys of this link now, not {count}"
            )
        self._credit -= count * _UNITS
