"""systemd integration: sd_notify, the watchdog period, socket activation, credentials.

This module owns everything qkdd reads from or sends to the service manager, in the
standard library only and without libsystemd. Outside systemd (no ``NOTIFY_SOCKET``,
``LISTEN_FDS``, ``WATCHDOG_USEC`` or ``CREDENTIALS_DIRECTORY`` in the environment) every
call is a no-op or returns "nothing", so the daemon runs unchanged in a shell or a test.
The one exception is for commands an operator runs on the host (``qkdd allow-bootstrap``):
they find a credential in the credential stores the unit's ``LoadCredential=`` reads.

The wire format is the one documented in sd_notify(3), sd_listen_fds(3) and
sd_watchdog_enabled(3): newline-separated ``KEY=VALUE`` assignments in one datagram on
an ``AF_UNIX`` socket, inherited listening sockets from fd 3 on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Final

from qkdd.constants import SD_NOTIFY_SEND_TIMEOUT
from qkdd.errors import SystemdError

__all__ = [
    "CREDENTIAL_STORES",
    "SD_LISTEN_FDS_START",
    "ListenFdsError",
    "Notifier",
    "SystemdError",
    "credential_path",
    "find_credential",
    "listen_fds",
    "listen_fds_with_names",
    "operator_credential_directories",
    "watchdog_interval",
]

log = logging.getLogger("qkdd.systemd")

#: First inherited fd: 0-2 are stdio.
SD_LISTEN_FDS_START = 3


class ListenFdsError(SystemdError):
    """The sockets passed by socket activation cannot be used."""


class Notifier:
    """Sends state changes to the service manager over ``$NOTIFY_SOCKET``.

    The address is read once, at construction. Without it every method does nothing.
    A failed send never raises (the daemon must keep serving keys even if the manager
    goes away); the first failure is logged at WARNING, later ones at DEBUG.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when running under a manager that listens for notifications."""
        return self._address is not None

    def __repr__(self) -> str:
        return f"Notifier(enabled={self.enabled})"

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was sent."""
        if self._address is None:
            return False
        for item in assignments:
            if "=" not in item or "\n" in item:
                raise ValueError(f"not a single KEY=VALUE assignment: {item!r}")
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(SD_NOTIFY_SEND_TIMEOUT)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            self._send_failed(exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is finished: the unit becomes active."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", "STATUS=" + _one_line(status))

    def status(self, text: str) -> bool:
        """Free-form status line shown by ``systemctl status``."""
        return self.notify("STATUS=" + _one_line(text))

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """A configuration reload has begun; finish it with ``ready()``.

        MONOTONIC_USEC lets systemd >= 253 (``Type=notify-reload``) match this message
        to the reload it requested; older versions ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """Keep-alive ping; send every ``watchdog_interval()`` seconds."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (e.g. a slow QKD device warming up)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def errno(self, n: int) -> bool:
        """Report the errno-style reason the daemon is failing."""
        return self.notify(f"ERRNO={int(n)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_failed(self, exc: OSError) -> None:
        if self._warned:
            log.debug("sd_notify to %r failed again: %s", self._address, exc)
            return
        self._warned = True
        log.warning(
            "cannot notify systemd at %r (%s); the unit may time out or be killed by its "
            "watchdog: check that the service manager is running and NOTIFY_SOCKET is "
            "reachable from the service's mount namespace",
            self._address,
            exc,
        )


def _notify_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of "@".
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock: and other forms are for VMs; a daemon on a site host never gets them.
    log.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or @abstract name", value)
    return None


def _one_line(text: str) -> str:
    # A newline would start a new assignment and could forge e.g. READY=1.
    return " ".join(text.splitlines())


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec=``), or None when off.

    As sd_watchdog_enabled(3): ``WATCHDOG_USEC`` is the timeout, and a set
    ``WATCHDOG_PID`` that is not this process means the watchdog is someone else's.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    try:
        usec = int(raw_usec)
        pid = int(raw_pid) if raw_pid else None
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", raw_usec, raw_pid)
        return None
    if usec <= 0 or (pid is not None and pid != os.getpid()):
        return None
    return usec / 2 / 1_000_000


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd socket activation, in ``ListenStream=`` order.

    Like sd_listen_fds(unset_environment=1): the ``LISTEN_*`` variables are removed so
    children do not mistake the sockets for theirs, so a second call returns [].
    """
    return [sock for _, sock in _take_listen_fds(environ)]


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, socket.socket]:
    """Passed sockets keyed by ``FileDescriptorName=`` (``"unknown"`` when unnamed)."""
    pairs = _take_listen_fds(environ)
    named: dict[str, socket.socket] = {}
    for name, sock in pairs:
        if name in named:
            for _, s in pairs:
                s.close()
            raise ListenFdsError(
                f"two inherited sockets are both named {name!r}: give each ListenStream= "
                "its own socket unit or FileDescriptorName="
            )
        named[name] = sock
    return named


def _take_listen_fds(
    environ: MutableMapping[str, str] | None,
) -> list[tuple[str, socket.socket]]:
    env = os.environ if environ is None else environ
    raw_pid = env.pop("LISTEN_PID", None)
    raw_fds = env.pop("LISTEN_FDS", None)
    raw_names = env.pop("LISTEN_FDNAMES", None)
    if raw_pid is None or raw_fds is None:
        return []
    try:
        pid = int(raw_pid)
        count = int(raw_fds)
    except ValueError:
        raise ListenFdsError(
            f"malformed LISTEN_PID={raw_pid!r} or LISTEN_FDS={raw_fds!r}: start qkdd "
            "from its unit (qkdd.socket) or without these variables"
        ) from None
    if pid != os.getpid():
        # Inherited from a parent that was activated, not meant for us.
        return []
    if count < 0:
        raise ListenFdsError(f"LISTEN_FDS={count} is negative")
    names = raw_names.split(":") if raw_names else ["unknown"] * count
    if len(names) != count:
        raise ListenFdsError(
            f"LISTEN_FDNAMES has {len(names)} names for {count} sockets: check the "
            "FileDescriptorName= of the socket units"
        )
    result: list[tuple[str, socket.socket]] = []
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        try:
            # As sd_listen_fds(): the sockets must not leak into anything we exec.
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            _close_all(result)
            raise ListenFdsError(
                f"inherited fd {fd} ({name!r}) is not a socket ({exc}): qkdd accepts only "
                "ListenStream= sockets"
            ) from exc
        result.append((name, sock))
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            # A datagram socket, or a stream socket nobody called listen() on: the daemon
            # could never accept a connection on it.
            what = (
                "a stream socket that is not listening"
                if sock.type == socket.SOCK_STREAM
                else "not a stream socket"
            )
            _close_all(result)
            raise ListenFdsError(
                f"inherited fd {fd} ({name!r}) is {what}: "
                f"LISTEN_FDS={count} does not describe the sockets passed; qkdd accepts only "
                "ListenStream= sockets (start it from qkdd.socket, or without LISTEN_FDS)"
            )
    return result


def _close_all(pairs: list[tuple[str, socket.socket]]) -> None:
    for _, sock in pairs:
        sock.close()


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Path of credential *name* (``LoadCredential=name...``) if systemd provided it."""
    _check_credential_name(name)
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = os.path.join(directory, name)
    return path if os.path.exists(path) else None


def _check_credential_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a credential name: {name!r}")


#: Where ``LoadCredential=NAME`` (a name, no path: the shipped qkdd.service) loads NAME
#: from, first match wins: the credentials the service manager itself received, then the
#: credential stores. This is the search path compiled into systemd 252 (Debian 12);
#: systemd.exec(5) names /etc, /run and /usr/lib, and the binary also searches /usr/local/lib.
CREDENTIAL_STORES: Final = (
    "/run/credentials/@system",
    "/etc/credstore",
    "/run/credstore",
    "/usr/local/lib/credstore",
    "/usr/lib/credstore",
)


def operator_credential_directories(
    environ: Mapping[str, str] | None = None, stores: Sequence[str] | None = None
) -> list[str]:
    """Where a command run by an operator, outside the service, reads a credential: the
    directory systemd handed over if it runs under a unit (``$CREDENTIALS_DIRECTORY``),
    else where the unit's ``LoadCredential=`` finds it (``stores``, by default
    ``CREDENTIAL_STORES``). The daemon itself uses ``credential_path`` only."""
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        return [directory]
    return list(CREDENTIAL_STORES if stores is None else stores)


def find_credential(name: str, directories: Sequence[str]) -> str | None:
    """The first ``directory/name`` that exists, or None."""
    _check_credential_name(name)
    for directory in directories:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None
