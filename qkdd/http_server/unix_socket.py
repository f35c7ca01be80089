"""HTTP/1.1 on a Unix socket, with Trio: `serve_unix` binds the socket (or takes a ready
listener, e.g. from systemd socket activation) and runs one task per connection, served by
`qkdd.http_server.serving.serve_stream`. A connection's caller is fixed by the kernel
(SO_PEERCRED) when it connects, so it is identified once (`peer_caller`).

Connections are capped below the file-descriptor limit, per uid and in all
(`qkdd.http_server.limits`, `qkdd.http_server.accept`): a connection over a cap has the oldest
idle connection closed to make room, or is refused (answered 503 and closed at once) when none
is idle. When accept(2) fails for want of descriptors anyway, the listener logs one warning,
backs off briefly and carries on.

The socket is bound under a temporary name and renamed into place with its mode already set,
and removed on the way out only if it is still the one bound here (`bind_unix`,
`remove_if_ours`; the metrics listener binds its socket the same way).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable

import trio

from qkdd.constants import DEFAULT_REQUEST_TIMEOUT, LISTEN_BACKLOG
from qkdd.etsi014.key_pool import KeyServiceError
from qkdd.http_server.accept import (
    ConnectionGate,
    ConnectionSlot,
    accept_forever,
    api_connection_table,
    refuse_now,
)
from qkdd.http_server.exchange import Caller
from qkdd.http_server.limits import ConnectionTable
from qkdd.http_server.serving import (
    BeforeSend,
    Handler,
    Observe,
    serve_stream,
)

log = logging.getLogger("qkdd.api")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Identify = Callable[[int, int], frozenset[str]]


class SocketPathError(KeyServiceError):
    """The API socket cannot be created at the configured path."""


async def serve_unix(
    path: str,
    handler: Handler,
    identify: Identify,
    *,
    mode: int = 0o660,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    idle_timeout: float | None = None,
    connections: ConnectionTable | None = None,
    task_status: trio.TaskStatus[trio.SocketListener] = trio.TASK_STATUS_IGNORED,
    listener: trio.SocketListener | None = None,
    observe: Observe | None = None,
    before_send: BeforeSend | None = None,
) -> None:
    """Serve `handler` on the Unix socket `path` until cancelled.

    With `listener` given (an already listening Unix socket), `path` is only used in logs and
    nothing is bound, chmod-ed or removed. `task_status.started(listener)` is called once
    connections are accepted. `observe` is told of each answered request. `idle_timeout`
    (default: `request_timeout`) closes a connection with no request in progress;
    `connections` caps the connections (default: `api_connection_table()`), by uid.
    `before_send` is awaited before each answer's bytes are sent.
    """
    gate = ConnectionGate(connections or api_connection_table(), "unix")
    idle = request_timeout if idle_timeout is None else idle_timeout
    bound_inode: int | None = None
    if listener is None:
        listener, bound_inode = await bind_unix(path, mode)
    try:
        async with trio.open_nursery() as nursery:
            counter = itertools.count(1)

            def on_accept(stream: trio.SocketStream) -> None:
                caller = peer_caller(stream.socket, identify)
                slot = gate.admit(caller.uid, f"uid={caller.uid}")
                if slot is None:
                    refuse_now(stream)
                    return
                nursery.start_soon(
                    _serve_connection,
                    stream,
                    caller,
                    slot,
                    handler,
                    (request_timeout, idle),
                    next(counter),
                    observe,
                    before_send,
                )

            await nursery.start(
                functools.partial(accept_forever, listener, on_accept, transport="unix")
            )
            limits = gate.table.limits
            log.info(
                "event=api_listening path=%s mode=%s max_connections=%d per_uid=%d fd_limit=%d",
                path,
                oct(mode) if bound_inode is not None else "inherited",
                limits.max_total,
                limits.max_per_owner,
                limits.fd_limit,
            )
            task_status.started(listener)
    finally:
        gate.log_totals()
        if bound_inode is not None:
            remove_if_ours(path, bound_inode)
            await listener.aclose()


async def bind_unix(path: str, mode: int, what: str = "API") -> tuple[trio.SocketListener, int]:
    """A listening socket at `path` and the inode of its name; `what` names the socket in
    errors."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketPathError(
                f"{path} exists and is not a socket; remove it or configure another {what} socket"
            )
        if _is_live(path):
            raise SocketPathError(f"another process is serving {path}; stop it first")
    # Bind under a temporary name and chmod before renaming into place, so the socket never
    # exists at `path` with the umask's permissions.
    temp = f"{path}.{os.getpid()}.tmp"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(temp):
            os.unlink(temp)
        await sock.bind(temp)
        os.chmod(temp, mode)
        os.rename(temp, path)  # replaces a stale socket atomically
        sock.listen(LISTEN_BACKLOG)
        inode = os.lstat(path).st_ino
    except OSError as exc:
        sock.close()
        if os.path.lexists(temp):
            os.unlink(temp)
        raise SocketPathError(f"cannot create {what} socket {path}: {exc.strerror or exc}") from exc
    return trio.SocketListener(sock), inode


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def remove_if_ours(path: str, inode: int) -> None:
    """Unlink `path` only if it is still the socket we bound, not a successor's."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def peer_caller(sock: trio.socket.SocketType, identify: Identify) -> Caller:
    """The connecting process's uid/gid from SO_PEERCRED, and the SAEs `identify` grants it."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        _pid, uid, gid = _PEERCRED.unpack(raw)
    except (OSError, AttributeError, struct.error) as exc:
        log.warning("event=api_no_peercred reason=%r; treating the caller as unknown", str(exc))
        return Caller(None, None, frozenset(), description="local process of unknown uid")
    try:
        sae_ids = frozenset(identify(uid, gid))
    except Exception:
        log.exception(
            "event=api_identify_failed uid=%d gid=%d; treating the caller as unknown", uid, gid
        )
        sae_ids = frozenset()
    return Caller(uid, gid, sae_ids)


async def _serve_connection(
    stream: trio.SocketStream,
    caller: Caller,
    slot: ConnectionSlot,
    handler: Handler,
    timeouts: tuple[float, float],
    conn_id: int,
    observe: Observe | None,
    before_send: BeforeSend | None,
) -> None:
    try:
        log.debug(
            "event=api_open conn=%d uid=%s gid=%s sae_ids=%s",
            conn_id,
            caller.uid,
            caller.gid,
            ",".join(sorted(caller.sae_ids)),
        )
        await serve_stream(
            stream,
            handler,
            caller,
            who=f"uid={caller.uid}",
            request_timeout=timeouts[0],
            idle_timeout=timeouts[1],
            slot=slot,
            conn_id=conn_id,
            observe=observe,
            before_send=before_send,
        )
    finally:
        await trio.aclose_forcefully(stream)
        slot.release()
