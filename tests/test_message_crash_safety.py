"""A stream of messages from site A's application to site B's, while each daemon is killed
with SIGKILL in the middle of it and restarted: real processes, real sockets, real SQLite.

The applications behave as the messaging API asks: the sender sends one message at a time
and, after any failure, sends the same message again under the same message ID; the
receiver reads, then acknowledges. Every message must arrive exactly once and in order; a
message may be read a second time only if its acknowledgement did not get through (the
receiver saw the acknowledgement fail), which is what lets an application finish handling
a message before it is erased.

The default suite streams 300 messages; the `slow` run streams 10,000 (QKDD_MESSAGE_STREAM
sets the length of that one). Either way each daemon is killed once, mid-stream. Nothing here
depends on how fast messages flow: the test only gives up when the stream stops moving."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from timeouts import timeout

from qkdd.client import BlockingKeyClient, ClientError, Message
from qkdd.demo import running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B

NAMESPACE = uuid.UUID("6c4a4b0e-58c5-4d0c-9d0e-1d6f5b8a9e21")
# The stream fails only if it stops moving for this long (a restart included).
STALL_SECONDS = 120.0


def _bigger_pools(directory: Path) -> None:
    # Messages use one hybrid key each: a deeper stock rides out the restarts.
    for name in ("site-a.toml", "site-b.toml"):
        path = directory / name
        path.write_text(path.read_text().replace("pool_size = 64", "pool_size = 512"))


def message_id(i: int) -> str:
    return str(uuid.uuid5(NAMESPACE, str(i)))


@pytest.mark.parametrize(
    "count",
    [
        pytest.param(300, id="300"),
        pytest.param(
            int(os.environ.get("QKDD_MESSAGE_STREAM", "10000")), id="long", marks=pytest.mark.slow
        ),
    ],
)
def test_sigkill_of_either_daemon_during_a_message_stream(tmp_path, count):
    with running_demo(tmp_path, _bigger_pools) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 64, timeout=timeout(60))
        sent = threading.Event()
        failures: list[BaseException] = []
        send_errors = [0]
        progress = [0]

        def sender() -> None:
            try:
                client = BlockingKeyClient(str(site_a.socket_path), timeout=timeout(15))
                for i in range(count):
                    deadline = time.monotonic() + timeout(STALL_SECONDS)
                    while True:
                        try:
                            client.send_message(
                                SITE_B.sae_id, str(i).encode(), message_id=message_id(i)
                            )
                            break
                        except ClientError:
                            send_errors[0] += 1
                            if time.monotonic() >= deadline:  # only a hang gets here
                                raise AssertionError(f"stuck at message {i}") from None
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
                client = BlockingKeyClient(str(site_b.socket_path), timeout=timeout(15))
                distinct = 0
                deadline = time.monotonic() + timeout(STALL_SECONDS)
                while distinct < count:
                    if time.monotonic() >= deadline:  # only a hang gets here
                        raise AssertionError(f"stuck: received {distinct} of {count}")
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
                        deadline = time.monotonic() + timeout(STALL_SECONDS)
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
        for site, at in ((site_a, count // 3), (site_b, 2 * count // 3)):
            while progress[0] < at and not sent.is_set():
                time.sleep(0.01)
            site.restart(kill=True)
        for thread in threads:
            thread.join()  # each gives up by itself once the stream stops moving
        assert not failures, failures
        assert not any(t.is_alive() for t in threads)

        ids = [m.message_id for m in received]
        distinct = [m for i, m in enumerate(received) if i == 0 or ids[i - 1] != ids[i]]
        # Exactly once, in order, with the right bodies...
        assert [m.message_id for m in distinct] == [message_id(i) for i in range(count)]
        assert [m.body for m in distinct] == [str(i).encode() for i in range(count)]
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
            f"{count} messages; {send_errors[0]} failed sends retried; "
            f"{len(received) - len(distinct)} repeated reads"
        )
