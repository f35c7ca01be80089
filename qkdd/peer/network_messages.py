"""The link messages that carry a QKD network over a direct link's session (sans-IO): each
is ``type (1) | body``, the body opaque here and decoded by its owner.

    RELAY_KEYS  0x0D  relayed QKD material for one hop    (qkdd.relay.hop_seal, §10.1)
    RELAY_ACK   0x0E  the next site has it                (qkdd.relay.hop_seal, §10.2)
    LINK_STATE  0x0F  a site's up links, flooded           (qkdd.relay.link_state, §11.1)
    ROUTED      0x10  bytes between two end sites, passed on hop by hop
                                                          (qkdd.relay.routed, §12.1)

They share the session with the key agreement, which never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from qkdd.peer.wire import MAX_SESSION_BODY, Reader, Writer

RELAY_KEYS_TYPE: Final = 0x0D
RELAY_ACK_TYPE: Final = 0x0E
LINK_STATE_TYPE: Final = 0x0F
ROUTED_TYPE: Final = 0x10


@dataclass(frozen=True)
class NetworkMessage:
    """A network message: its type is the class's, its body is the owner's bytes."""

    TYPE: ClassVar[int] = 0
    body: bytes

    def __repr__(self) -> str:  # bodies carry sealed material: their size only
        return f"{type(self).__name__}({len(self.body)} bytes)"

    def encode(self) -> bytes:
        return Writer().u8(self.TYPE).build() + self.body

    @classmethod
    def read(cls, r: Reader) -> NetworkMessage:
        return cls(r.rest())


class RelayKeysMessage(NetworkMessage):
    TYPE = RELAY_KEYS_TYPE


class RelayAckMessage(NetworkMessage):
    TYPE = RELAY_ACK_TYPE


class LinkStateMessage(NetworkMessage):
    TYPE = LINK_STATE_TYPE


class RoutedMessage(NetworkMessage):
    TYPE = ROUTED_TYPE


NETWORK_MESSAGES: Final[tuple[type[NetworkMessage], ...]] = (
    RelayKeysMessage,
    RelayAckMessage,
    LinkStateMessage,
    RoutedMessage,
)

# A network body fits one session frame with its type byte.
MAX_NETWORK_BODY: Final = MAX_SESSION_BODY - 1
