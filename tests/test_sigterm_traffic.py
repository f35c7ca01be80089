"""SIGTERM during traffic: the daemon stops accepting, answers what it already took, exits
0, and after a restart no key an application was given is lost or given twice.

Each stop comes once the restarted site is serving again and the traffic has moved on, so
every SIGTERM lands in live traffic however slow the machine is."""

from __future__ import annotations

import threading
import time

from timeouts import timeout

from qkdd.client import BlockingKeyClient, ClientError, KeyServiceClientError
from qkdd.demo import RunningSite, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B

STOPS = 4
KEYS_BETWEEN_STOPS = 6  # keys delivered at B since the last restart, before the next stop
PER_REQUEST = 32  # key IDs per dec_keys, below the demo's limit of 64


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout(120)
    while not condition():
        if time.monotonic() >= deadline:  # only a hang gets here
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def ready_count(site: RunningSite) -> int:
    return site.log_file.read_text().count("event=ready")


def test_sigterm_during_traffic_loses_nothing(tmp_path):
    acknowledged: dict[str, bytes] = {}
    received: dict[str, bytes] = {}
    errors: list[str] = []
    stop = threading.Event()

    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=timeout(30))
        wait_for_keys(site_b, SITE_A.sae_id, 0, timeout=timeout(30))

        def traffic() -> None:
            # Once stopped, finish delivering what A acknowledged, then end.
            pending: list[str] = []
            give_up = float("inf")
            while not stop.is_set() or (pending and time.monotonic() < give_up):
                if stop.is_set() and give_up == float("inf"):
                    give_up = time.monotonic() + timeout(60)
                if not stop.is_set():
                    try:
                        with BlockingKeyClient(
                            str(site_a.socket_path), timeout=timeout(30)
                        ) as app_a:
                            for key in app_a.enc_keys(SITE_B.sae_id, number=2):
                                acknowledged[key.key_id] = key.material
                                pending.append(key.key_id)
                    except ClientError:
                        time.sleep(0.05)  # A is restarting, or its pool is refilling
                if not pending:
                    continue
                # What piled up while B restarted goes in requests within its per-request
                # limit (the demo's max_keys_per_request).
                asked = pending[:PER_REQUEST]
                try:
                    with BlockingKeyClient(str(site_b.socket_path), timeout=timeout(30)) as app_b:
                        for key in app_b.dec_keys(SITE_A.sae_id, asked):
                            if key.key_id in received:
                                errors.append(f"{key.key_id} delivered twice")
                            received[key.key_id] = key.material
                    pending = pending[len(asked) :]
                except KeyServiceClientError as exc:
                    errors.append(f"B refused acknowledged keys: {exc}")
                    pending = pending[len(asked) :]
                except ClientError:
                    time.sleep(0.05)  # B is restarting: ask again

        worker = threading.Thread(target=traffic)
        worker.start()
        starts = {site_a.site.site_id: 1, site_b.site.site_id: 1}
        try:
            for index in range(STOPS):
                site = (site_a, site_b)[index % 2]
                # Stop a daemon that is serving, in the middle of traffic.
                wait_until(
                    lambda s=site: ready_count(s) >= starts[s.site.site_id],
                    f"{site.site.site_id} ready before stop {index}",
                )
                target = len(received) + KEYS_BETWEEN_STOPS
                wait_until(lambda t=target: len(received) >= t, f"traffic before stop {index}")
                process = site.process
                site.restart()  # SIGTERM, then start again
                starts[site.site.site_id] += 1
                assert process.returncode == 0, site.log_file.read_text()[-2000:]
            target = len(received) + KEYS_BETWEEN_STOPS
            wait_until(lambda: len(received) >= target, "traffic after the last restart")
        finally:
            stop.set()
            worker.join()  # it gives up on undelivered keys by itself

    assert not errors, errors[:5]
    lost = sorted(set(acknowledged) - set(received))
    assert not lost, f"{len(lost)} acknowledged keys never reached site B"
    assert all(acknowledged[k] == m for k, m in received.items())
