"""The pseudo-terminals the emulator exposes: open a raw pty, point a symlink at its slave,
and remove the symlink again. Shared by ``qkd-emulator pty`` (two links in one process)
and ``qkd-emulator half`` (one link per site host).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tty
from dataclasses import dataclass

from ..device_errors import DeviceError

__all__ = ["EmulatorError", "PtyLink", "close_pty_link", "open_pty_link"]

log = logging.getLogger("qkdd.emulator")


class EmulatorError(DeviceError):
    """The emulator cannot start (bad arguments, a path it must not replace...)."""


@dataclass
class PtyLink:
    master: int  # the emulated device's end
    slave: int  # held open by the emulator so the master never sees EIO
    slave_name: str  # /dev/pts/N
    link_path: str  # the symlink given to the daemon


def open_pty_link(link_path: str) -> PtyLink:
    """Open a raw pty and point ``link_path`` at its slave (replacing only a symlink)."""
    if os.path.lexists(link_path) and not os.path.islink(link_path):
        raise EmulatorError(
            f"refusing to replace {link_path}: it exists and is not a symlink; "
            "choose another --link path or remove it"
        )
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        name = os.ttyname(slave)
        tmp = f"{link_path}.{os.getpid()}.tmp"
        os.symlink(name, tmp)
        os.replace(tmp, link_path)  # atomic: the path is never missing or half made
    except OSError as exc:
        os.close(master)
        os.close(slave)
        raise EmulatorError(f"cannot create {link_path}: {exc.strerror}") from None
    log.info("emulator.pty link=%s pty=%s", link_path, name)
    return PtyLink(master, slave, name, link_path)


def close_pty_link(link: PtyLink, *, close_master: bool = True) -> None:
    """Remove the symlink if it still points at our pty, and close the fds."""
    try:
        if os.path.islink(link.link_path) and os.readlink(link.link_path) == link.slave_name:
            os.unlink(link.link_path)
    except OSError as exc:
        log.warning("emulator.unlink-failed link=%s reason=%r", link.link_path, exc.strerror)
    for fd in (link.master, link.slave) if close_master else (link.slave,):
        with contextlib.suppress(OSError):
            os.close(fd)
