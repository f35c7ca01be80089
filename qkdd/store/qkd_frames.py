"""The QKD buffer's unit of storage: a *frame*, the keys of one device delivery (or a part
of it) in one row, and the bounded memory of the newest key IDs received.

A frame row holds, for keys consecutive in receive order, of one peer and one size:

- ``first_seq``: the receive number of its first key; key ``i`` has ``first_seq + i``;
- ``key_ids``: their 16-byte IDs concatenated, in order;
- ``material``: their material concatenated and sealed as one (``Sealer``), or NULL once
  every key of the frame is used;
- ``used``: a bitmap (bit ``i`` of byte ``i // 8``, least significant first) of the keys
  used: their bytes in the sealed material are zeros, sealed again in the transaction
  that used them (with ``secure_delete`` the old pages are overwritten), and ``held`` is
  how many are not.

The associated data of the sealed material (``qkdd.sealing.qkd_frame_aad``) names the
peer, the first receive number, the key size, every ID and the bitmap, so a sealed frame
moved to another row, given other IDs, or with a used key marked unused again does not
open.

A frame whose keys are all used stays as a memory of their IDs (a device that re-sends one
is ignored, and the peer's horizon can be told that we used it) until both buffers have
moved past it (``qkdd.store.qkd_buffer``).

``RecentIds`` keeps the IDs of a peer's newest frames in memory, at least
``consumed_memory`` keys: a device re-sends only keys it has not seen acknowledged, at most
its window of keys in flight, so any re-sent key is among them; and it locates a recent key
(the keys a device handing keys out by ID just delivered) without reading the buffer.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from qkdd.store.qkd_ids import QKD_KEY_ID_SIZE, id_index

# Keys per frame at most: a delivery of more is split. A frame is read, opened and (where a
# run ends inside it) sealed again as a whole, so larger frames cost more per partial use;
# 1,024 keys of 32 bytes are 32 KiB of material and 16 KiB of IDs.
MAX_FRAME_KEYS: Final = 1024

QKD_FRAMES_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS qkd_frames (
    first_seq   INTEGER PRIMARY KEY,
    peer_site   TEXT NOT NULL,
    key_count   INTEGER NOT NULL,
    key_size    INTEGER NOT NULL,
    held        INTEGER NOT NULL,
    received_at REAL NOT NULL,
    used        BLOB NOT NULL,
    key_ids     BLOB NOT NULL,
    material    BLOB
);
-- Every frame of a peer in receive order (used IDs remembered, lookups by ID, forgetting).
CREATE INDEX IF NOT EXISTS qkd_frames_by_peer ON qkd_frames (peer_site, first_seq);
-- Frames with keys still held: the oldest and the newest held key, runs, without stepping
-- over the frames kept only as a memory of used IDs.
CREATE INDEX IF NOT EXISTS qkd_frames_held ON qkd_frames (peer_site, first_seq) WHERE held > 0;
-- Frames kept only as a memory of used IDs, for looking an ID up newest first.
CREATE INDEX IF NOT EXISTS qkd_frames_used ON qkd_frames (peer_site, first_seq) WHERE held = 0;
-- QKD key IDs used here without ever being held (skipped at the peer's word, or named by
-- a batch that was refused), with the newest receive number when they were used.
CREATE TABLE IF NOT EXISTS qkd_consumed (
    peer_site TEXT NOT NULL,
    key_id    BLOB NOT NULL,
    mark      INTEGER NOT NULL,
    PRIMARY KEY (peer_site, key_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS qkd_consumed_by_mark ON qkd_consumed (peer_site, mark);
"""

# The columns a frame is read with, in ``QkdFrame``'s order.
FRAME_COLUMNS: Final = "first_seq, key_count, key_size, held, used, key_ids, material"


@dataclass(frozen=True)
class QkdFrame:
    """One frame row as read."""

    first_seq: int
    key_count: int
    key_size: int
    held: int
    used: bytes
    key_ids: bytes
    sealed: bytes | None = field(repr=False)

    @classmethod
    def of(cls, row: Sequence[Any]) -> QkdFrame:
        first, count, size, held, used, ids, sealed = row
        return cls(
            int(first),
            int(count),
            int(size),
            int(held),
            bytes(used),
            bytes(ids),
            None if sealed is None else bytes(sealed),
        )

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.key_count - 1

    def key_id(self, index: int) -> bytes:
        return self.key_ids[index * QKD_KEY_ID_SIZE : (index + 1) * QKD_KEY_ID_SIZE]

    def is_used(self, index: int) -> bool:
        return bool(self.used[index >> 3] >> (index & 7) & 1) if self.used else False

    def unused_spans(self, start: int = 0) -> list[tuple[int, int]]:
        """[begin, end) index spans of the keys not used, from ``start`` on."""
        return unused_spans(self.used, self.key_count, start)

    def index_of(self, raw: bytes) -> int | None:
        """Where the 16-byte ID sits in the frame, or None."""
        return id_index(self.key_ids, raw)


def empty_bitmap(count: int) -> bytes:
    return bytes((count + 7) // 8)


def bitmap_int(used: bytes) -> int:
    return int.from_bytes(used, "little")


def bitmap_bytes(value: int, count: int) -> bytes:
    return value.to_bytes((count + 7) // 8, "little")


def unused_spans(used: bytes, count: int, start: int = 0) -> list[tuple[int, int]]:
    """[begin, end) spans of the indexes below ``count`` whose bit is clear, from ``start``."""
    value = bitmap_int(used) >> start if used else 0
    if value == 0:
        return [(start, count)] if start < count else []
    spans: list[tuple[int, int]] = []
    index = start
    while index < count:
        if value & 1:
            # Skip the run of set bits at once.
            run = (~value & (value + 1)).bit_length() - 1
            value >>= run
            index += run
            continue
        if value == 0:
            spans.append((index, count))
            break
        run = (value & -value).bit_length() - 1  # clear bits before the next set one
        spans.append((index, min(index + run, count)))
        value >>= run
        index += run
    return spans


def frame_groups(
    keys: Sequence[tuple[bytes, bytes]], most: int = MAX_FRAME_KEYS
) -> Iterator[list[tuple[bytes, bytes]]]:
    """(ID, material) pairs in delivery order, cut into frames: keys of one size, at most
    ``most`` each."""
    if len({len(material) for _, material in keys}) == 1:  # the usual case: cut by count
        for start in range(0, len(keys), most):
            yield list(keys[start : start + most])
        return
    group: list[tuple[bytes, bytes]] = []
    for pair in keys:
        if group and (len(group) >= most or len(pair[1]) != len(group[0][1])):
            yield group
            group = []
        group.append(pair)
    if group:
        yield group


class RecentIds:
    """The IDs of one peer's newest frames (at least ``memory`` keys): ID -> receive number."""

    def __init__(self) -> None:
        self._frames: deque[tuple[int, bytes]] = deque()  # (first_seq, IDs), oldest first
        self._firsts: list[int] = []  # the same first_seqs, for bisecting
        self._seq_of: dict[bytes, int] = {}
        self._keys = 0

    def add(self, first_seq: int, key_ids: bytes, memory: int) -> None:
        """A frame received (newer than every frame held here)."""
        size = QKD_KEY_ID_SIZE
        self._frames.append((first_seq, key_ids))
        self._firsts.append(first_seq)
        self._seq_of.update(
            (key_ids[i : i + size], first_seq + i // size) for i in range(0, len(key_ids), size)
        )
        self._keys += len(key_ids) // size
        dropped = 0
        while len(self._frames) > 1 and self._keys - len(self._frames[0][1]) // size >= memory:
            old_first, old_ids = self._frames.popleft()
            dropped += 1
            self._keys -= len(old_ids) // size
            for i in range(0, len(old_ids), size):
                raw = old_ids[i : i + size]
                if self._seq_of.get(raw) == old_first + i // size:
                    del self._seq_of[raw]
        if dropped:
            del self._firsts[:dropped]

    def seq_of(self, raw: bytes) -> int | None:
        return self._seq_of.get(raw)

    def holds_none_of(self, raws: list[bytes]) -> bool:
        """Whether none of these IDs is remembered here: a device's delivery, in the
        common case, checked at C speed instead of one lookup per key."""
        return self._seq_of.keys().isdisjoint(raws)

    def frame_first(self, seq: int) -> int | None:
        """The first receive number of the frame here holding ``seq``."""
        at = bisect.bisect_right(self._firsts, seq) - 1
        return self._firsts[at] if at >= 0 else None

    @property
    def start_seq(self) -> int | None:
        """The oldest receive number remembered here (None if nothing is)."""
        return self._frames[0][0] if self._frames else None

    def __len__(self) -> int:
        return len(self._seq_of)
