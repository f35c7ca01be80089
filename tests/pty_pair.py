"""A pseudo-terminal pair standing in for a serial device in tests: the driver opens the
slave through a path (a symlink, as the emulator makes), the test speaks the device side on
the master as a Trio stream."""

from __future__ import annotations

import os
import tty
from pathlib import Path

import trio

__all__ = ["Pty"]


class Pty:
    """A pty pair whose slave is reachable at ``path`` (a symlink), like the emulator's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.slave_name = os.ttyname(self.slave)
        tmp = path.with_suffix(".tmp")
        os.symlink(self.slave_name, tmp)
        os.replace(tmp, path)
        self.stream = trio.lowlevel.FdStream(master)

    async def close(self, *, unlink: bool = False) -> None:
        await self.stream.aclose()
        os.close(self.slave)
        if unlink:
            self.path.unlink()
