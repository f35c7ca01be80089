"""Talking to strongSwan's IKE daemon (charon) over its VICI socket: the only code in qkdd
that changes an IKE daemon.

:class:`ViciClient` runs one command per connection (``qkdd.ipsec.vici`` holds the bytes).
:class:`CharonPpk` is what a binding needs of charon:

- :meth:`~CharonPpk.install` checks that the binding's connection is loaded with the
  binding's ``ppk_id`` and ``ppk_required = yes``, then loads the PPK (``load-shared``,
  type PPK, owner the PPK ID) under a unique ID of its own, so each install replaces the
  previous PPK in place.
- :meth:`~CharonPpk.reauthenticate` makes the connection's IKE SA pick the new PPK up:
  charon mixes a PPK in only when an IKE SA is authenticated (IKE_AUTH, RFC 8784), so a
  running IKE SA is reauthenticated (``rekey`` with ``reauth``: a new IKE SA and its
  CHILD SAs, make-before-break where charon is set so), and if there is none the
  connection's CHILD SAs are initiated.
- :meth:`~CharonPpk.tear_down` fails closed: it unloads the PPK, so with
  ``ppk_required`` no IKE SA of the connection can be authenticated any more, and ends
  the connection's IKE SAs (and with them their CHILD SAs), so traffic stops at once.

The PPK crosses only the local VICI socket (owned by root, or by whom charon's
``charon.plugins.vici.socket`` says); it is never logged and never in an error.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from qkdd.constants import REAUTH_POLL, REAUTH_WAIT, TERMINATE_WAIT_MS, VICI_TIMEOUT
from qkdd.ipsec.ipsec_binding import IpsecBinding, IpsecError
from qkdd.ipsec.vici import (
    CommandExchange,
    CommandUnknownError,
    Section,
    SegmentReader,
    ViciError,
    sections,
    text,
)

ESTABLISHED: Final = "ESTABLISHED"
_READ_SIZE: Final = 65536


class CharonError(IpsecError):
    """charon could not be reached, refused a command, or is not set up as the binding
    needs."""


class CharonUnreachableError(CharonError):
    """The VICI socket cannot be opened (charon not running, no vici plugin, wrong path,
    no permission)."""


class ViciClient:
    """One VICI command per connection to charon's socket at ``socket_path``."""

    def __init__(self, socket_path: str, *, timeout: float = VICI_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ViciClient({self.socket_path!r})"

    async def call(
        self, command: str, arguments: Mapping[str, object] = {}, *, event: str | None = None
    ) -> tuple[Section, list[Section]]:
        """Run ``command``; return charon's response and the ``event`` messages it streamed
        before it."""
        exchange = CommandExchange(command, arguments, event=event)
        try:
            with trio.fail_after(self.timeout):
                stream = await self._connect()
                async with stream:
                    await stream.send_all(exchange.start())
                    reader = SegmentReader()
                    while not exchange.done:
                        data = await stream.receive_some(_READ_SIZE)
                        if not data:
                            raise CharonError(
                                f"charon closed the VICI connection during {command!r}"
                            )
                        for packet in reader.feed(data):
                            reply = exchange.receive(packet)
                            if reply:
                                await stream.send_all(reply)
        except trio.TooSlowError:
            raise CharonError(
                f"charon did not answer {command!r} on {self.socket_path} within {self.timeout:g} s"
            ) from None
        except CommandUnknownError as exc:
            raise CharonError(f"{exc} (strongSwan 5.7 or later is needed)") from None
        except ViciError as exc:
            raise CharonError(f"{command!r} on {self.socket_path}: {exc}") from None
        except trio.BrokenResourceError as exc:
            raise CharonError(
                f"the VICI connection to {self.socket_path} broke during {command!r}: {exc}"
            ) from None
        assert exchange.response is not None
        return exchange.response, exchange.events

    async def _connect(self) -> trio.SocketStream:
        try:
            return await trio.open_unix_socket(self.socket_path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                why = "is charon running, with the vici plugin, and is vici_socket right?"
            elif exc.errno in (errno.EACCES, errno.EPERM):
                why = "permission denied: the daemon must be allowed to use charon's socket"
            else:
                why = exc.strerror or str(exc)
            raise CharonUnreachableError(
                f"cannot reach charon's VICI socket {self.socket_path}: {why}"
            ) from None

    async def command(self, command: str, arguments: Mapping[str, object] = {}) -> Section:
        """Run a command that answers ``success``/``errmsg``; CharonError unless it
        succeeded."""
        response, _ = await self.call(command, arguments)
        if text(response, "success") != "yes":
            reason = text(response, "errmsg") or "no reason given"
            raise CharonError(f"charon refused {command!r}: {reason}")
        return response


@dataclass(frozen=True)
class IkeSa:
    """One IKE SA of a connection as ``list-sas`` reports it."""

    unique_id: int
    state: str
    ppk: bool  # a PPK was mixed into its keys (charon's COND_PPK)
    established: int | None  # seconds since it was established
    children: tuple[str, ...]  # the CHILD SAs' states, e.g. INSTALLED


@dataclass(frozen=True)
class Connection:
    """What ``list-conns`` says about a loaded connection."""

    name: str
    ppk_id: str | None
    ppk_required: bool
    children: tuple[str, ...]


class PpkInstaller(Protocol):
    """What a rotator needs of the IKE daemon; raises IpsecError on failure."""

    async def install(self, binding: IpsecBinding, ppk: bytes) -> None:
        """Check the binding's connection and load ``ppk`` under the binding's PPK ID."""

    async def reauthenticate(self, binding: IpsecBinding, *, wait: float) -> str:
        """Put the connection's IKE SA on the installed PPK (a new IKE SA) and wait until
        it is up; returns what was done."""

    async def tear_down(self, binding: IpsecBinding) -> str:
        """Unload the PPK and end the connection's SAs; returns what was done."""


class CharonPpk:
    """:class:`PpkInstaller` for strongSwan's charon over VICI."""

    def __init__(self, socket_path: str, *, timeout: float = VICI_TIMEOUT) -> None:
        self.vici = ViciClient(socket_path, timeout=timeout)

    def __repr__(self) -> str:
        return f"CharonPpk({self.vici.socket_path!r})"

    async def connection(self, name: str) -> Connection | None:
        """The loaded connection ``name``, or None."""
        _, events = await self.vici.call("list-conns", {"ike": name}, event="list-conn")
        for event in events:
            for conn_name, conn in sections(event):
                if conn_name != name:
                    continue
                return Connection(
                    name=conn_name,
                    ppk_id=text(conn, "ppk_id"),
                    ppk_required=text(conn, "ppk_required") == "yes",
                    children=tuple(child for child, _ in sections(conn, "children")),
                )
        return None

    async def ike_sas(self, name: str) -> list[IkeSa]:
        """The IKE SAs of connection ``name``, oldest first."""
        _, events = await self.vici.call(
            "list-sas", {"ike": name, "noblock": "yes"}, event="list-sa"
        )
        found = []
        for event in events:
            for sa_name, sa in sections(event):
                if sa_name != name:
                    continue
                established = text(sa, "established")
                found.append(
                    IkeSa(
                        unique_id=int(text(sa, "uniqueid") or 0),
                        state=text(sa, "state") or "",
                        ppk=text(sa, "ppk") == "yes",
                        established=int(established) if established else None,
                        children=tuple(
                            text(child, "state") or "" for _, child in sections(sa, "child-sas")
                        ),
                    )
                )
        return sorted(found, key=lambda sa: sa.unique_id)

    async def checked_connection(self, binding: IpsecBinding) -> Connection:
        """The binding's connection, checked to require the binding's PPK; CharonError
        saying what to fix otherwise."""
        conn = await self.connection(binding.connection)
        where = f"connection {binding.connection!r} in charon ({self.vici.socket_path})"
        if conn is None:
            raise CharonError(
                f"{where} is not loaded: define it in swanctl.conf and run `swanctl --load-conns`"
            )
        if conn.ppk_id != binding.ppk_id:
            raise CharonError(
                f"{where} has ppk_id {conn.ppk_id!r}; the binding needs ppk_id = "
                f"{binding.ppk_id} in its swanctl.conf entry"
            )
        if not conn.ppk_required:
            # Without it an IKE SA comes up without a PPK once qkdd removes it: failing
            # closed would not close anything.
            raise CharonError(f"{where} must set ppk_required = yes")
        return conn

    async def install(self, binding: IpsecBinding, ppk: bytes) -> None:
        await self.checked_connection(binding)
        await self.vici.command(
            "load-shared",
            {
                "id": binding.secret_id,
                "type": "PPK",
                "data": ppk,
                "owners": [binding.ppk_id],
            },
        )

    async def reauthenticate(self, binding: IpsecBinding, *, wait: float = REAUTH_WAIT) -> str:
        """Ask for a new IKE SA on the installed PPK and wait up to ``wait`` seconds until
        it is established with a PPK; CharonError if it is not (the old IKE SA, if any,
        keeps running on the previous PPK)."""
        conn = await self.checked_connection(binding)
        before = [sa for sa in await self.ike_sas(binding.connection) if sa.state == ESTABLISHED]
        newest_before = max((sa.unique_id for sa in before), default=0)
        if before:
            await self.vici.command("rekey", {"ike": binding.connection, "reauth": "yes"})
            asked = "a reauthentication of IKE SA " + ",".join(f"#{sa.unique_id}" for sa in before)
        else:
            # timeout -1: charon answers at once and establishes in the background.
            for child in conn.children or (None,):
                arguments: dict[str, object] = {"ike": binding.connection, "timeout": -1}
                if child is not None:
                    arguments["child"] = child
                await self.vici.command("initiate", arguments)
            asked = "a new IKE SA"
        deadline = trio.current_time() + wait
        while True:
            for sa in await self.ike_sas(binding.connection):
                if sa.unique_id > newest_before and sa.state == ESTABLISHED and sa.ppk:
                    return f"IKE SA #{sa.unique_id} up with the PPK ({asked})"
            if trio.current_time() >= deadline:
                raise CharonError(
                    f"asked charon for {asked} of {binding.connection!r}, but no new IKE SA "
                    f"with a PPK was up within {wait:g} s (charon's log says why; a PPK that "
                    "differs between the sites shows as AUTHENTICATION_FAILED)"
                )
            await trio.sleep(REAUTH_POLL)

    async def tear_down(self, binding: IpsecBinding) -> str:
        # The PPK goes first: from here on no IKE SA of the connection authenticates.
        await self.vici.command("unload-shared", {"id": binding.secret_id})
        response, _ = await self.vici.call(
            "terminate",
            {
                "ike": binding.connection,
                "force": "yes",
                "timeout": TERMINATE_WAIT_MS,
            },
        )
        matches = int(text(response, "matches") or 0)
        terminated = int(text(response, "terminated") or 0)
        if matches and terminated < matches:
            reason = text(response, "errmsg") or "no reason given"
            raise CharonError(
                f"charon ended {terminated} of {matches} IKE SAs of {binding.connection!r}: "
                f"{reason}"
            )
        return f"PPK unloaded, {terminated} IKE SA(s) ended"
