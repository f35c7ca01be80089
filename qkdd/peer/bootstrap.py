"""How the link master authenticates its next handshake: with its newest PSK, with an
ML-DSA signature bootstrap, or not at all (sans-IO: the I/O layer says what the store holds
and how each handshake ended; docs/protocol.md §6).

Theory of operation. An operator's ``qkdd allow-bootstrap`` only *permits* a bootstrap; it
never replaces a PSK that still works. So the master dials with its newest PSK while it
holds one, and turns to a bootstrap only when

- it holds no PSK (first contact, or its chain is lost), or
- the responder refused its PSK handshake: the responder closed the connection before
  answering (that is how it refuses a key it does not hold) or its answer failed the PSK
  check,

and a bootstrap is permitted: no PSK chain exists yet, or the operator allowed one. Without
that consent the master never falls back to signatures (fail closed): it keeps offering its
PSK, in case the peer's state comes back. A bootstrap attempt that fails for any reason
sends the master back to its PSK for the next handshake, so a one-sided allowance costs a
healthy link at most one refused attempt after a stray close, never the link.

The responder's side is one rule, kept by the key store: it accepts a bootstrap only while
one is permitted. Each side's allowance ends when a new authentication key is committed.

A PSK still pending here. The master commits a batch before the slave learns that it did,
so a slave restarted in between holds the batch's authentication key as *pending* while
the master holds it ready, and may hold no ready key at all (the first PSK of a chain):
dialling with a bootstrap would then be refused, and with the older ready key too once the
master erased it. So a link slave that holds a pending key newer than its newest ready one
dials with that key first. The responder accepts a key it holds, pending or ready, and the
session's batch resolution brings both copies to the same state. If that handshake is
refused (the master aborted the batch and erased the key), the next dial goes back to the
choice above, and the one after that tries the pending key again, so a stray close costs
one attempt. A master never dials with a pending key: one pending there is at most
pending at the slave, and offering it would cost a refused attempt after every broken
batch.
"""

from __future__ import annotations

import enum
from typing import Final

# Handshake outcomes (``qkdd.peering.handshake_outcome``) that mean the responder refused
# the PSK: a responder that does not hold the named key closes without a word.
PSK_REFUSED_OUTCOMES: Final = frozenset({"authentication_failed", "closed"})


class DialAuth(enum.Enum):
    """What the next handshake is authenticated with."""

    PSK = "psk"
    # The newest authentication key, still pending here (see above).
    PENDING_PSK = "pending-psk"
    BOOTSTRAP = "bootstrap"
    # Neither may be used: no PSK, and a bootstrap is not permitted (fail closed).
    NONE = "none"


class InitiatorAuthChoice:
    """The master's choice between its PSK and a bootstrap, one handshake at a time.

    Holds two bits of memory: whether the responder refused the last PSK handshake, and
    whether it refused the last one made with a pending key. Neither is persisted: after a
    restart the site offers its newest key first again."""

    def __init__(self) -> None:
        self.psk_refused = False
        self.pending_refused = False

    def choose(
        self,
        *,
        holds_psk: bool,
        chain_established: bool,
        operator_allowed: bool,
        holds_pending_psk: bool = False,
    ) -> DialAuth:
        """The mode for the next handshake, from what the store says now
        (``holds_pending_psk``: a pending key newer than any ready one)."""
        if holds_pending_psk and not self.pending_refused:
            return DialAuth.PENDING_PSK
        self.pending_refused = False  # the attempt after this one tries it again
        permitted = not chain_established or operator_allowed
        if holds_psk and not (self.psk_refused and permitted):
            return DialAuth.PSK
        if permitted:
            return DialAuth.BOOTSTRAP
        return DialAuth.NONE

    def handshake_failed(self, used: DialAuth, outcome: str) -> None:
        """A handshake made with ``used`` failed with ``outcome`` (before it completed)."""
        if used is DialAuth.PENDING_PSK:
            if outcome in PSK_REFUSED_OUTCOMES:
                self.pending_refused = True
        elif used is DialAuth.PSK:
            if outcome in PSK_REFUSED_OUTCOMES:
                self.psk_refused = True
        elif used is DialAuth.BOOTSTRAP:
            self.psk_refused = False  # back to the PSK: the peer may well hold it

    def handshake_completed(self) -> None:
        self.psk_refused = False
        self.pending_refused = False
