"""Secure messages between sites, end to end: the emulator and both daemons as real
subprocesses, the message routes on the real Unix sockets, delivery over the real peer
session. Sealing and the inbox are also tested on their own, on a real SQLite store."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from key_blocks import ids_of, materials_of, random_block
from site_edits import second_sae_at_b
from timeouts import timeout

from qkdd import ctl
from qkdd.client import BlockingKeyClient, KeyServiceClientError
from qkdd.config import load_config
from qkdd.crypto import AuthenticationFailed
from qkdd.demo import prepare_directory, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.keystore import HybridKey, KeyStore
from qkdd.messaging.inbox import Inbox, InboxError
from qkdd.messaging.messenger import (
    BadMessage,
    Messenger,
    NotDelivered,
    open_message,
    otp_open,
    otp_seal,
    seal_message,
)

CAP = 1024 * 1024
OTHER_B = "sae-b2"


def send_retrying(client: BlockingKeyClient, recipient: str, body: bytes, seconds: float = 30):
    """Send, retrying with the same message ID while the key stock refills."""
    message_id = str(uuid.uuid4())
    deadline = time.monotonic() + timeout(seconds)
    while True:
        try:
            return client.send_message(recipient, body, message_id=message_id)
        except KeyServiceClientError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_messages_of_every_size_arrive_once_in_order_for_their_recipient_only(tmp_path, capsys):
    with running_demo(tmp_path, second_sae_at_b(OTHER_B)) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=timeout(60))
        bodies = [b"", b"\x00", os.urandom(CAP), b"last"]
        with BlockingKeyClient(str(site_a.socket_path), timeout=timeout(30)) as app_a:
            ids = [send_retrying(app_a, SITE_B.sae_id, body) for body in bodies]
            with pytest.raises(KeyServiceClientError) as info:
                app_a.send_message(SITE_B.sae_id, bytes(CAP + 1))
            assert info.value.status in (400, 413) and str(CAP) in info.value.message
            with pytest.raises(KeyServiceClientError) as info:
                app_a.send_message("sae-nowhere", b"x")
            assert info.value.status == 400 and "sae-nowhere" in info.value.message
        sock_b = str(site_b.socket_path)
        with BlockingKeyClient(sock_b, sae_id=OTHER_B, timeout=timeout(30)) as other:
            assert other.receive_message(wait=0.2) is None  # not addressed to it
            with pytest.raises(KeyServiceClientError) as info:
                other.acknowledge_message(ids[0])
            assert info.value.status == 400
        with BlockingKeyClient(sock_b, sae_id=SITE_B.sae_id, timeout=timeout(30)) as app_b:
            got = []
            while (message := app_b.receive_message(wait=1)) is not None:
                got.append(message)
                app_b.acknowledge_message(message.message_id)
            assert [m.message_id for m in got] == ids
            assert [m.body for m in got] == bodies
            assert {(m.sender_sae_id, m.sender_site_id, m.protection) for m in got} == {
                (SITE_A.sae_id, SITE_A.site_id, "hybrid")
            }
            # A message from B to A, read on a stream as it arrives.
            with BlockingKeyClient(str(site_a.socket_path)) as app_a:
                stream = app_a.messages()
                back = send_retrying(app_b, SITE_A.sae_id, b"reply")
                first = next(stream)
                assert (first.message_id, first.body) == (back, b"reply")
                stream.close()
        # The same from a shell: qkdctl send, then recv --raw --ack, then nothing is left.
        send = ["--socket", str(site_a.socket_path), "--compact", "send", SITE_B.sae_id]
        assert ctl.main([*send, "--text", "via qkdctl"]) == 0
        sent = json.loads(capsys.readouterr().out)
        recv = ["--socket", sock_b, "--sae-id", SITE_B.sae_id, "recv", "--wait", "5"]
        assert ctl.main([*recv, "--raw", "--ack"]) == 0
        assert capsys.readouterr().out == "via qkdctl"
        assert ctl.main([*recv[:-1], "0.1"]) == 3
        assert "no message" in capsys.readouterr().err
        assert (
            ctl.main(["--socket", sock_b, "--sae-id", SITE_B.sae_id, "ack", sent["message_ID"]])
            == 1
        )
        assert "holds no message" in capsys.readouterr().err
        logs = site_a.log_file.read_text() + site_b.log_file.read_text()
        assert bodies[2][:32].hex() not in logs


def test_recipient_site_down_is_503_and_nothing_is_half_sent(tmp_path):
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(60))
        site_b.process.send_signal(signal.SIGTERM)
        site_b.process.wait(timeout(15))
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            before = app_a.status(SITE_B.sae_id)["stored_key_count"]
            message_id = str(uuid.uuid4())
            with pytest.raises(KeyServiceClientError) as info:
                app_a.send_message(SITE_B.sae_id, b"hello", message_id=message_id)
            assert info.value.status == 503 and SITE_B.site_id in info.value.message
            assert app_a.status(SITE_B.sae_id)["stored_key_count"] == before  # no key used
        site_b.spawn()
        with BlockingKeyClient(str(site_a.socket_path), timeout=timeout(30)) as app_a:
            deadline = time.monotonic() + timeout(30)
            while True:
                try:
                    assert app_a.send_message(SITE_B.sae_id, b"hello", message_id=message_id)
                    break
                except KeyServiceClientError as exc:
                    assert exc.status == 503
                    if time.monotonic() >= deadline:  # only a hang gets here
                        raise AssertionError("the peer never took the message") from None
                    time.sleep(0.1)
        with BlockingKeyClient(str(site_b.socket_path)) as app_b:
            message = app_b.receive_message(wait=5)
            assert message is not None and message.message_id == message_id
            app_b.acknowledge_message(message_id)
            assert app_b.receive_message(wait=0.2) is None


# -- without daemons: sealing and the inbox --------------------------------------------------

KEK = bytes(range(32))


def _key() -> HybridKey:
    return HybridKey(str(uuid.uuid4()), os.urandom(32))


def test_sealed_message_is_bound_to_its_id_sae_pair_and_key():
    key, mid = _key(), str(uuid.uuid4())
    sealed = seal_message(key, mid, "a", "b", b"secret")
    assert b"secret" not in sealed
    assert open_message(key, mid, "a", "b", sealed) == b"secret"
    for args in ((mid, "a", "c"), (mid, "c", "b"), (str(uuid.uuid4()), "a", "b")):
        with pytest.raises(AuthenticationFailed):
            open_message(key, *args, sealed)
    with pytest.raises(AuthenticationFailed):
        open_message(HybridKey(str(uuid.uuid4()), key.material), mid, "a", "b", sealed)


def _store_with_key(tmp_path: Path) -> tuple[KeyStore, HybridKey]:
    """A store holding one ready key of the pair a -> b, and that key."""
    store = KeyStore(tmp_path / "k.db", KEK)
    block = random_block(1, "a", "b")
    store.add_batch("peer", 1, [block], [])
    store.commit_batch("peer", 1)
    return store, HybridKey(ids_of(block)[0], materials_of(block)[0])


def test_inbox_stores_once_erases_the_key_and_keeps_order(tmp_path):
    store, key = _store_with_key(tmp_path)
    inbox = Inbox(store, max_pending=10)
    mid = str(uuid.uuid4())
    sealed = seal_message(key, mid, "a", "b", b"one")

    def accept(message_id: str, key_id: str, body: bytes) -> bool:
        def open_body(db) -> bytes:  # type: ignore[no-untyped-def]
            k = store.take_one_in(db, key_id, "a", "b")
            if k is None:
                raise InboxError("key not held here")
            return open_message(k, message_id, "a", "b", body)

        return inbox.accept(
            message_id=message_id,
            sender_site="peer",
            sender_sae="a",
            recipient_sae="b",
            protection="hybrid",
            open_body=open_body,
        )

    assert accept(mid, key.key_id, sealed)
    assert store.ready_count("a", "b") == 0  # the one-time key is gone
    assert not accept(mid, key.key_id, sealed)  # a re-sent message is kept once
    with pytest.raises(InboxError, match="not held here"):
        accept(str(uuid.uuid4()), key.key_id, sealed)
    message = inbox.next_for("b")
    assert message is not None and message.body == b"one"
    assert inbox.next_for("b", after_seq=message.seq) is None
    assert inbox.next_for("a") is None
    assert not inbox.acknowledge("a", mid)
    assert inbox.acknowledge("b", mid) and inbox.next_for("b") is None
    store.close()


def test_inbox_refuses_a_message_that_does_not_open_and_keeps_the_key(tmp_path):
    store, key = _store_with_key(tmp_path)
    inbox = Inbox(store, max_pending=10)

    def fail(db) -> bytes:  # type: ignore[no-untyped-def]
        assert store.take_one_in(db, key.key_id, "a", "b") is not None  # taken, then...
        raise InboxError("does not open")  # ...the transaction rolls back

    with pytest.raises(InboxError):
        inbox.accept(
            message_id=str(uuid.uuid4()),
            sender_site="peer",
            sender_sae="a",
            recipient_sae="b",
            protection="hybrid",
            open_body=fail,
        )
    assert store.ready_count("a", "b") == 1
    store.close()


def test_full_inbox_refuses_new_messages(tmp_path):
    store, key = _store_with_key(tmp_path)
    inbox = Inbox(store, max_pending=0)
    with pytest.raises(InboxError, match="full"):
        inbox.accept(
            message_id=str(uuid.uuid4()),
            sender_site="peer",
            sender_sae="a",
            recipient_sae="b",
            protection="hybrid",
            open_body=lambda db: b"",
        )
    store.close()


def _pads(*sizes: int) -> list[HybridKey]:
    return [HybridKey(str(uuid.uuid4()), os.urandom(n)) for n in sizes]


def test_one_time_pad_sealing_is_body_xor_pad_with_a_one_time_mac():
    pads, mid = _pads(1024, 1024), str(uuid.uuid4())
    body = os.urandom(1500)
    sealed = otp_seal(pads, mid, "a", "b", body)
    stream = b"".join(p.material for p in pads)
    assert len(sealed) == len(body) + 16
    # The ciphertext is the body XOR the pad that follows the 32-byte MAC key.
    assert bytes(x ^ y for x, y in zip(sealed[:-16], stream[32:], strict=False)) == body
    assert otp_open(pads, mid, "a", "b", sealed) == body
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    for args in (
        (pads, mid, "a", "b", flipped),
        (pads, mid, "a", "c", sealed),
        (pads, str(uuid.uuid4()), "a", "b", sealed),
        (list(reversed(pads)), mid, "a", "b", sealed),
        (pads[:1], mid, "a", "b", sealed),  # too little pad to cover it
    ):
        with pytest.raises(AuthenticationFailed):
            otp_open(*args)
    with pytest.raises(ValueError):
        otp_seal(_pads(100), mid, "a", "b", bytes(100))  # 100 + 32 > 100
    exact = _pads(32)  # an empty message uses just the MAC key
    assert otp_open(exact, mid, "a", "b", otp_seal(exact, mid, "a", "b", b"")) == b""


def _pads_for_a(directory: Path) -> None:
    path = directory / "site-a.toml"  # only A's senders get pads
    path.write_text(
        path.read_text().replace("pool_size = 64", "pool_size = 64\notp_pad_bytes = 4096")
    )


def test_one_time_pad_messages_through_real_daemons(tmp_path):
    with running_demo(tmp_path, _pads_for_a) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 1, timeout=timeout(60))
        with BlockingKeyClient(str(site_a.socket_path), timeout=timeout(30)) as app_a:
            deadline = time.monotonic() + timeout(60)
            while app_a.site_status()["peers"][SITE_B.site_id]["otp_pad_bytes_ready"] < 4096:
                if time.monotonic() >= deadline:  # only a hang gets here
                    raise AssertionError("no pads made")
                time.sleep(0.2)
            body = os.urandom(2000)
            message_id = app_a.send_message(SITE_B.sae_id, body, protection="otp")
            # The stock (4 KiB, 2 KiB used) cannot cover 3 KiB more until it is refilled;
            # right after the send it may or may not be: either way, never half-sent.
            with pytest.raises(KeyServiceClientError) as info:
                app_a.send_message(SITE_B.sae_id, bytes(5000), protection="otp")
            assert info.value.status == 503 and "one-time pad" in info.value.message
        with BlockingKeyClient(str(site_b.socket_path)) as app_b:
            message = app_b.receive_message(wait=5)
            assert message is not None
            assert (message.message_id, message.protection, message.body) == (
                message_id,
                "otp",
                body,
            )
            app_b.acknowledge_message(message.message_id)
            assert app_b.receive_message(wait=0.5) is None
            # Site B keeps no pads for its own senders: it says so.
            with pytest.raises(KeyServiceClientError) as info:
                app_b.send_message(SITE_A.sae_id, b"x", protection="otp")
            assert info.value.status == 503


async def test_empty_key_stock_is_503_and_nothing_is_sent(tmp_path):
    configs = prepare_directory(tmp_path)

    class Live:
        config = load_config(configs[SITE_A.site_id])

    store = KeyStore(tmp_path / "k.db", KEK)
    calls: list[int] = []

    async def call_peer(site: str, kind: int, body: bytes, timeout: float) -> bytes:
        calls.append(kind)
        return b""

    messenger = Messenger(Live(), store, Inbox(store, 10), lambda site: None, call_peer)
    for protection, reason in (("hybrid", "key stock empty"), ("otp", "keeps no one-time pads")):
        with pytest.raises(NotDelivered, match=reason):
            await messenger.send(SITE_A.sae_id, SITE_B.sae_id, b"x", protection=protection)
    with pytest.raises(BadMessage, match="protection"):
        await messenger.send(SITE_A.sae_id, SITE_B.sae_id, b"x", protection="rot13")
    assert calls == []  # nothing went to the peer
    store.close()
