"""A stream of messages from site A's application to site B's, while each daemon is killed
with SIGKILL in the middle of it and restarted: real processes, real sockets, real SQLite.

The applications behave as the messaging API asks: the sender sends one message at a time
and, after any failure, sends the same message again under the same message ID; the
receiver reads, then acknowledges. Every message must arrive exactly once and in order; a
message may be read a second time only if its acknowledgement did not get through (the
receiver saw the acknowledgement fail), which is what lets an application finish handling
a message before it is erased.

The stream has 10,000 messages (about a minute here; QKDD_MESSAGE_STREAM overrides it)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

from qkdd.client import BlockingKeyClient, ClientError, Message
from qkdd.demo import running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B

COUNT = int(os.environ.get("QKDD_MESSAGE_STREAM", "10000"))
NAMESPACE = uuid.UUID("6c4a4b0e-58c5-4d0c-9d0e-1d6f5b8a9e21")
GIVE_UP_SECONDS = 300.0


def _bigger_pools(directory: Path) -> None:
    # Messages use one hybrid key each: a deeper stock rides out the restarts.
    for name in ("site-a.toml", "site-b.toml"):
        path = directory / name
        path.write_text(path.read_text().replace("pool_size = 64", "pool_size = 512"))


def message_id(i: int) -> str:
    return str(uuid.uuid5(NAMESPACE, str(i)))


def test_sigkill_of_either_daemon_during_a_message_stream(tmp_path):
    with running_demo(tmp_path, _bigger_pools) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 64, timeout=60)
        sent = threading.Event()
        failures: list[BaseException] = []
        send_errors = [0]
        progress = [0]

        def sender() -> None:
            try:
                deadline = time.monotonic() + GIVE_UP_SECONDS
                client = BlockingKeyClient(str(site_a.socket_path), timeout=15)
                for i in range(COUNT):
                    while True:
                        try:
                            client.send_message(
                                SITE_B.sae_id, str(i).encode(), message_id=message_id(i)
                            )
                            break
                        except ClientError:
                            send_errors[0] += 1
                            assert time.monotonic() < deadline, f"stuck at message {i}"
                            time.sleep(0.05)
                    progress[0] = i + 1
                client.close()
            except BaseException as exc:
                failures.append(exc)
            finally:
                sent.set()

        received: list[Message] = []
        ack_failed: set[str] = set()

        def receiver() -> None:
            try:
                deadline = time.monotonic() + GIVE_UP_SECONDS
                client = BlockingKeyClient(str(site_b.socket_path), timeout=15)
                distinct = 0
                while distinct < COUNT:
                    assert time.monotonic() < deadline, f"received {distinct} of {COUNT}"
                    try:
                        message = client.receive_message(wait=1.0)
                    except ClientError:
                        time.sleep(0.05)
                        continue
                    if message is None:
                        continue
                    received.append(message)
                    if not (received[:-1] and received[-2].message_id == message.message_id):
                        distinct += 1
                    try:
                        client.acknowledge_message(message.message_id)
                    except ClientError:
                        ack_failed.add(message.message_id)
                client.close()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
        for thread in threads:
            thread.start()
        # Kill each daemon once, mid-stream: the sender's site at a third, the receiver's
        # at two thirds.
        for site, at in ((site_a, COUNT // 3), (site_b, 2 * COUNT // 3)):
            while progress[0] < at and not sent.is_set():
                time.sleep(0.01)
            site.restart(kill=True)
        for thread in threads:
            thread.join(GIVE_UP_SECONDS + 30)
        assert not failures, failures
        assert not any(t.is_alive() for t in threads)

        ids = [m.message_id for m in received]
        distinct = [m for i, m in enumerate(received) if i == 0 or ids[i - 1] != ids[i]]
        # Exactly once, in order, with the right bodies...
        assert [m.message_id for m in distinct] == [message_id(i) for i in range(COUNT)]
        assert [m.body for m in distinct] == [str(i).encode() for i in range(COUNT)]
        assert all(m.sender_sae_id == SITE_A.sae_id for m in distinct)
        # ...and a message came twice only right after its acknowledgement failed.
        repeats = {ids[i] for i in range(1, len(ids)) if ids[i] == ids[i - 1]}
        assert repeats <= ack_failed
        assert len(received) - len(distinct) <= len(ack_failed)
        # Both kills happened while messages were still flowing.
        logs = site_a.log_file.read_text() + site_b.log_file.read_text()
        assert logs.count("event=ready") >= 4
        with BlockingKeyClient(str(site_b.socket_path)) as app_b:
            assert app_b.receive_message(wait=0.2) is None  # nothing left over
        print(
            f"{COUNT} messages; {send_errors[0]} failed sends retried; "
            f"{len(received) - len(distinct)} repeated reads"
        )
