"""An operator's consent to a new ML-DSA bootstrap (``qkdd allow-bootstrap``): the command
reads the key-encryption key where the unit's LoadCredential= loads it from, an allowance
only permits a bootstrap (a PSK chain that works stays in use, whichever side allowed), it
can be withdrawn, and the site status shows it. Daemons and the command run as real
processes; the lost-state recovery is in test_psk_chain.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from qkdd_drivers.base import DeviceStatus
from site_logs import established_sessions
from timeouts import timeout, wait_until

from qkdd import ctl
from qkdd.client import BlockingKeyClient
from qkdd.config import SecretSource
from qkdd.ctl import render_site_status
from qkdd.demo import RunningSite, exchange_keys, prepare_directory, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.identity import IdentityError, read_key_encryption_key
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link_params import LinkParameters
from qkdd.peer.bootstrap import DialAuth, InitiatorAuthChoice
from qkdd.status import site_status
from qkdd.systemd import CREDENTIAL_STORES, find_credential, operator_credential_directories

REPO = Path(__file__).resolve().parent.parent
ALLOWED_LINE = "established; a new bootstrap is allowed by the operator"

# -- the decision, sans-IO -------------------------------------------------------------------


def test_the_master_keeps_its_psk_while_the_peer_takes_it() -> None:
    choice = InitiatorAuthChoice()
    chain = {"holds_psk": True, "chain_established": True}
    # An allowance alone changes nothing: the PSK is offered.
    assert choice.choose(**chain, operator_allowed=True) is DialAuth.PSK
    # Failures that do not say the PSK was refused (a timeout) change nothing either.
    choice.handshake_failed(DialAuth.PSK, "timeout")
    assert choice.choose(**chain, operator_allowed=True) is DialAuth.PSK

    # Refused (the responder closed without a word, or its answer failed the PSK check):
    for refusal in ("closed", "authentication_failed"):
        choice = InitiatorAuthChoice()
        choice.handshake_failed(DialAuth.PSK, refusal)
        # without consent: the PSK again, never signatures (fail closed);
        assert choice.choose(**chain, operator_allowed=False) is DialAuth.PSK
        # with it: one bootstrap, and after a failed one the PSK again.
        assert choice.choose(**chain, operator_allowed=True) is DialAuth.BOOTSTRAP
        choice.handshake_failed(DialAuth.BOOTSTRAP, "closed")
        assert choice.choose(**chain, operator_allowed=True) is DialAuth.PSK
        choice.handshake_failed(DialAuth.PSK, refusal)
        choice.handshake_completed()
        assert choice.choose(**chain, operator_allowed=True) is DialAuth.PSK


def test_without_a_psk_a_bootstrap_needs_consent_once_a_chain_exists() -> None:
    choice = InitiatorAuthChoice()
    first_contact = {"holds_psk": False, "chain_established": False, "operator_allowed": False}
    assert choice.choose(**first_contact) is DialAuth.BOOTSTRAP
    lost = {"holds_psk": False, "chain_established": True}
    assert choice.choose(**lost, operator_allowed=False) is DialAuth.NONE
    assert choice.choose(**lost, operator_allowed=True) is DialAuth.BOOTSTRAP
    choice.handshake_failed(DialAuth.BOOTSTRAP, "authentication_failed")
    assert choice.choose(**lost, operator_allowed=True) is DialAuth.BOOTSTRAP


def test_a_pending_psk_newer_than_any_ready_one_is_dialled_with_first() -> None:
    """A site restarted after its peer committed a batch holds the batch's authentication
    key pending: it dials with it first; refused, it makes one attempt as it would without
    it, then tries the pending key again."""
    choice = InitiatorAuthChoice()
    first_psk = {"holds_psk": False, "chain_established": False, "operator_allowed": False}
    assert choice.choose(**first_psk, holds_pending_psk=True) is DialAuth.PENDING_PSK
    choice.handshake_failed(DialAuth.PENDING_PSK, "timeout")  # not a refusal: again
    assert choice.choose(**first_psk, holds_pending_psk=True) is DialAuth.PENDING_PSK
    choice.handshake_failed(DialAuth.PENDING_PSK, "closed")  # refused: the other site aborted
    assert choice.choose(**first_psk, holds_pending_psk=True) is DialAuth.BOOTSTRAP
    assert choice.choose(**first_psk, holds_pending_psk=True) is DialAuth.PENDING_PSK
    later = {"holds_psk": True, "chain_established": True, "operator_allowed": False}
    choice.handshake_failed(DialAuth.PENDING_PSK, "authentication_failed")
    assert choice.choose(**later, holds_pending_psk=True) is DialAuth.PSK
    choice.handshake_completed()
    assert choice.choose(**later, holds_pending_psk=True) is DialAuth.PENDING_PSK
    assert choice.choose(**later, holds_pending_psk=False) is DialAuth.PSK


def pending_auth_batch(store: KeyStore, peer: str, batch_id: int) -> str:
    """Store a batch holding one authentication key, pending; returns its key ID."""
    key_id = str(uuid.uuid4())
    store.add_batch(peer, batch_id, [], [], auth_keys=[StoredQkdKey(key_id, os.urandom(32))])
    return key_id


def test_the_store_names_a_pending_auth_key_only_while_it_is_the_newest(
    tmp_path: Path,
) -> None:
    store = KeyStore(tmp_path / "keys.sqlite3", bytes(range(32)))
    try:
        assert store.newer_pending_auth_key("site-b") is None
        first = pending_auth_batch(store, "site-b", 1)
        record = store.newer_pending_auth_key("site-b")
        assert record is not None and record.key_id == first and not record.ready
        store.commit_batch("site-b", 1)
        assert store.newer_pending_auth_key("site-b") is None  # ready now
        second = pending_auth_batch(store, "site-b", 2)
        record = store.newer_pending_auth_key("site-b")
        assert record is not None and record.key_id == second
        assert store.newer_pending_auth_key("site-c") is None
    finally:
        store.close()


# -- the store and the status view -----------------------------------------------------------


def _link(peer: str) -> SimpleNamespace:
    params = LinkParameters(
        local_site_id="site-a",
        peer_site_id=peer,
        local_sae_ids=frozenset({"sae-a"}),
        remote_sae_ids=frozenset({"sae-b"}),
        key_size_bits=256,
        pool_size=8,
    )
    device = SimpleNamespace(status=DeviceStatus("up", "QKD link up", 0, None, None, None))
    return SimpleNamespace(
        params=params,
        device=device,
        session_up=True,
        last_error="",
        sessions_established=1,
        why_unavailable=lambda: None,
    )


def _chain_line(store: KeyStore) -> tuple[bool, str]:
    status = site_status(
        site_id="site-a", backend="cryptography", links={"site-b": _link("site-b")}, store=store
    )
    peer = status["peers"]["site-b"]
    (line,) = [x for x in render_site_status(status).splitlines() if "PSK chain" in x]
    return peer["bootstrap_allowed"], line.split("PSK chain", 1)[1].strip()


def test_allow_and_revoke_in_the_store_and_the_status(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.sqlite3", os.urandom(32))
    try:
        assert _chain_line(store) == (True, "not yet (bootstrap allowed)")
        psk = StoredQkdKey(str(uuid.uuid4()), os.urandom(32))
        store.add_batch("site-b", 1, [], [], [psk])
        store.commit_batch("site-b", 1)
        assert _chain_line(store) == (False, "established")

        assert store.allow_bootstrap("site-b") is True
        assert store.allow_bootstrap("site-b") is False  # already allowed
        assert _chain_line(store) == (True, ALLOWED_LINE)
        assert store.revoke_bootstrap("site-b") is True
        assert store.revoke_bootstrap("site-b") is False  # nothing left to withdraw
        assert _chain_line(store) == (False, "established")

        # The next authentication key committed uses the allowance up.
        store.allow_bootstrap("site-b")
        store.add_batch("site-b", 2, [], [], [StoredQkdKey(str(uuid.uuid4()), os.urandom(32))])
        store.commit_batch("site-b", 2)
        assert _chain_line(store) == (False, "established")
    finally:
        store.close()


# -- finding the key-encryption key outside the service ------------------------------------


def test_operator_commands_look_where_load_credential_loads_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert operator_credential_directories() == list(CREDENTIAL_STORES)
    assert "/etc/credstore" in CREDENTIAL_STORES  # where README step 4 puts the files
    assert operator_credential_directories({}, stores=["/x", "/y"]) == ["/x", "/y"]
    # Run by a unit that was handed credentials: only those.
    handed = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert operator_credential_directories(handed, stores=["/x"]) == [str(tmp_path)]

    first, second = tmp_path / "run", tmp_path / "etc"
    first.mkdir()
    second.mkdir()
    kek = os.urandom(32)
    (second / "qkdd-kek").write_bytes(kek)
    (second / "qkdd-kek").chmod(0o600)
    directories = [str(first), str(second)]
    assert find_credential("qkdd-kek", directories) == str(second / "qkdd-kek")
    source = SecretSource(None, "qkdd-kek")
    assert read_key_encryption_key(source, credential_directories=directories) == kek
    with pytest.raises(IdentityError) as missing:
        read_key_encryption_key(SecretSource(None, "other"), credential_directories=directories)
    assert str(first) in str(missing.value) and str(second) in str(missing.value)
    # The daemon keeps to what systemd hands it: no credential store is searched.
    with pytest.raises(IdentityError, match="not available"):
        read_key_encryption_key(source)


def test_the_shipped_unit_loads_each_credential_by_name() -> None:
    """LoadCredential=NAME without a path: systemd then searches CREDENTIAL_STORES, which is
    where the operator's commands look too. A path here would need them to read it."""
    unit = (REPO / "systemd" / "qkdd.service").read_text()
    loaded = re.findall(r"^LoadCredential(?:Encrypted)?=(.*)$", unit, re.M)
    assert sorted(loaded) == ["qkdd-identity", "qkdd-kek"]


# The command as the operator runs it, in its own process, with the credential store
# search path pointed at a test directory (the one thing that differs from the host).
COMMAND = """
import sys
import qkdd.systemd
from qkdd.cli import main
qkdd.systemd.CREDENTIAL_STORES = tuple(sys.argv[1].split(":"))
sys.exit(main(sys.argv[2:]))
"""


def _command(stores: list[Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run(
        [sys.executable, "-c", COMMAND, ":".join(map(str, stores)), "allow-bootstrap", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout(60),
    )


def test_allow_bootstrap_reads_the_kek_from_the_credential_store(tmp_path: Path) -> None:
    configs = prepare_directory(tmp_path)
    credstore, elsewhere = tmp_path / "credstore", tmp_path / "run-credstore"
    credstore.mkdir(mode=0o700)
    kek_file = tmp_path / SITE_A.directory / "kek.bin"
    kek = kek_file.read_bytes()
    kek_file.rename(credstore / "qkdd-kek")
    config = configs[SITE_A.site_id]
    config.write_text(
        config.read_text().replace(
            f'key_encryption_key = "{SITE_A.directory}/kek.bin"',
            'key_encryption_key = "credential:qkdd-kek"',
        )
    )
    store_path = tmp_path / SITE_A.directory / "state" / "keys.sqlite3"
    KeyStore(store_path, kek).close()  # the daemon's store, as its first start leaves it
    stores = [elsewhere, credstore]
    args = ("--config", str(config), SITE_B.site_id)

    allowed = _command(stores, *args)
    assert allowed.returncode == 0, allowed.stderr
    assert "is now allowed" in allowed.stdout and "--revoke" in allowed.stdout
    again = _command(stores, *args)
    assert again.returncode == 0 and "was already allowed" in again.stdout, again.stderr
    store = KeyStore(store_path, kek)
    assert store.operator_allowed_bootstrap(SITE_B.site_id)
    store.close()

    revoked = _command(stores, *args, "--revoke")
    assert revoked.returncode == 0 and "Withdrew" in revoked.stdout, revoked.stderr
    nothing = _command(stores, *args, "--revoke")
    assert nothing.returncode == 0 and "nothing changed" in nothing.stdout, nothing.stderr
    store = KeyStore(store_path, kek)
    assert not store.operator_allowed_bootstrap(SITE_B.site_id)
    store.close()

    # Not in any store: one line naming every place looked at.
    (credstore / "qkdd-kek").rename(tmp_path / "moved")
    missing = _command(stores, *args)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    (line,) = missing.stderr.strip().splitlines()
    assert "'qkdd-kek'" in line and str(elsewhere) in line and str(credstore) in line

    # A site whose daemon never ran has no store: none is made here.
    unborn = _command(stores, "--config", str(configs[SITE_B.site_id]), SITE_A.site_id)
    assert unborn.returncode == 1 and "no key store" in unborn.stderr, unborn.stderr
    assert not (tmp_path / SITE_B.directory / "state").exists()


# -- real daemons: an allowance on a healthy link ---------------------------------------------


def _wait_for_log(site: RunningSite, text: str, count: int) -> None:
    wait_until(
        lambda: site.log_file.read_text().count(text) >= count,
        f"{text!r} x{count} in {site.log_file}",
        60,
        lambda: site.log_file.read_text()[-4000:],
    )


def _allow(site: RunningSite, peer: str, *extra: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "qkdd", "allow-bootstrap", "--config", str(site.config_file)]
        + [peer, *extra],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _peer_status(site: RunningSite) -> dict[str, object]:
    peer = SITE_B.site_id if site.site is SITE_A else SITE_A.site_id
    with BlockingKeyClient(str(site.socket_path)) as client:
        status: dict[str, object] = client.site_status()["peers"][peer]
    return status


def _wait_allowance(site: RunningSite, allowed: bool) -> None:
    wait_until(
        lambda: _peer_status(site)["bootstrap_allowed"] is allowed,
        f"bootstrap_allowed to become {allowed} at {site}",
        60,
        interval=0.1,
    )


def _qkdctl_chain_line(site: RunningSite, capsys: pytest.CaptureFixture[str]) -> str:
    assert ctl.main(["--socket", str(site.socket_path), "status"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "PSK chain" in x]
    return line.split("PSK chain", 1)[1].strip()


def test_an_allowance_never_breaks_a_healthy_psk_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(60))
        _wait_for_log(site_a, "event=auth_key_rotated", 1)  # logged by the master
        assert _qkdctl_chain_line(site_a, capsys) == "established"

        # Allowed, visible, withdrawn, visible: the live session is not touched.
        _allow(site_a, SITE_B.site_id)
        assert _peer_status(site_a)["bootstrap_allowed"] is True
        assert _qkdctl_chain_line(site_a, capsys) == ALLOWED_LINE
        assert "Withdrew" in _allow(site_a, SITE_B.site_id, "--revoke")
        assert _peer_status(site_a)["bootstrap_allowed"] is False
        assert _qkdctl_chain_line(site_a, capsys) == "established"

        # On the master only, the slave only, then both; each time a site restarts, the
        # next session is authenticated with the PSK, and its new PSK uses the allowance up.
        for allowing, restarting in (
            ((site_a,), site_b),
            ((site_b,), site_b),
            ((site_a, site_b), site_a),
        ):
            rotated = site_a.log_file.read_text().count("event=auth_key_rotated")
            psk_sessions = [s.log_file.read_text().count("auth=psk:") for s in (site_a, site_b)]
            for site in allowing:
                _allow(site, SITE_A.site_id if site is site_b else SITE_B.site_id)
                assert _peer_status(site)["bootstrap_allowed"] is True
            restarting.restart()
            for site, before in zip((site_a, site_b), psk_sessions, strict=True):
                _wait_for_log(site, "auth=psk:", before + 1)
            _wait_for_log(site_a, "event=auth_key_rotated", rotated + 1)
            for site in allowing:
                _wait_allowance(site, False)
            wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(60))
            assert all(row["match"] for row in exchange_keys(site_a, site_b, 4))
            for site in (site_a, site_b):  # the first contact's, and no other
                established = established_sessions(site.log_file, "ml-dsa-bootstrap")
                assert len(established) == 1, established
