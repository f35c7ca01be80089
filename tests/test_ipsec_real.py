"""IPsec PPKs with the real strongSwan IKE daemon (charon from Debian's packages).

Two kinds of test, both against charon processes started here in network namespaces made
here:

- qkdd's VICI code against one charon: commands, streamed events, PPK loading, and the
  checks of a connection's PPK settings, with charon as the only judge of the bytes.
- Two qkdd sites keeping the PPK of a real IKEv2 tunnel: two namespaces joined by a veth
  pair, a charon in each, the QKD link emulator and both site daemons as subprocesses (in
  this namespace: they reach each charon by its VICI socket, a file). After each rotation
  charon reports a new IKE SA with a PPK (its `list-sas`, `swanctl --list-sas` and its log
  line "using PPK for PPK_ID"), pings pass through ESP, and with site B killed site A
  fails closed: its PPK is unloaded, the IKE SA ended and pings stop; with B back, the
  tunnel comes back on a fresh PPK.

Data plane: the kernel's ESP (XFRM) where the kernel has it; otherwise charon's own
userspace ESP (the kernel-libipsec plugin: ESP in UDP through a TUN device), which this
machine's kernel (XFRM without ESP) needs. Either way the ESP packets and their counters
are charon's, not a model.

Needs root and network namespaces; installs strongswan-charon, strongswan-swanctl,
libcharon-extra-plugins and iputils-ping with apt-get when missing, and skips saying why
where any of that is impossible.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from rotation_helpers import bind_demo_sites, install_debian_packages
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient, ClientError
from qkdd.demo import RunningSite, running_demo
from qkdd.ipsec.charon import CharonError, CharonPpk, CharonUnreachableError, ViciClient
from qkdd.ipsec.ipsec_binding import IpsecBinding

pytestmark = pytest.mark.integration

CHARON = "/usr/lib/ipsec/charon"
LIBIPSEC = "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"
PACKAGES = {
    CHARON: "strongswan-charon",
    "/usr/sbin/swanctl": "strongswan-swanctl",
    LIBIPSEC: "libcharon-extra-plugins",
}
# Private addresses that exist only inside the namespaces made here: the veth link (the
# IKE and ESP packets), and each site's inner address, reachable only through the tunnel.
VETH = ("10.213.9.1", "10.213.9.2")
INNER = ("10.213.9.5", "10.213.9.6")
CONNECTION = "site-to-site"
PPK_ID = "qkdd-tunnel-a-b"
# A fixed IKE PSK authenticates the peers (the classical half); the PPK adds the
# post-quantum half. Test material only.
IKE_PSK = "0x" + "5a" * 32


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout(30), check=False, env=env
    )


def _check(*argv: str, env: dict[str, str] | None = None) -> str:
    result = _run(*argv, env=env)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr.strip()}"
    return result.stdout


def _install_tools() -> None:
    """charon, swanctl, the userspace ESP plugin and ping; apt-get installs what is
    missing, or the test skips."""
    missing = sorted({pkg for path, pkg in PACKAGES.items() if not os.path.exists(path)})
    if shutil.which("ping") is None:
        missing.append("iputils-ping")
    install_debian_packages(missing)
    absent = [path for path in PACKAGES if not os.path.exists(path)]
    if absent or shutil.which("ping") is None:
        pytest.skip(f"{', '.join(absent) or 'ping'} missing and apt-get cannot install it")


@dataclass
class Namespaces:
    tag: str
    names: list[str] = field(default_factory=list)

    def add(self, side: str) -> str:
        name = f"qkdd-{self.tag}-{side}"
        made = _run("ip", "netns", "add", name)
        if made.returncode != 0:
            pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
        self.names.append(name)
        _check("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def remove(self) -> None:
        for name in self.names:
            _run("ip", "netns", "del", name)


def _kernel_has_esp(namespace: str) -> bool:
    """Whether the kernel takes an ESP SA (XFRM with ESP); one is added and removed."""
    key = "0x" + "00" * 16
    added = _run(
        "ip", "-n", namespace, "xfrm", "state", "add", "src", VETH[0], "dst", VETH[1],
        "proto", "esp", "spi", "0x100", "mode", "tunnel", "enc", "cbc(aes)", key,
        "auth", "hmac(sha256)", key + "00" * 16,
    )  # fmt: skip
    if added.returncode != 0:
        return False
    _run("ip", "-n", namespace, "xfrm", "state", "flush")
    return True


@dataclass
class Charon:
    """One charon in a namespace, with its own strongswan.conf, swanctl.conf, VICI socket
    and log, and its own /run (charon's pid file is always /var/run/charon.pid)."""

    directory: Path
    namespace: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def vici(self) -> Path:
        return self.directory / "charon.vici"

    @property
    def log(self) -> Path:
        return self.directory / "charon.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "STRONGSWAN_CONF": str(self.directory / "strongswan.conf")}

    def write_config(self, *, userspace_esp: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "run").mkdir(exist_ok=True)
        kernel = "kernel-libipsec kernel-netlink" if userspace_esp else "kernel-netlink"
        (self.directory / "strongswan.conf").write_text(
            f"""\
charon {{
  load = random nonce aes sha1 sha2 hmac kdf gmp pem pkcs1 pubkey x509 {kernel} \
socket-default vici
  make_before_break = yes
  install_virtual_ip = no
  filelog {{
    log {{
      path = {self.log}
      default = 1
      flush_line = yes
      ike_name = yes
      time_format = %H:%M:%S
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{self.vici}
    }}
    kernel-libipsec {{
      allow_peer_ts = yes
    }}
  }}
}}
swanctl {{
  load = pem pkcs1 x509 pubkey random nonce aes sha1 sha2 hmac
}}
"""
        )

    def start(self) -> None:
        script = f"mount --bind {shlex.quote(str(self.directory / 'run'))} /run && exec {CHARON}"
        with open(self.directory / "stdout.log", "wb") as out:
            # `ip netns exec` runs the shell in a mount namespace of its own, so the bind
            # mount stays there; the shell execs charon: this is charon's pid.
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, "sh", "-c", script],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout(20)
        while not self.vici.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = (self.directory / "stdout.log").read_text()[-300:]
                log = self.log.read_text()[-500:] if self.log.exists() else ""
                pytest.skip(f"charon did not start in a namespace: {output} {log}")
            time.sleep(0.05)

    def swanctl(self, *args: str) -> str:
        return _check("swanctl", *args, "--uri", f"unix://{self.vici}", env=self.env)

    def load_connection(self, text: str) -> None:
        conf = self.directory / "swanctl.conf"
        conf.write_text(text)
        conf.chmod(0o600)
        self.swanctl("--load-all", "--noprompt", "--file", str(conf))

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout(10))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log.read_text())) if self.log.exists() else 0


def _swanctl_conf(
    side: int, *, userspace_esp: bool, ppk_id: str = PPK_ID, ppk_required: str = "yes"
) -> str:
    me, peer = ("site-a", "site-b")[side], ("site-a", "site-b")[1 - side]
    return f"""\
connections {{
  {CONNECTION} {{
    version = 2
    local_addrs = {VETH[side]}
    remote_addrs = {VETH[1 - side]}
    encap = {"yes" if userspace_esp else "no"}
    proposals = aes256-sha256-modp3072
    ppk_id = {ppk_id}
    ppk_required = {ppk_required}
    local {{
      auth = psk
      id = {me}
    }}
    remote {{
      auth = psk
      id = {peer}
    }}
    children {{
      net {{
        local_ts = {INNER[side]}/32
        remote_ts = {INNER[1 - side]}/32
        esp_proposals = aes256-sha256
      }}
    }}
  }}
}}
secrets {{
  ike-sites {{
    id-a = site-a
    id-b = site-b
    secret = {IKE_PSK}
  }}
}}
"""


@dataclass
class Tunnel:
    namespaces: tuple[str, str]
    charons: tuple[Charon, Charon]
    userspace_esp: bool

    def ping(self, side: int) -> bool:
        """One ping from this side's inner address to the other side's, which is only
        reachable through the tunnel."""
        command = [
            "ip", "netns", "exec", self.namespaces[side], "ping", "-c1", "-W1", "-q",
            "-I", INNER[side], INNER[1 - side],
        ]  # fmt: skip
        return _run(*command).returncode == 0


def _setup(tmp_path: Path, sides: int) -> Iterator[tuple[Namespaces, list[Charon], bool]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces and run charon")
    _install_tools()
    namespaces = Namespaces(secrets.token_hex(3))
    charons: list[Charon] = []
    try:
        names = [namespaces.add(side) for side in "ab"[:sides]]
        if sides == 2:
            veth = (f"qki{namespaces.tag}a", f"qki{namespaces.tag}b")
            _check("ip", "link", "add", veth[0], "netns", names[0], "type", "veth", "peer",
                   "name", veth[1], "netns", names[1])  # fmt: skip
        else:
            veth = (f"qki{namespaces.tag}a",)
            # A veth pair inside the one namespace: nobody answers at the far end.
            _check("ip", "-n", names[0], "link", "add", veth[0], "type", "veth", "peer",
                   "name", f"qki{namespaces.tag}z")  # fmt: skip
        for side, name in enumerate(names):
            _check("ip", "-n", name, "addr", "add", f"{VETH[side]}/30", "dev", veth[side])
            _check("ip", "-n", name, "link", "set", veth[side], "up")
            _check("ip", "-n", name, "addr", "add", f"{INNER[side]}/32", "dev", "lo")
        xfrm = _run("ip", "-n", names[0], "xfrm", "state")
        if xfrm.returncode != 0:
            pytest.skip(f"no XFRM in this kernel: {xfrm.stderr.strip()}")
        userspace_esp = not _kernel_has_esp(names[0])
        if userspace_esp and not os.path.exists("/dev/net/tun"):
            pytest.skip("the kernel has no ESP and /dev/net/tun is missing for userspace ESP")
        for side, name in enumerate(names):
            charon = Charon(tmp_path / f"charon-{'ab'[side]}", name)
            charon.write_config(userspace_esp=userspace_esp)
            charons.append(charon)
            charon.start()
        yield namespaces, charons, userspace_esp
    finally:
        for charon in charons:
            charon.stop()
        namespaces.remove()  # takes the veth, the TUN devices and the SAs with them


@pytest.fixture
def one_charon(tmp_path: Path) -> Iterator[Charon]:
    for _, charons, userspace_esp in _setup(tmp_path, 1):
        charons[0].load_connection(_swanctl_conf(0, userspace_esp=userspace_esp))
        yield charons[0]


@pytest.fixture
def tunnel(tmp_path: Path) -> Iterator[Tunnel]:
    for namespaces, charons, userspace_esp in _setup(tmp_path, 2):
        for side, charon in enumerate(charons):
            charon.load_connection(_swanctl_conf(side, userspace_esp=userspace_esp))
        yield Tunnel(
            (namespaces.names[0], namespaces.names[1]), (charons[0], charons[1]), userspace_esp
        )


def _binding(charon: Charon, **changes: object) -> IpsecBinding:
    fields: dict[str, object] = dict(
        name="tunnel-a-b",
        connection=CONNECTION,
        ppk_id=PPK_ID,
        peer_site="site-b",
        local_sae="ipsec-a",
        remote_sae="ipsec-b",
        vici_socket=str(charon.vici),
    )
    fields.update(changes)
    return IpsecBinding(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# qkdd's VICI code against one charon


async def test_vici_commands_and_streamed_events_against_charon(one_charon):
    vici = ViciClient(str(one_charon.vici))
    version, _ = await vici.call("version")
    assert version["daemon"] == b"charon" and version["version"].startswith(b"5.")  # type: ignore[union-attr]
    # A streamed command: list-conns sends one list-conn event per connection.
    charon = CharonPpk(str(one_charon.vici))
    conn = await charon.connection(CONNECTION)
    assert conn is not None
    assert (conn.ppk_id, conn.ppk_required, conn.children) == (PPK_ID, True, ("net",))
    assert await charon.connection("no-such-connection") is None
    assert await charon.ike_sas(CONNECTION) == []
    with pytest.raises(CharonError, match="no command 'no-such-command'"):
        await vici.call("no-such-command")


async def test_ppk_is_loaded_replaced_and_unloaded(one_charon):
    charon = CharonPpk(str(one_charon.vici))
    binding = _binding(one_charon)
    for ppk in (b"\x01" * 32, b"\x02" * 32):
        await charon.install(binding, ppk)
    shared, _ = await charon.vici.call("get-shared")
    # One PPK under the binding's ID: the second install replaced the first.
    assert shared["keys"].count(binding.secret_id.encode()) == 1  # type: ignore[union-attr]
    assert (
        one_charon.log_count(
            rf"loaded PPK shared key with id '{binding.secret_id}' for: '{PPK_ID}'"
        )
        == 2
    )
    assert await charon.tear_down(binding) == "PPK unloaded, 0 IKE SA(s) ended"
    shared, _ = await charon.vici.call("get-shared")
    assert binding.secret_id.encode() not in shared["keys"]  # type: ignore[operator]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"ppk_id": "some-other-ppk"}, "has ppk_id 'some-other-ppk'"),
        ({"ppk_required": "no"}, "must set ppk_required = yes"),
    ],
)
async def test_a_connection_that_would_not_fail_closed_is_refused(one_charon, settings, expected):
    one_charon.load_connection(_swanctl_conf(0, userspace_esp=True, **settings))
    charon = CharonPpk(str(one_charon.vici))
    with pytest.raises(CharonError, match=expected):
        await charon.install(_binding(one_charon), b"\x01" * 32)
    shared, _ = await charon.vici.call("get-shared")
    assert _binding(one_charon).secret_id.encode() not in shared["keys"]  # type: ignore[operator]


async def test_missing_connection_and_socket_say_what_to_do(one_charon, tmp_path):
    charon = CharonPpk(str(one_charon.vici))
    with pytest.raises(CharonError, match="is not loaded: .*swanctl --load-conns"):
        await charon.install(_binding(one_charon, connection="not-loaded"), b"\x01" * 32)
    absent = CharonPpk(str(tmp_path / "nothing.vici"))
    with pytest.raises(CharonUnreachableError, match="is charon running"):
        await absent.install(_binding(one_charon), b"\x01" * 32)


async def test_reauthenticate_fails_when_no_ike_sa_comes_up(one_charon):
    """No peer answers: charon initiates, and the rotation is told the IKE SA is not up."""
    charon = CharonPpk(str(one_charon.vici))
    binding = _binding(one_charon)
    await charon.install(binding, b"\x01" * 32)
    with pytest.raises(CharonError, match="no new IKE SA with a PPK was up within 1 s"):
        await charon.reauthenticate(binding, wait=1.0)


async def test_charon_uses_the_ppk_both_ends_hold_and_refuses_different_ones(tunnel):
    """qkdd's charon calls on a real tunnel, without qkdd's daemons: the same PPK at both
    ends brings an IKE SA up with it (initiated, then reauthenticated); a PPK that differs
    fails IKE_AUTH, and the IKE SA on the previous PPK stays."""
    a, b = (CharonPpk(str(charon.vici)) for charon in tunnel.charons)
    binding_a, binding_b = _binding(tunnel.charons[0]), _binding(tunnel.charons[1])
    await a.install(binding_a, b"\x01" * 32)
    await b.install(binding_b, b"\x01" * 32)
    first = await a.reauthenticate(binding_a, wait=timeout(20))
    assert first.startswith("IKE SA #1 up with the PPK (a new IKE SA)")
    await b.install(binding_b, b"\x02" * 32)
    await a.install(binding_a, b"\x02" * 32)
    second = await a.reauthenticate(binding_a, wait=timeout(20))
    assert second == "IKE SA #2 up with the PPK (a reauthentication of IKE SA #1)"
    # charon deletes the reauthenticated IKE SA just after the new one is up: on a busy
    # machine it may still be listed for a moment.
    with trio.fail_after(timeout(20)):
        while len(sas := await a.ike_sas(CONNECTION)) > 1:
            await trio.sleep(0.05)
    (sa,) = sas
    assert (sa.unique_id, sa.state, sa.ppk, sa.children) == (2, "ESTABLISHED", True, ("INSTALLED",))
    assert tunnel.charons[1].log_count(rf"using PPK for PPK_ID '{PPK_ID}'") == 2

    await b.install(binding_b, b"\x03" * 32)
    await a.install(binding_a, b"\x04" * 32)
    with pytest.raises(CharonError, match="no new IKE SA with a PPK was up"):
        await a.reauthenticate(binding_a, wait=3.0)
    assert tunnel.charons[0].log_count("AUTHENTICATION_FAILED") >= 1
    assert [sa.unique_id for sa in await a.ike_sas(CONNECTION) if sa.state == "ESTABLISHED"] == [2]

    assert await a.tear_down(binding_a) == "PPK unloaded, 1 IKE SA(s) ended"
    assert [sa for sa in await a.ike_sas(CONNECTION) if sa.state == "ESTABLISHED"] == []


# --------------------------------------------------------------------------------------
# Two sites, a real tunnel


def ipsec_bindings(
    vici_sockets: tuple[Path, Path],
    *,
    interval: float,
    max_key_age: float,
    startup_timeout: float = 20,
) -> Callable[[Path], None]:
    """A ``tamper`` for ``running_demo`` that gives the two demo sites one IPsec binding
    "tunnel-a-b" on charon's connection CONNECTION, each site with its own charon."""

    def tamper(directory: Path) -> None:
        fields = tuple(
            f'connection = "{CONNECTION}"\nppk_id = "{PPK_ID}"\nvici_socket = "{socket}"\n'
            f"interval = {interval}\nmax_key_age = {max_key_age}\n"
            f"startup_timeout = {startup_timeout}\n"
            for socket in vici_sockets
        )
        bind_demo_sites(directory, "ipsec", ("ipsec-a", "ipsec-b"), (fields[0], fields[1]))

    return tamper


def _status(site: RunningSite) -> dict:  # type: ignore[type-arg]
    with BlockingKeyClient(str(site.socket_path)) as client:
        return client.site_status()


def _row(site: RunningSite) -> dict:  # type: ignore[type-arg]
    try:
        return _status(site)["ipsec"][0]  # type: ignore[no-any-return]
    except (ClientError, OSError, KeyError, IndexError):
        return {}


def _ike_sas(charon: Charon) -> list:  # type: ignore[type-arg]
    return trio.run(CharonPpk(str(charon.vici)).ike_sas, CONNECTION)


def _child_packets(charon: Charon) -> dict[str, tuple[int, int]]:
    """ESP packets in and out of each of the connection's CHILD SAs (by SPI), as charon
    counts them."""

    async def read() -> dict[str, tuple[int, int]]:
        _, events = await ViciClient(str(charon.vici)).call(
            "list-sas", {"ike": CONNECTION, "noblock": "yes"}, event="list-sa"
        )
        counts = {}
        for event in events:
            for child in event[CONNECTION]["child-sas"].values():  # type: ignore[index,union-attr]
                assert child["protocol"] == b"ESP"  # type: ignore[index]
                counts[child["spi-in"].decode()] = (  # type: ignore[index,union-attr]
                    int(child["packets-in"]),  # type: ignore[index,call-overload]
                    int(child["packets-out"]),  # type: ignore[index,call-overload]
                )
        return counts

    return trio.run(read)


def _ping_counted_by_esp(tunnel: Tunnel) -> bool:
    """A ping from A that charon counts on a CHILD SA, out and back (False if a rotation
    replaced the CHILD SA in between: the caller tries again)."""
    before = _child_packets(tunnel.charons[0])
    if not tunnel.ping(0):
        return False
    after = _child_packets(tunnel.charons[0])
    return any(
        spi in before and after[spi][0] > before[spi][0] and after[spi][1] > before[spi][1]
        for spi in after
    )


def test_real_tunnel_rotates_ppks_fails_closed_and_recovers(tmp_path, tunnel):
    a, b = tunnel.charons
    with running_demo(
        tmp_path / "sites",
        ipsec_bindings((a.vici, b.vici), interval=3, max_key_age=8),
    ) as (site_a, site_b):

        def detail() -> str:
            return (
                f"site A: {_row(site_a)}\nsite B: {_row(site_b)}\n"
                f"charon A log:\n{a.log.read_text()[-1500:]}"
            )

        # Rotations: each gives both sites the same new key ID, and charon a new IKE SA
        # that uses the PPK.
        key_ids: list[str] = []
        ike_sa_ids: list[int] = []

        def next_rotation() -> bool:
            row_a, row_b = _row(site_a), _row(site_b)
            key_id = row_a.get("key_id")
            if not (row_a.get("state") == "fresh" and key_id == row_b.get("key_id")):
                return False
            if key_id in key_ids:
                return False
            sas = [sa for sa in _ike_sas(a) if sa.state == "ESTABLISHED"]
            if not sas or not all(sa.ppk for sa in sas):
                return False
            key_ids.append(key_id)
            ike_sa_ids.append(sas[-1].unique_id)
            return True

        for rotation in range(3):
            wait_until(next_rotation, f"rotation {rotation + 1}", 60, detail)
        assert len(set(key_ids)) == 3
        assert ike_sa_ids == sorted(ike_sa_ids) and len(set(ike_sa_ids)) == 3
        # charon's own words: every IKE SA of these rotations mixed in the PPK...
        assert a.log_count(rf"using PPK for PPK_ID '{PPK_ID}'") >= 3
        assert b.log_count(rf"using PPK for PPK_ID '{PPK_ID}'") >= 3
        assert a.log_count(r"loaded PPK shared key with id 'qkdd-ppk-tunnel-a-b'") >= 3
        # ... and swanctl, charon's own client, lists the IKE SA as authenticated with it.
        assert "/PPK" in a.swanctl("--list-sas", "--ike", CONNECTION)
        # Traffic passes through ESP, both ways.
        wait_until(lambda: tunnel.ping(0) and tunnel.ping(1), "pings through the tunnel", 30)
        wait_until(lambda: _ping_counted_by_esp(tunnel), "a ping counted by ESP", 30)

        # Site B gone: A keeps its PPK until max_key_age, then fails closed.
        site_b.process.send_signal(signal.SIGKILL)
        site_b.process.wait(timeout(10))
        wait_until(
            lambda: "event=ipsec_fail_closed " in site_a.log_file.read_text(),
            "site A fails closed",
            60,
            detail,
        )
        assert _row(site_a)["state"] == "fail-closed"
        assert not [sa for sa in _ike_sas(a) if sa.state == "ESTABLISHED"]
        assert not [sa for sa in _ike_sas(b) if sa.state == "ESTABLISHED"]  # told by DELETE
        shared, _ = trio.run(ViciClient(str(a.vici)).call, "get-shared")
        assert b"qkdd-ppk-tunnel-a-b" not in shared["keys"]  # type: ignore[operator]
        assert not tunnel.ping(0) and not tunnel.ping(1)
        # B's charon still holds the last PPK and tries again: A, without one, refuses.
        initiate = _run(
            "swanctl", "--initiate", "--child", "net", "--timeout", "10",
            "--uri", f"unix://{b.vici}", env=b.env,
        )  # fmt: skip
        assert initiate.returncode != 0
        assert not tunnel.ping(1)

        # Site B back: the next rotation gives both a fresh PPK and a new IKE SA.
        before = len(key_ids)
        site_b.spawn()
        wait_until(next_rotation, "a rotation after site B came back", 60, detail)
        assert len(key_ids) == before + 1
        assert "event=ipsec_recovered " in site_a.log_file.read_text()
        wait_until(lambda: tunnel.ping(0) and tunnel.ping(1), "pings through again", 30)
        plane = "userspace ESP (kernel-libipsec)" if tunnel.userspace_esp else "kernel ESP"
        print(
            f"\ndata plane: {plane}; key IDs {key_ids}; IKE SAs {ike_sa_ids}; "
            f"'using PPK' lines at A: {a.log_count('using PPK for PPK_ID')}"
        )
