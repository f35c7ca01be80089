"""``Wakeup``: how one part of the daemon tells a sleeping task that something it waits
for may have changed (keys arrived from a device, keys were handed out, buffer space
freed), so nothing has to look again every few milliseconds."""

from __future__ import annotations

import trio


class Wakeup:
    """A signal any number of tasks can wait for. ``arm()`` before looking at the state,
    then ``wait()``: a ``set()`` in between is not lost."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    def arm(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    async def wait_until(self, deadline: float) -> None:
        """Wait for a ``set()`` or until ``deadline`` (trio time), whichever comes first."""
        with trio.move_on_at(deadline):
            await self._event.wait()
