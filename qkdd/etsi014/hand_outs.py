"""Hand-outs of keys gathered from the API requests in progress, with Trio.

Handed out one by one, each request's keys cost a store transaction: the chunk its keys are
in is opened, sealed again and written, and the commit adds the chunk's pages to the WAL
that the group commit then syncs (``qkdd.durability``). `GatheredHandOuts` runs the
hand-outs of every request that is ready at the same moment (their bytes arrived in the
same turn of the event loop) in one ``KeyStore.handing_out`` block instead: each chunk is
opened, sealed and written once per block, and one commit, then one fdatasync, covers them
all. A request waits for no other beyond the loop's next turn: the first one lets the others
that are ready run up to their own hand-out, then runs them all.

Each hand-out keeps its own outcome (its keys, or what its pool raised, e.g. too few keys
ready). If the block fails to commit, none of its keys was handed out, and every request
that was to get keys from it gets that error instead; no answer leaves before the commit.

Given the store's durability barrier (``qkdd.durability.GroupCommit``), the first request
also waits, before it runs the block, for a sync in progress to end (the block's commit
could not be in it anyway; meanwhile more requests join the block), and after it, for the
block to be durable before any of them goes on (a fast sync in the loop's own thread:
everything ready was gathered): each then finds its answer's barrier passed already,
instead of every one of them waiting on it in turn. If that wait fails,
every request of the block gets the error, and none of their keys leaves the process.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import trio

T = TypeVar("T")


class Barrier(Protocol):
    """What `GatheredHandOuts` needs of the store's durability barrier (``GroupCommit``)."""

    async def durable(self, *, inline: bool = False) -> None: ...

    async def quiet(self) -> None: ...


class _HandOut:
    __slots__ = ("take", "result", "error", "ran")

    def __init__(self, take: Callable[[], Any]) -> None:
        self.take = take
        self.result: Any = None
        self.error: BaseException | None = None
        self.ran = False


class GatheredHandOuts:
    """Runs hand-outs (calls of a pool's ``take_for_master``) together in blocks opened by
    ``gather`` (``KeyStore.handing_out``); with a ``barrier``, each block waits for a sync
    in progress first and is durable when its hand-outs return. ``blocks`` and
    ``hand_outs`` count what ran."""

    def __init__(
        self,
        gather: Callable[[], AbstractContextManager[object]],
        barrier: Barrier | None = None,
    ) -> None:
        self._gather = gather
        self._barrier = barrier
        self._waiting: list[_HandOut] = []
        self._done: trio.Event | None = None
        self.blocks = 0
        self.hand_outs = 0

    @property
    def waiting(self) -> int:
        """Hand-outs asked for and not yet run."""
        return len(self._waiting)

    async def __call__(self, take: Callable[[], T]) -> T:
        """``take()`` run in a block with the other hand-outs ready now; its result (or
        what it raised). Once asked for, it runs even if the caller is cancelled."""
        hand_out = _HandOut(take)
        self._waiting.append(hand_out)
        if len(self._waiting) == 1:
            done = self._done = trio.Event()
            with trio.CancelScope(shield=True):
                if self._barrier is not None:
                    await self._barrier.quiet()
                # Let the other tasks ready to run now reach their hand-outs first. (Those
                # of the loop's current batch are not counted as runnable: always yield.)
                await trio.lowlevel.checkpoint()
                block, self._waiting, self._done = self._waiting, [], None
                try:
                    self._run(block)
                    if self._barrier is not None:
                        await self._made_durable(block)
                finally:
                    done.set()
        else:
            waiting = self._done
            assert waiting is not None
            with trio.CancelScope(shield=True):
                await waiting.wait()
        if not hand_out.ran:
            raise RuntimeError("the hand-out was not run")
        if hand_out.error is not None:
            raise hand_out.error
        result: T = hand_out.result
        return result

    async def _made_durable(self, block: list[_HandOut]) -> None:
        assert self._barrier is not None
        try:
            # Everything ready to be handed out is in the block: the loop has nothing to
            # do meanwhile that the sync could cover too.
            await self._barrier.durable(inline=True)
        except Exception as exc:
            # Committed, but not known to be durable: nobody may hear of these keys.
            for hand_out in block:
                hand_out.result, hand_out.error = None, exc

    def _run(self, block: list[_HandOut]) -> None:
        self.blocks += 1
        self.hand_outs += len(block)
        try:
            with self._gather():
                for hand_out in block:
                    try:
                        hand_out.result = hand_out.take()
                    except Exception as exc:
                        hand_out.error = exc
                    hand_out.ran = True
        except Exception as exc:
            # Not committed: what the block handed out is undone, so nobody gets keys.
            for hand_out in block:
                if hand_out.error is None:
                    hand_out.result, hand_out.error, hand_out.ran = None, exc, True
