"""Two real site daemons (subprocesses, an emulated QKD link) as SKIP key providers.

A router at site A asks its key provider for a key for site B's router, hands the keyId
over (as IKEv2 would), and site B's router fetches the same key from its own key provider.
Routers are played by a client written from the draft alone (tests/skip_router.py) and by
curl. Router A's certificate is mapped by name, router B's by its SHA-256 fingerprint.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from pki import Credentials, issue, new_ca, write, write_ca, write_server
from skip_router import SkipRouter, SkipStatusError
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient
from qkdd.demo import RunningSite, running_demo, wait_for_keys

SITE_A_ROUTER = "site-a-router"  # the remoteSystemID site B knows site A's router by
SITE_B_ROUTER = "site-b-router"


@dataclass(frozen=True)
class Routers:
    ca: str
    provider: Credentials  # both key providers' certificate (127.0.0.1, localhost)
    a: Credentials  # CN router-a.example: mapped by name at site A
    b: Credentials  # mapped by fingerprint at site B
    b_fingerprint: str
    stranger: Credentials  # from the routers' CA, mapped nowhere
    rogue: Credentials  # router A's name, from a CA the key providers do not trust


@dataclass
class Sites:
    a: RunningSite
    b: RunningSite
    ports: dict[str, int]
    routers: Routers

    def router(self, site: str, who: Credentials) -> SkipRouter:
        return SkipRouter(
            "127.0.0.1", self.ports[site], cert=who.cert, key=who.key, ca=self.routers.ca
        )


def make_routers(directory: Path) -> Routers:
    ca, other = new_ca("routers CA"), new_ca("someone else's CA")
    b_key, b_cert = issue(ca, "router-b")
    return Routers(
        ca=write_ca(directory, ca),
        provider=write_server(directory, ca, "provider", "key provider"),
        a=write(directory, "router-a", *issue(ca, "router-a.example")),
        b=write(directory, "router-b", b_key, b_cert),
        b_fingerprint=b_cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        stranger=write(directory, "stranger", *issue(ca, "stranger.example")),
        rogue=write(directory, "rogue", *issue(other, "router-a.example")),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def skip_section(port: int, routers: Routers, client: str, local: str, remote: str) -> str:
    return (
        f'\n[skip]\nlisten = "127.0.0.1:{port}"\n'
        f'certificate = "{routers.provider.cert}"\nprivate_key = "{routers.provider.key}"\n'
        f'client_ca = "{routers.ca}"\n'
        f'[skip.clients]\n"{client}" = "{local}"\n'
        f'[skip.remote_systems]\n"{remote[0]}" = "{remote[1]}"\n'
    )


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    directory = tmp_path_factory.mktemp("skip-sites")
    (directory / "pki").mkdir()
    routers = make_routers(directory / "pki")
    ports = {"site-a": free_port(), "site-b": free_port()}

    def add_skip(site_dir: Path) -> None:
        sections = {
            "site-a": skip_section(
                ports["site-a"], routers, "router-a.example", "sae-a", (SITE_B_ROUTER, "sae-b")
            ),
            "site-b": skip_section(
                ports["site-b"],
                routers,
                f"sha256:{routers.b_fingerprint}",
                "sae-b",
                (SITE_A_ROUTER, "sae-a"),
            ),
        }
        for site, section in sections.items():
            path = site_dir / f"{site}.toml"
            path.write_text(path.read_text() + section)

    with running_demo(directory, tamper=add_skip) as (site_a, site_b):
        for site in (site_a, site_b):
            wait_until(
                lambda site=site: "event=skip_listening" in site.log_file.read_text(),
                f"the SKIP listener of {site.site.site_id}",
                60,
                lambda site=site: site.log_file.read_text()[-3000:],
            )
        wait_for_keys(site_a, "sae-b", 16, timeout=timeout(90))
        wait_for_keys(site_b, "sae-a", 16, timeout=timeout(90))
        yield Sites(site_a, site_b, ports, routers)


def test_router_style_clients_get_matching_keys_at_two_sites(sites: Sites) -> None:
    router_a = sites.router("site-a", sites.routers.a)
    router_b = sites.router("site-b", sites.routers.b)
    caps_a, caps_b = router_a.capabilities(), router_b.capabilities()
    assert caps_a["localSystemID"] == "sae-a" and caps_a["remoteSystemID"] == [SITE_B_ROUTER]
    assert caps_b["localSystemID"] == "sae-b" and caps_b["remoteSystemID"] == [SITE_A_ROUTER]
    assert caps_a["key"] and caps_a["entropy"] and caps_a["algorithm"]
    # Each router is the initiator once: a new key at its site, fetched by ID at the other.
    for initiator, responder, remote, back in (
        (router_a, router_b, SITE_B_ROUTER, SITE_A_ROUTER),
        (router_b, router_a, SITE_A_ROUTER, SITE_B_ROUTER),
    ):
        for size in (None, 512):  # the site key size, and one the peer site confirms
            key_id, key = initiator.new_key(remote, size)
            assert responder.key_by_id(key_id, back) == key
            # Once: neither router gets it again, at either site.
            for router, name in ((responder, back), (initiator, remote)):
                with pytest.raises(SkipStatusError) as refused:
                    router.key_by_id(key_id, name)
                assert refused.value.status == 400


def test_skip_key_ids_are_the_etsi_key_ids(sites: Sites) -> None:
    """A key made over SKIP at site A can be fetched with ETSI dec_keys at site B under the
    same ID (a UUID there, its 32 hex digits here), and one made with enc_keys over SKIP."""
    router_a = sites.router("site-a", sites.routers.a)
    router_b = sites.router("site-b", sites.routers.b)
    key_id, key = router_a.new_key(SITE_B_ROUTER)
    with BlockingKeyClient(str(sites.b.socket_path)) as app_b:
        (fetched,) = app_b.dec_keys("sae-a", [str(uuid.UUID(hex=key_id))])
    assert fetched.material == key
    with BlockingKeyClient(str(sites.a.socket_path)) as app_a:
        (made,) = app_a.enc_keys("sae-b", number=1)
    assert router_b.key_by_id(uuid.UUID(made.key_id).hex, SITE_A_ROUTER) == made.material


def test_unknown_remote_system_and_malformed_key_id(sites: Sites) -> None:
    router_a = sites.router("site-a", sites.routers.a)
    with pytest.raises(SkipStatusError) as unknown:
        router_a.new_key("nobody")
    assert unknown.value.status == 400
    assert "unknown remoteSystemID 'nobody'" in json.loads(unknown.value.body)["message"]
    with pytest.raises(SkipStatusError) as malformed:
        router_a.key_by_id("not-hex", SITE_B_ROUTER)
    assert malformed.value.status == 400


def test_entropy(sites: Sites) -> None:
    router_b = sites.router("site-b", sites.routers.b)
    assert len(router_b.entropy()) == 32 and len(router_b.entropy(1024)) == 128


def test_unmapped_certificate_gets_401(sites: Sites) -> None:
    stranger = sites.router("site-a", sites.routers.stranger)
    with pytest.raises(SkipStatusError) as refused:
        stranger.capabilities()
    assert refused.value.status == 401
    # Router B's certificate is mapped at site B only.
    with pytest.raises(SkipStatusError) as elsewhere:
        sites.router("site-a", sites.routers.b).new_key(SITE_B_ROUTER)
    assert elsewhere.value.status == 401


def test_certificate_from_another_ca_is_refused_in_the_handshake(sites: Sites) -> None:
    rogue = sites.router("site-a", sites.routers.rogue)
    with pytest.raises((ConnectionError, OSError)):  # ssl.SSLError is an OSError
        rogue.capabilities()
    wait_until(
        lambda: "CERTIFICATE_VERIFY_FAILED" in sites.a.log_file.read_text(),
        "the refused handshake in site A's log",
        30,
    )


def curl(sites: Sites, site: str, who: Credentials | None, target: str) -> tuple[int, str]:
    """(curl's exit status, body with the HTTP status on the last line)."""
    command = [
        "curl",
        "--silent",
        "--show-error",
        "--tlsv1.3",
        "--cacert",
        sites.routers.ca,
        "--write-out",
        "\n%{http_code}",
        f"https://127.0.0.1:{sites.ports[site]}{target}",
    ]
    if who is not None:
        command[1:1] = ["--cert", who.cert, "--key", who.key]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout(60))
    return done.returncode, done.stdout


@pytest.fixture(scope="module")
def curl_available() -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl)")


def test_curl_as_the_routers(sites: Sites, curl_available: None) -> None:
    status, out = curl(sites, "site-a", sites.routers.a, "/capabilities")
    body, code = out.rsplit("\n", 1)
    assert (status, code) == (0, "200") and json.loads(body)["localSystemID"] == "sae-a"
    status, out = curl(sites, "site-a", sites.routers.a, f"/key?remoteSystemID={SITE_B_ROUTER}")
    body, code = out.rsplit("\n", 1)
    assert (status, code) == (0, "200")
    new = json.loads(body)
    target = f"/key/{new['keyId']}?remoteSystemID={SITE_A_ROUTER}"
    status, out = curl(sites, "site-b", sites.routers.b, target)
    body, code = out.rsplit("\n", 1)
    assert (status, code) == (0, "200") and json.loads(body) == new
    _status, out = curl(sites, "site-b", sites.routers.b, target)
    assert out.rsplit("\n", 1)[1] == "400"  # once only
    _status, out = curl(sites, "site-b", sites.routers.b, "/entropy?minentropy=128")
    body, code = out.rsplit("\n", 1)
    assert code == "200" and len(json.loads(body)["randomStr"]) == 32


def test_curl_without_or_with_a_wrong_certificate_is_refused(
    sites: Sites, curl_available: None
) -> None:
    for who in (None, sites.routers.rogue):
        status, out = curl(sites, "site-a", who, "/capabilities")
        # 56: the server's alert on receiving data (TLS 1.3 checks the client late).
        assert status != 0 and out.rsplit("\n", 1)[-1] == "000", (who, status, out)


def test_a_fetched_key_stays_fetched_after_a_crash(sites: Sites) -> None:
    """A key fetched at site B stays fetched when site B is killed (kill -9) and restarted,
    and a key not yet fetched is still there."""
    router_a = sites.router("site-a", sites.routers.a)
    router_b = sites.router("site-b", sites.routers.b)
    key_id, key = router_a.new_key(SITE_B_ROUTER)
    other_id, other = router_a.new_key(SITE_B_ROUTER)
    assert router_b.key_by_id(key_id, SITE_A_ROUTER) == key
    sites.b.restart(kill=True)
    wait_until(
        lambda: sites.b.log_file.read_text().count("event=skip_listening") == 2,
        "site B's SKIP listener after the restart",
        60,
    )
    with pytest.raises(SkipStatusError) as refused:
        router_b.key_by_id(key_id, SITE_A_ROUTER)
    assert refused.value.status == 400
    # The key not yet fetched survived the crash.
    assert router_b.key_by_id(other_id, SITE_A_ROUTER) == other
