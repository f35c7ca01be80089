"""``SerialDevice``: the host end of the serial protocol over a tty, with pyserial and Trio.

Theory of operation: ``run`` loops forever over *sessions*. A session opens the port
(pyserial only configures it: 8N1, exclusive lock, non-blocking), sends HELLO, and then
pumps bytes through ``HostProtocol`` from one task: wait until the fd is readable, read,
feed, store any new keys in the sink, ACK them, write what the protocol queued. A session
ends by raising a ``DeviceError``; the port is closed and the next session starts after a
capped exponential backoff. Deadlines, all enforced with one ``move_on_at``:
- HELLO must be answered within ``hello_timeout``;
- once in session, some valid frame (STATUS is a heartbeat) must arrive within
  ``idle_timeout``;
- a frame that has started must be complete within ``stall_timeout``.
Time spent in the sink does not count towards them.

A device of protocol version 2 or later says which end of which link it is (IDENTITY)
before any key: given ``expected_identity`` (this site and the peer's), the driver refuses
a device that names other sites (``WrongDeviceError``, retried with backoff so a fixed
device path is picked up) and stores none of its keys. A device that says nothing (version
1, or not told) is accepted with a warning once per device session.

Logs go to the ``qkdd.device`` logger, one event per line as ``event key=value``; key
material is never logged (key IDs are not secret and are logged at debug level only).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import termios

import serial  # type: ignore[import-untyped]
import trio

from ..base import (
    DEFAULT_RECONNECT_INITIAL_DELAY,
    DEFAULT_RECONNECT_MAX_DELAY,
    DeviceStatus,
    KeyDelivery,
    KeySink,
    QkdDevice,
    QkdKey,
)
from ..dedup import DEFAULT_RECENT_IDS
from ..device_errors import (
    DeviceBusyError,
    DeviceError,
    DeviceHangupError,
    DeviceNotFoundError,
    DevicePermissionError,
    DeviceTimeoutError,
    DeviceUnavailableError,
    IncompatibleDeviceError,
    KeySinkError,
    NotATtyError,
    WrongDeviceError,
)
from .protocol import (
    ErrorReceived,
    FrameDropped,
    HostEvent,
    HostProtocol,
    HostState,
    KeysReceived,
    MessageIgnored,
    PeerIncompatible,
    RehandshakeStarted,
    SequenceGap,
    SerialHandshakeComplete,
    StatusReceived,
)
from .serial_constants import DEFAULT_HELLO_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_STALL_TIMEOUT
from .serial_messages import Identity, KeyEntry, LinkState, SerialErrorCode

__all__ = ["SerialDevice", "open_serial_port"]

log = logging.getLogger("qkdd.device")

#: One read takes whatever the tty holds, up to this much.
READ_SIZE = 65536
#: Damaged frames are logged at most once per this many seconds, with a count.
DROPPED_LOG_INTERVAL = 10.0


def _file_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a character device"


def open_serial_port(path: str, baudrate: int) -> serial.Serial:
    """Open and configure a serial port; raises a ``DeviceUnavailableError`` subclass
    whose message says in plain words what is wrong."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeviceNotFoundError(f"no such device {path}") from None
    except PermissionError:
        raise DevicePermissionError(
            f"permission denied looking up {path}; check the permissions of its directory"
        ) from None
    except OSError as exc:
        raise DeviceUnavailableError(f"cannot look up {path}: {exc.strerror}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise NotATtyError(
            f"{path} is not a serial device (it is {_file_kind(st.st_mode)}); "
            "check the device path in the configuration"
        )
    try:
        port = serial.Serial(
            path,
            baudrate,
            bytesize=8,
            parity="N",
            stopbits=1,
            exclusive=True,
            timeout=0,
        )
    except serial.SerialException as exc:
        raise _open_error(path, exc) from None
    except (OSError, ValueError) as exc:  # bad baud rate, or termios refusing it
        raise DeviceUnavailableError(f"cannot configure {path}: {exc}") from None
    if not os.isatty(port.fileno()):
        port.close()
        raise NotATtyError(f"{path} is not a terminal device; check the device path")
    return port


def _open_error(path: str, exc: serial.SerialException) -> DeviceUnavailableError:
    code = getattr(exc, "errno", None)
    cause = exc.__context__
    if code is None and isinstance(cause, termios.error) and cause.args:
        # pyserial reports termios failures (ENOTTY...) as text; the errno is on the cause.
        code = cause.args[0]
    if code in (errno.ENOENT, errno.ENXIO, errno.ENODEV, errno.EIO):
        return DeviceNotFoundError(f"no such device {path} (it went away while opening)")
    if code in (errno.EACCES, errno.EPERM):
        return DevicePermissionError(
            f"permission denied opening {path}; add the daemon's user to the group that "
            "owns it (often 'dialout')"
        )
    if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY):
        return DeviceBusyError(
            f"{path} is in use by another process (exclusive lock held); stop that process"
        )
    if code == errno.ENOTTY:
        return NotATtyError(
            f"{path} is a character device but not a serial port; check the device path"
        )
    return DeviceUnavailableError(f"cannot open {path}: {exc}")


class SerialDevice(QkdDevice):
    """A QKD device attached through a serial port (or a pty from ``qkd-emulator``)."""

    def __init__(
        self,
        path: str,
        baudrate: int = 115200,
        *,
        reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
        reconnect_initial_delay: float = DEFAULT_RECONNECT_INITIAL_DELAY,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        recent_ids: int = DEFAULT_RECENT_IDS,
        name: str = "qkdd",
        expected_identity: Identity | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        # This site and the peer's: the end of the link this daemon must be attached to.
        self.expected_identity = expected_identity
        self.baudrate = baudrate
        self.reconnect_max_delay = reconnect_max_delay
        self.reconnect_initial_delay = min(reconnect_initial_delay, reconnect_max_delay)
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        self.stall_timeout = stall_timeout
        self.name = name
        self._delivery = KeyDelivery(self, recent_ids)
        self._session_was_up = False
        self._link_words = ""
        self._device_words = f"connected on {path}"
        self._dropped = 0
        self._dropped_logged_at = -math.inf
        self.status = DeviceStatus(state="connecting", detail=f"not yet opened {path}")

    def __repr__(self) -> str:
        return f"SerialDevice({self.path!r}, {self.baudrate})"

    # -- the reconnect loop --

    async def run(
        self, sink: KeySink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        delay = self.reconnect_initial_delay
        started = False
        while True:
            self._update(state="connecting", detail=f"opening {self.path}")
            error: Exception
            try:
                port = open_serial_port(self.path, self.baudrate)
            except DeviceUnavailableError as exc:
                error = exc
            else:
                if not started:
                    task_status.started()
                    started = True
                self._session_was_up = False
                try:
                    await self._session(port, sink)
                except DeviceError as exc:
                    error = exc
                except OSError as exc:
                    error = DeviceHangupError(f"{self.path}: I/O error: {exc.strerror or exc}")
                except Exception as exc:
                    # A fault in this process must not stop key delivery for good; the
                    # traceback goes to the log and the session is retried.
                    log.exception("device.unexpected-error path=%s", self.path)
                    error = exc
                finally:
                    trio.lowlevel.notify_closing(port.fileno())
                    port.close()
                if self._session_was_up:
                    delay = self.reconnect_initial_delay
            if not started:
                task_status.started()
                started = True
            # The wrong device needs an operator; other faults usually pass by themselves.
            report = log.error if isinstance(error, WrongDeviceError) else log.warning
            report(
                "device.down path=%s error=%s reason=%r retry_in=%g",
                self.path,
                type(error).__name__,
                str(error),
                delay,
            )
            self._update(
                state="down",
                detail=f"{error}; retrying in {delay:g} s",
                qber=None,
                secret_key_rate=None,
                keys_buffered=None,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_delay)

    # -- one session on an open port --

    async def _session(self, port: serial.Serial, sink: KeySink) -> None:
        fd = port.fileno()
        proto = HostProtocol(name=self.name)
        self._link_words = ""  # nothing known about this session's link yet
        log.info("device.opened path=%s baudrate=%d", self.path, self.baudrate)
        self._update(state="connecting", detail=f"{self.path} open; waiting for HELLO answer")
        proto.start()
        await self._write(fd, proto.data_to_send())
        now = trio.current_time()
        hello_deadline = now + self.hello_timeout
        last_frame = now
        frame_started: float | None = None
        bytes_received = 0
        while True:
            if proto.state in (HostState.AWAIT_HELLO, HostState.AWAIT_IDENTITY):
                deadline = hello_deadline
                # Bytes but no valid frame is what a line at the wrong speed looks like.
                hint = (
                    f"{bytes_received} bytes arrived but no valid frame: is the baud rate "
                    f"({self.baudrate}) the device's?"
                    if bytes_received and proto.frames_ok == 0
                    else "is a QKD device speaking protocol v1 attached?"
                )
                timeout: Exception = DeviceTimeoutError(
                    f"{self.path}: the device did not answer HELLO within "
                    f"{self.hello_timeout:g} s ({hint})"
                )
            else:
                deadline = last_frame + self.idle_timeout
                timeout = DeviceTimeoutError(
                    f"{self.path}: no frame from the device for {self.idle_timeout:g} s"
                )
            if frame_started is not None and frame_started + self.stall_timeout < deadline:
                deadline = frame_started + self.stall_timeout
                timeout = DeviceTimeoutError(
                    f"{self.path}: the device stalled in the middle of a frame for "
                    f"{self.stall_timeout:g} s"
                )
            data: bytes | None = None
            with trio.move_on_at(deadline):
                data = await self._read(fd)
            if data is None:
                raise timeout
            bytes_received += len(data)
            now = trio.current_time()
            ok_before = proto.frames_ok
            seen_before = proto.frames_seen
            events = proto.receive_data(data)
            if proto.frames_ok != ok_before:
                last_frame = now
            if not proto.in_frame:
                frame_started = None
            elif frame_started is None or proto.frames_seen != seen_before:
                frame_started = now
            entries, hello_again = self._handle_events(events)
            if hello_again:
                hello_deadline = now + self.hello_timeout
            if entries:
                await self._deliver(entries, proto, sink)
                # Time spent in the sink is not the device's silence or stall.
                last_frame = trio.current_time()
                if frame_started is not None:
                    frame_started = last_frame
            out = proto.data_to_send()
            if out:
                await self._write(fd, out)

    def _handle_events(self, events: list[HostEvent]) -> tuple[list[KeyEntry], bool]:
        entries: list[KeyEntry] = []
        hello_again = False
        for ev in events:
            if isinstance(ev, KeysReceived):
                entries += ev.keys
            elif isinstance(ev, StatusReceived):
                st = ev.status
                self._link_words = f"QKD link {st.link_state.name.lower()}"
                self._update(
                    qber=st.qber,
                    secret_key_rate=None
                    if st.secret_key_rate is None
                    else float(st.secret_key_rate),
                    keys_buffered=st.keys_buffered,
                    detail=self._up_detail(),
                )
                if st.link_state is not LinkState.UP:
                    log.debug("device.link path=%s state=%s", self.path, st.link_state.name)
            elif isinstance(ev, SerialHandshakeComplete):
                self._check_identity(ev.identity)
                self._session_was_up = True
                end = (
                    f", {ev.identity.site}'s end of the link to {ev.identity.peer_site}"
                    if ev.identity
                    else ""
                )
                self._device_words = (
                    f"connected to {ev.device_name or 'device'!r} on {self.path} "
                    f"(protocol v{ev.version}, window {ev.window}{end})"
                )
                log.info(
                    "device.up path=%s device=%r version=%d window=%d",
                    self.path,
                    ev.device_name,
                    ev.version,
                    ev.window,
                )
                self._update(state="up", detail=self._up_detail())
            elif isinstance(ev, RehandshakeStarted):
                hello_again = True
                log.warning("device.rehandshake path=%s reason=%r", self.path, ev.reason)
                self._update(state="connecting", detail=f"{ev.reason}; saying HELLO again")
            elif isinstance(ev, PeerIncompatible):
                raise IncompatibleDeviceError(
                    f"{self.path}: {ev.reason}; upgrade qkdd or the device firmware"
                )
            elif isinstance(ev, ErrorReceived):
                try:
                    name = SerialErrorCode(ev.code).name
                except ValueError:
                    name = "UNKNOWN"
                log.warning(
                    "device.error path=%s code=%d name=%s detail=%r",
                    self.path,
                    ev.code,
                    name,
                    ev.detail,
                )
            elif isinstance(ev, FrameDropped):
                self._note_dropped(ev.reason)
            elif isinstance(ev, SequenceGap):
                log.info(
                    "device.sequence-gap path=%s expected=%d received=%d",
                    self.path,
                    ev.expected,
                    ev.received,
                )
            elif isinstance(ev, MessageIgnored):
                log.debug(
                    "device.ignored path=%s type=%s state=%s", self.path, ev.msg_type.name, ev.state
                )
        return entries, hello_again

    def _check_identity(self, identity: Identity | None) -> None:
        """Refuse a device that says it is another site's end, or another link's."""
        expected = self.expected_identity
        if expected is None:
            return
        if identity is None:
            log.warning(
                "device.identity-unknown path=%s expected_site=%s expected_peer=%s "
                "reason='the device does not say which end of which link it is (protocol "
                "v1, or not configured), so it cannot be checked to be this site's end'",
                self.path,
                expected.site,
                expected.peer_site,
            )
            return
        if identity != expected:
            raise WrongDeviceError(
                f"{self.path} is {identity.site!r}'s end of the QKD link to "
                f"{identity.peer_site!r}, but this daemon is site {expected.site!r} linking "
                f"to {expected.peer_site!r}: the device path leads to the wrong device (a "
                "stale link left behind?); no key is taken from it. Point [peers.device] "
                "path at this site's end of the link"
            )

    def _note_dropped(self, reason: str) -> None:
        # A noisy line can damage many frames a second: one warning per interval, counted.
        self._dropped += 1
        now = trio.current_time()
        if now - self._dropped_logged_at >= DROPPED_LOG_INTERVAL:
            log.warning(
                "device.frames-dropped path=%s count=%d last_reason=%r",
                self.path,
                self._dropped,
                reason,
            )
            self._dropped = 0
            self._dropped_logged_at = now

    def _up_detail(self) -> str:
        words = self._device_words
        return f"{words}; {self._link_words}" if self._link_words else words

    async def _deliver(self, entries: list[KeyEntry], proto: HostProtocol, sink: KeySink) -> None:
        """Store new keys in the sink, then ACK every received ID (duplicates included:
        the device keeps a key until it is acknowledged)."""
        fresh, duplicates, conflicts = self._delivery.sort(
            QkdKey.from_wire(entry.key_id, entry.material) for entry in entries
        )
        if fresh:

            def failed(exc: Exception) -> KeySinkError:
                return KeySinkError(
                    f"storing {len(fresh)} keys failed ({exc}); they stay on the device "
                    "and will be resent"
                )

            await self._delivery.store(sink, fresh, failed)
        proto.acknowledge([entry.key_id for entry in entries])
        log.debug("device.keys path=%s stored=%d duplicates=%d", self.path, len(fresh), duplicates)
        if conflicts:
            log.error(
                "device.key-id-conflict path=%s count=%d action=kept-first-copy "
                "hint='the device resent key IDs with different material; report this'",
                self.path,
                conflicts,
            )

    # -- non-blocking I/O on the tty fd --

    async def _read(self, fd: int) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise DeviceHangupError(
                        f"{self.path} hung up (EIO): the device was unplugged or its pty closed"
                    ) from None
                raise DeviceHangupError(f"reading {self.path} failed: {exc.strerror}") from None
            if not data:
                raise DeviceHangupError(f"{self.path} reported end of file: the device hung up")
            return data + self._drain(fd, READ_SIZE - len(data))

    @staticmethod
    def _drain(fd: int, most: int) -> bytes:
        """What else is waiting to be read now, up to ``most`` bytes: a pty hands out at
        most 4 KiB a read, and every read's keys cost a store and a durable commit, so the
        frames that queued up while the sink was busy are taken in one go. An error is left
        for the next read to report."""
        parts: list[bytes] = []
        while most > 0:
            try:
                more = os.read(fd, most)
            except OSError:  # nothing more now (BlockingIOError), or a hang-up: next read
                break
            if not more:
                break
            parts.append(more)
            most -= len(more)
        return b"".join(parts)

    async def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        with trio.move_on_after(self.stall_timeout):
            while view:
                try:
                    written = os.write(fd, view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        raise DeviceHangupError(
                            f"{self.path} hung up (EIO) while writing: the device was "
                            "unplugged or its pty closed"
                        ) from None
                    raise DeviceHangupError(f"writing {self.path} failed: {exc.strerror}") from None
                view = view[written:]
            return
        raise DeviceTimeoutError(
            f"{self.path}: the device stopped reading; a write did not finish within "
            f"{self.stall_timeout:g} s"
        )
