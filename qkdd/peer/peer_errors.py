"""The peer protocol's exception hierarchy.

``LocalProtocolError``: this side was asked to do something the state machine does not
allow (a bug in the caller). ``RemoteProtocolError``: the peer sent something malformed or
out of order. ``PeerAuthenticationError``: a signature, MAC or AEAD tag failed, or the
peer is not the one pinned in config. Any of them ends the connection. The root is the
peer layer's ``qkdd.errors.PeerError``.
"""

from __future__ import annotations

from qkdd.errors import PeerError


class PeerProtocolError(PeerError):
    """Base of every peer protocol error."""


class LocalProtocolError(PeerProtocolError):
    pass


class RemoteProtocolError(PeerProtocolError):
    pass


class PeerAuthenticationError(RemoteProtocolError):
    pass


class VersionMismatch(RemoteProtocolError):
    """The peer speaks another version of the peer protocol (both sites must run the same
    qkdd release)."""
