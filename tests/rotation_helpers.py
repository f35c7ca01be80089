"""Helpers shared by the tests of tunnel keys kept fresh from hybrid keys (WireGuard PSKs
in tests/test_wireguard*.py, IPsec PPKs in tests/test_ipsec*.py): both sites' key stores
for one binding, a driving and another rotator wired to each other as the peer channel
would, the log events of a rotator, and the set-up of the end-to-end tests (tools installed
with apt-get, a binding added to both demo sites)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from qkdd.rotation.key_rotator import KeyRotator, PeerUnreachableError

# Timers short enough for minutes of virtual time, in the proportions of the defaults.
FAST: dict[str, Any] = dict(interval=10.0, max_key_age=60.0, startup_timeout=15.0)


class KeyPool:
    """Both sites' stores for the binding's SAE pair: the same keys under the same IDs.
    The driving site takes the next ready key; the other site takes it by ID. ``key``
    is the tunnel key a site derives from one of them with ``derive``."""

    def __init__(self, derive: Callable[[bytes, str, str], bytes], binding_name: str) -> None:
        self.derive = derive
        self.binding_name = binding_name
        self.ready: deque[str] = deque()
        self.at_peer: dict[str, bytes] = {}
        self.material: dict[str, bytes] = {}
        self.taken: list[str] = []

    def add(self, count: int = 1) -> None:
        for _ in range(count):
            key_id = str(uuid.uuid4())
            self.material[key_id] = self.at_peer[key_id] = os.urandom(32)
            self.ready.append(key_id)

    def take_fresh_key(self) -> tuple[str, bytes] | None:
        if not self.ready:
            return None
        key_id = self.ready.popleft()
        self.taken.append(key_id)
        return key_id, self.material[key_id]

    def key(self, key_id: str) -> bytes:
        return self.derive(self.material[key_id], self.binding_name, key_id)


class RotatorPair:
    """A driving (master) and another (slave) rotator wired to each other as the peer
    channel would: announce() makes the slave install the key it takes by ID. Both are
    made by ``rotator`` with ``installer`` (None: the real one)."""

    def __init__(
        self,
        pool: KeyPool,
        rotator: Callable[..., KeyRotator[Any, Any]],
        master_binding: object,
        slave_binding: object,
        installer: object = None,
        announce_hook: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.peer_up = True
        self.announce_hook = announce_hook
        self.slave = rotator(slave_binding, installer=installer)
        self.master = rotator(
            master_binding,
            installer=installer,
            take_fresh_key=pool.take_fresh_key,
            announce=self.announce,
            peer_unavailable=self.peer_unavailable,
        )

    def peer_unavailable(self) -> str | None:
        return None if self.peer_up else "no session with site site-b"

    async def announce(self, key_id: str) -> None:
        if self.announce_hook is not None:
            await self.announce_hook()
        if not self.peer_up:
            raise PeerUnreachableError("the session with site site-b ended")
        await self.slave.install_announced(key_id, self.pool.at_peer.pop(key_id))

    async def first_install(self) -> tuple[str, str]:
        results: dict[str, str] = {}

        async def one(side: str, rotator: KeyRotator[Any, Any]) -> None:
            results[side] = await rotator.first_install()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "master", self.master)
            nursery.start_soon(one, "slave", self.slave)
        return results["master"], results["slave"]

    def states(self) -> tuple[object, object]:
        return self.master.status()["state"], self.slave.status()["state"]


def logged_events(caplog: pytest.LogCaptureFixture, logger: str, name: str) -> list[str]:
    """The lines of event ``name`` that ``logger`` logged."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger and f"event={name} " in r.getMessage()
    ]


def install_debian_packages(missing: Sequence[str]) -> None:
    """Install ``missing`` with apt-get where there is apt-get (updating the package lists
    if the first try fails); skip the test saying why if that fails."""
    if not missing or not shutil.which("apt-get"):
        return
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:  # perhaps no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot install {' '.join(missing)}: {done.stderr.strip()[-300:]}")


# Each demo site's config file and its peer site.
DEMO_BINDING_SITES = (("site-a.toml", "site-b"), ("site-b.toml", "site-a"))


def bind_demo_sites(
    directory: Path, section: str, saes: tuple[str, str], fields: tuple[str, str]
) -> None:
    """Give both demo sites in ``directory`` a ``[[section]]`` binding: site A's SAE is
    ``saes[0]`` and site B's ``saes[1]`` (each site serves its own and knows the other's as
    remote); ``fields`` are the rest of each site's table (TOML lines), A's first."""
    for index, (name, peer) in enumerate(DEMO_BINDING_SITES):
        local, remote = saes[index], saes[1 - index]
        path = directory / name
        text = path.read_text()
        text = text.replace("remote_sae_ids = [", f'remote_sae_ids = ["{remote}", ')
        text = text.replace("[[peers]]", f'[[consumers]]\nsae_id = "{local}"\n\n[[peers]]')
        path.write_text(
            text
            + f'\n[[{section}]]\nname = "tunnel-a-b"\npeer_site = "{peer}"\n'
            + f'local_sae = "{local}"\nremote_sae = "{remote}"\n{fields[index]}'
        )
