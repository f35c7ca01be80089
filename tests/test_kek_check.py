"""The key-encryption key is checked against the store before anything is written, and a
sealed row that does not open is quarantined and reported instead of stopping the site.

A wrong key used to be accepted, seal new QKD keys under itself and only fail seconds later;
the right key then failed on the first row the wrong one had sealed, so neither could run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from key_blocks import corrupt_chunk_of, held_key_ids, ids_of, materials_of, random_block
from link_pair import pump_until_quiet
from timeouts import timeout

from qkdd import sealing
from qkdd.client import BlockingKeyClient
from qkdd.demo import running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.identity import write_key_encryption_key
from qkdd.keystore import (
    Assignment,
    KeyStore,
    NewHybridKey,
    NewKeyBlock,
    Sealer,
    StoredQkdKey,
    StoreError,
)

KEK = bytes(range(32))
OTHER_KEK = bytes(range(1, 33))
SEALED_TABLES = ("qkd_frames", "key_chunks", "assigned_keys", "pad_keys", "auth_keys")


def qkd(n: int) -> list[StoredQkdKey]:
    return [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(n)]


def snapshot(path: Path) -> tuple[str, dict[str, int], list[str]]:
    """The store's main file digest, its row counts, and its sidecar files with content."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    sidecars = [
        p.name for p in path.parent.iterdir() if p.name.endswith("-wal") and p.stat().st_size
    ]
    return digest, counts, sidecars


def filled_store(path: Path, kek: bytes = KEK) -> tuple[list[StoredQkdKey], NewKeyBlock]:
    """A store holding buffered QKD keys and ready hybrid keys, closed."""
    store = KeyStore(path, kek)
    qkd_keys = qkd(6)
    for key in qkd_keys:  # six deliveries: six sealed frames
        store.store_qkd_keys("site-b", [key])
    block = random_block(4)
    store.add_batch("site-b", 1, [block], [])
    store.commit_batch("site-b", 1)
    store.close()
    return qkd_keys, block


def committed(store: KeyStore, *blocks: NewKeyBlock) -> None:
    store.add_batch("site-b", 1, list(blocks), [])
    store.commit_batch("site-b", 1)


def make_legacy(path: Path) -> None:
    """Make a store look like one from before key-check values: no check value in meta."""
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM meta WHERE name != 'store_id'")
    with sqlite3.connect(path) as db:
        names = [r[0] for r in db.execute("SELECT name FROM meta")]
    assert names == ["store_id"]


# -- the key check, at the KeyStore ----------------------------------------------------------


def test_wrong_key_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "keys.sqlite3"
    filled_store(path)
    before = snapshot(path)
    with pytest.raises(StoreError) as info:
        KeyStore(path, OTHER_KEK)
    assert type(info.value).__name__ == "WrongKeyEncryptionKey"
    message = str(info.value)
    assert str(path) in message and "does not match" in message
    assert snapshot(path) == before
    # The right key still opens everything.
    store = KeyStore(path, KEK)
    assert len(list(store.oldest_qkd_keys("site-b"))) == 6
    assert len(store.take_ready("sae-a", "sae-b", 4)) == 4
    store.close()


def test_an_empty_store_remembers_its_key(tmp_path):
    path = tmp_path / "keys.sqlite3"
    KeyStore(path, KEK).close()
    with pytest.raises(StoreError, match="does not match"):
        KeyStore(path, OTHER_KEK)
    KeyStore(path, KEK).close()


def test_legacy_store_is_checked_against_its_sealed_rows(tmp_path):
    path = tmp_path / "keys.sqlite3"
    qkd_keys, _ = filled_store(path)
    make_legacy(path)
    before = snapshot(path)
    with pytest.raises(StoreError, match="does not match"):
        KeyStore(path, OTHER_KEK)
    assert snapshot(path) == before  # no check value written under the wrong key
    store = KeyStore(path, KEK)  # opens the rows: the check value is written now
    assert [k.key_id for k in store.oldest_qkd_keys("site-b")] == [k.key_id for k in qkd_keys]
    store.close()
    with sqlite3.connect(path) as db:
        for table in SEALED_TABLES:
            db.execute(f"DELETE FROM {table}")
    # From now on the check value decides, even with no sealed row left.
    with pytest.raises(StoreError, match="does not match"):
        KeyStore(path, OTHER_KEK)


def test_empty_legacy_store_takes_the_key_it_is_opened_with(tmp_path):
    path = tmp_path / "keys.sqlite3"
    KeyStore(path, KEK).close()
    make_legacy(path)
    KeyStore(path, OTHER_KEK).close()
    with pytest.raises(StoreError, match="does not match"):
        KeyStore(path, KEK)


def test_legacy_store_poisoned_by_a_wrong_key_runs_again_with_the_right_one(tmp_path):
    """The reported failure: rows sealed under a wrong key after the right key's rows."""
    path = tmp_path / "keys.sqlite3"
    good, _ = filled_store(path)
    poisoned = qkd(5)
    wrong = Sealer(OTHER_KEK)
    with sqlite3.connect(path) as db:
        # The buffer of a store from before frames: one sealed row per key.
        db.execute(
            "CREATE TABLE qkd_keys (seq INTEGER PRIMARY KEY, peer_site TEXT NOT NULL,"
            " key_id TEXT NOT NULL, material BLOB NOT NULL, received_at REAL NOT NULL,"
            " UNIQUE (peer_site, key_id))"
        )
        for key in poisoned:
            db.execute(
                "INSERT INTO qkd_keys (peer_site, key_id, material, received_at)"
                " VALUES (?, ?, ?, ?)",
                (
                    "site-b",
                    key.key_id,
                    wrong.seal(sealing.qkd_row_aad("site-b", key.key_id), key.material),
                    time.time(),
                ),
            )
    make_legacy(path)
    with pytest.raises(StoreError, match="does not match"):
        KeyStore(path, OTHER_KEK)
    store = KeyStore(path, KEK)
    taken = list(store.oldest_qkd_keys("site-b"))
    assert [k.key_id for k in taken] == [k.key_id for k in good]
    assert [k.material for k in taken] == [k.material for k in good]
    assert store.qkd_key_count("site-b") == len(good)
    assert store.quarantined_row_count() == len(poisoned)
    store.close()


# -- rows that do not open ---------------------------------------------------------------


def corrupt_qkd(store: KeyStore, key: StoredQkdKey, peer: str = "site-b") -> None:
    """Flip one bit of the sealed frame that holds a buffered QKD key."""
    raw = uuid.UUID(key.key_id).bytes
    for (first,) in store._db.execute(
        "SELECT first_seq FROM qkd_frames WHERE peer_site=? AND instr(key_ids, ?) > 0",
        (peer, raw),
    ).fetchall():
        corrupt(store, "qkd_frames", "first_seq=?", (first,))
        return
    raise AssertionError("the key is in no frame")


def corrupt(store: KeyStore, table: str, where: str, params: tuple) -> None:
    """Flip one bit of a sealed row's ciphertext."""
    (sealed,) = store._db.execute(f"SELECT material FROM {table} WHERE {where}", params).fetchone()
    broken = bytearray(sealed)
    broken[-1] ^= 1
    store._db.execute(f"UPDATE {table} SET material=? WHERE {where}", (bytes(broken), *params))


def test_a_corrupted_qkd_key_is_quarantined_and_the_rest_served(tmp_path, caplog):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    keys = qkd(5)
    for key in keys:  # a frame each: one that does not open takes no other key with it
        store.store_qkd_keys("site-b", [key])
    bad = keys[2]
    corrupt_qkd(store, bad)
    with caplog.at_level(logging.INFO, logger="qkdd"):
        taken = list(store.oldest_qkd_keys("site-b"))
    assert [k.key_id for k in taken] == [k.key_id for k in keys if k is not bad]
    lines = [r.getMessage() for r in caplog.records if "row_quarantined" in r.getMessage()]
    assert len(lines) == 1
    assert "table=qkd_frames" in lines[0] and bad.key_id in lines[0]
    assert bad.material.hex() not in caplog.text
    assert store.quarantined_row_count() == 1
    assert store.qkd_key_count("site-b") == 4
    # Used up: the device re-sending it does not bring it back.
    assert store.store_qkd_keys("site-b", [bad]) == 0
    assert store.get_qkd_keys("site-b", [k.key_id for k in keys]).keys() == {
        k.key_id for k in keys if k is not bad
    }
    store.close()


def test_get_qkd_keys_leaves_out_a_row_that_does_not_open(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    keys = qkd(3)
    for key in keys:
        store.store_qkd_keys("site-b", [key])
    corrupt_qkd(store, keys[0])
    found = store.get_qkd_keys("site-b", [k.key_id for k in keys])
    assert found == {k.key_id: k.material for k in keys[1:]}
    assert store.quarantined_row_count() == 1
    store.close()


def test_a_corrupted_chunk_is_withdrawn_and_the_pool_still_serves(tmp_path, caplog):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    erased: list[tuple[str, list[str]]] = []
    store.on_erased = lambda reason, keys: erased.append((reason, [k.key_id for k in keys]))
    first, bad, last = random_block(2), random_block(3), random_block(2)
    committed(store, first, bad, last)
    assert store.take_by_ids("sae-a", "sae-b", ids_of(bad)[1:2])  # collected before
    corrupt_chunk_of(store, ids_of(bad)[0])
    with caplog.at_level(logging.INFO, logger="qkdd"):
        taken = store.take_ready("sae-a", "sae-b", 4)
    assert [k.material for k in taken] == materials_of(first) + materials_of(last)
    # Its keys not yet collected are withdrawn, and reported once.
    assert erased == [("withdrawn", [ids_of(bad)[0], ids_of(bad)[2]])]
    assert caplog.text.count("event=row_quarantined table=key_chunks") == 1
    assert f"row={ids_of(bad)[0]}..{ids_of(bad)[2]}" in caplog.text
    assert store.quarantined_row_count() == 1
    assert store.ready_count("sae-a", "sae-b") == 0
    assert store.take_by_ids("sae-a", "sae-b", ids_of(bad)[2:]) is None
    store.close()


def test_short_pool_after_quarantine_hands_out_nothing_but_keeps_the_quarantine(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    erased: list[tuple[str, list[str]]] = []
    store.on_erased = lambda reason, keys: erased.append((reason, [k.key_id for k in keys]))
    bad, good = random_block(2), random_block(1)
    committed(store, bad, good)
    corrupt_chunk_of(store, ids_of(bad)[0])
    assert store.take_ready("sae-a", "sae-b", 2) == []  # all or nothing
    assert erased == [("withdrawn", ids_of(bad))]
    assert store.ready_count("sae-a", "sae-b") == 1
    assert store.quarantined_row_count() == 1
    assert [k.material for k in store.take_ready("sae-a", "sae-b", 1)] == [good.material]
    store.close()


def test_a_key_asked_for_by_id_that_does_not_open_is_not_held(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    erased: list[tuple[str, list[str]]] = []
    store.on_erased = lambda reason, keys: erased.append((reason, [k.key_id for k in keys]))
    bad, good = random_block(2), random_block(1)
    store.add_batch("site-b", 1, [bad, good], [])
    corrupt_chunk_of(store, ids_of(bad)[0])
    assert store.take_by_ids("sae-a", "sae-b", [ids_of(bad)[0], ids_of(good)[0]]) is None
    # The failed hand-out rolled back, the quarantine and its withdrawal did not.
    assert store.quarantined_row_count() == 1
    assert erased == [("withdrawn", ids_of(bad))]
    (key,) = store.take_by_ids("sae-a", "sae-b", ids_of(good))
    assert key.material == good.material
    store.close()


def test_assigned_pad_and_auth_rows_that_do_not_open(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    parts = random_block(2)
    pads = [NewHybridKey(str(uuid.uuid4()), "sae-a", "sae-b", 8 * 64, os.urandom(64)) for _ in "ab"]
    auth = [StoredQkdKey(str(uuid.uuid4()), os.urandom(32))]
    store.add_batch("site-b", 1, [parts], [], auth_keys=auth, pads=pads)
    store.commit_batch("site-b", 1)
    assigned = Assignment(str(uuid.uuid4()), 256, "sae-a", ("sae-b",), (ids_of(parts)[0],))
    store.assign_keys([assigned])
    corrupt(store, "assigned_keys", "key_id=?", (assigned.key_id,))
    corrupt(store, "pad_keys", "key_id=?", (pads[0].key_id,))
    corrupt(store, "auth_keys", "key_id=?", (auth[0].key_id,))
    assert store.take_by_ids("sae-a", "sae-b", [assigned.key_id]) is None
    assert [p.material for p in store.take_pads("sae-a", "sae-b", 64)] == [pads[1].material]
    assert store.newest_ready_auth_key("site-b") is None
    assert store.auth_key("site-b", auth[0].key_id) is None
    assert store.quarantined_row_count() == 3
    store.close()


def test_link_goes_on_past_a_qkd_key_that_does_not_open_at_the_master(tmp_path, backend):
    """The master skips the key; the slave drops its copy as an orphan; both agree."""
    from qkdd.link_params import LinkParameters
    from qkdd.peer.agreement import LinkAgreement

    a, b = KeyStore(tmp_path / "a.db", KEK), KeyStore(tmp_path / "b.db", KEK)
    keys = qkd(16)
    for key in keys:
        a.store_qkd_keys("site-b", [key])
    b.store_qkd_keys("site-a", keys)
    corrupt_qkd(a, keys[1])
    sessions = []
    for store, local, peer, mine, theirs in (
        (a, "site-a", "site-b", "sae-a", "sae-b"),
        (b, "site-b", "site-a", "sae-b", "sae-a"),
    ):
        link_params = LinkParameters(local, peer, frozenset({mine}), frozenset({theirs}), 256, 4)
        sessions.append(
            LinkAgreement(link_params, store=store, backend=backend, session_id=b"s" * 32)
        )
    master, slave = sessions
    pump_until_quiet(master, slave, to_master=list(slave.start()), to_slave=[], rounds=30)
    assert a.quarantined_row_count() == 1
    assert a.ready_count("sae-a", "sae-b") == 4 and b.ready_count("sae-b", "sae-a") == 4
    sent = a.take_ready("sae-a", "sae-b", 4)
    received = b.take_by_ids("sae-a", "sae-b", [k.key_id for k in sent])
    assert received is not None
    assert [k.material for k in received] == [k.material for k in sent]
    assert keys[1].key_id not in b.get_qkd_keys("site-a", [keys[1].key_id])
    a.close()
    b.close()


def test_status_and_metrics_count_quarantined_rows(tmp_path):
    from qkdd.metrics import SiteMetrics
    from qkdd.status import site_status

    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    keys = qkd(2)
    store.store_qkd_keys("site-b", keys)
    corrupt_qkd(store, keys[0])
    list(store.oldest_qkd_keys("site-b"))
    status = site_status(site_id="site-a", backend="cryptography", links={}, store=store)
    assert status["store_rows_quarantined"] == 1
    metrics = SiteMetrics("site-a", "cryptography", [])
    metrics.watch({}, store)
    text = metrics.exposition()[0].decode()
    assert "qkdd_store_rows_quarantined 1.0" in text
    store.close()


# -- the CLI and the daemon ----------------------------------------------------------------


def test_allow_bootstrap_with_a_wrong_key_says_so_and_writes_nothing(tmp_path):
    from qkdd.demo import prepare_directory

    configs = prepare_directory(tmp_path)
    state = tmp_path / "site-a" / "state"
    store_path = state / "keys.sqlite3"
    filled_store(store_path, (tmp_path / "site-a" / "kek.bin").read_bytes())
    before = snapshot(store_path)
    write_key_encryption_key(tmp_path / "site-a" / "kek.bin", overwrite=True)
    result = subprocess.run(
        [sys.executable, "-m", "qkdd", "allow-bootstrap", "--config", str(configs["site-a"])]
        + ["site-b"],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(store_path) in line and "does not match" in line
    assert snapshot(store_path) == before


def notifications(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    seen = []
    try:
        while True:
            seen.append(sock.recv(4096).decode())
    except BlockingIOError:
        return seen


def wait_for_buffered_qkd_keys(socket_path: Path) -> None:
    """Until the site holds QKD keys not yet used (its key pool is full)."""
    deadline = time.monotonic() + timeout(60)
    buffered = 0
    while time.monotonic() < deadline:
        with BlockingKeyClient(str(socket_path)) as client:
            buffered = client.site_status()["peers"][SITE_B.site_id]["qkd_keys_buffered"]
        if buffered:
            return
        time.sleep(0.1)
    raise AssertionError("no QKD keys buffered at site A")


def test_daemon_with_a_wrong_key_refuses_before_ready_and_the_right_key_runs_on(tmp_path):
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=timeout(60))
        wait_for_buffered_qkd_keys(site_a.socket_path)
        site_a.process.send_signal(signal.SIGTERM)
        assert site_a.process.wait(timeout=timeout(30)) == 0
        store_path = tmp_path / "site-a" / "state" / "keys.sqlite3"
        before = snapshot(store_path)
        with sqlite3.connect(f"file:{store_path}?immutable=1", uri=True) as db:
            existing = held_key_ids(db, SITE_A.sae_id)
        assert existing

        kek_file = tmp_path / "site-a" / "kek.bin"
        right_kek = kek_file.read_bytes()
        write_key_encryption_key(kek_file, overwrite=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = Path("/tmp") / f"qkdd-kek-{uuid.uuid4().hex[:8]}.sock"
        notify.bind(str(notify_path))
        log = tmp_path / "wrong-kek.log"
        try:
            with open(log, "wb") as handle:
                wrong = subprocess.Popen(
                    [sys.executable, "-m", "qkdd", "run", "--config", str(site_a.config_file)],
                    env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                    stdout=subprocess.DEVNULL,
                    stderr=handle,
                )
            try:
                status = wrong.wait(timeout=timeout(60))
            finally:
                if wrong.poll() is None:
                    wrong.kill()
                    wrong.wait()
            seen = notifications(notify)
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)
        text = log.read_text()
        assert status == 1, text
        assert not any("READY=1" in m for m in seen), seen
        assert "event=ready" not in text and "Traceback" not in text
        failed = [line for line in text.splitlines() if "event=failed" in line]
        assert len(failed) == 1, text
        assert str(store_path) in failed[0] and "does not match" in failed[0]
        assert snapshot(store_path) == before

        # The right key back: the whole store opens and keys flow again.
        kek_file.write_bytes(right_kek)
        site_a.spawn()
        wait_for_keys(site_a, SITE_B.sae_id, len(existing), timeout=timeout(60))
        # The oldest ready keys go first: every key held before the restart is served, and
        # the peer's application gets the same material.
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            sent = app_a.enc_keys(SITE_B.sae_id, number=len(existing))
        assert {k.key_id for k in sent} == existing
        with BlockingKeyClient(str(site_b.socket_path)) as app_b:
            received = app_b.dec_keys(SITE_A.sae_id, [k.key_id for k in sent])
        assert [k.material for k in received] == [k.material for k in sent]
        wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=timeout(60))  # new keys are made
        assert "row_quarantined" not in site_a.log_file.read_text()
