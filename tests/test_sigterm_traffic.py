"""SIGTERM during traffic: the daemon stops accepting, answers what it already took, exits
0, and after a restart no key an application was given is lost or given twice."""

from __future__ import annotations

import threading
import time

from qkdd.client import BlockingKeyClient, ClientError, KeyServiceClientError
from qkdd.demo import running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B

STOPS = 4


def test_sigterm_during_traffic_loses_nothing(tmp_path):
    acknowledged: dict[str, bytes] = {}
    received: dict[str, bytes] = {}
    errors: list[str] = []
    stop = threading.Event()

    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=30)
        wait_for_keys(site_b, SITE_A.sae_id, 0, timeout=30)

        def traffic() -> None:
            pending: list[str] = []
            while not stop.is_set():
                try:
                    with BlockingKeyClient(str(site_a.socket_path), timeout=5) as app_a:
                        for key in app_a.enc_keys(SITE_B.sae_id, number=2):
                            acknowledged[key.key_id] = key.material
                            pending.append(key.key_id)
                except ClientError:
                    time.sleep(0.05)  # A is restarting, or its pool is refilling
                if not pending:
                    continue
                try:
                    with BlockingKeyClient(str(site_b.socket_path), timeout=5) as app_b:
                        for key in app_b.dec_keys(SITE_A.sae_id, pending):
                            if key.key_id in received:
                                errors.append(f"{key.key_id} delivered twice")
                            received[key.key_id] = key.material
                    pending = []
                except KeyServiceClientError as exc:
                    errors.append(f"B refused acknowledged keys: {exc}")
                    pending = []
                except ClientError:
                    time.sleep(0.05)  # B is restarting: ask again

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            for index in range(STOPS):
                time.sleep(1.0)
                site = (site_a, site_b)[index % 2]
                process = site.process
                site.restart()  # SIGTERM, then start again
                assert process.returncode == 0, site.log_file.read_text()[-2000:]
            time.sleep(3.0)
        finally:
            stop.set()
            worker.join(timeout=30)

    assert not errors, errors[:5]
    assert len(acknowledged) >= 20, len(acknowledged)
    lost = sorted(set(acknowledged) - set(received))
    assert not lost, f"{len(lost)} acknowledged keys never reached site B"
    assert all(acknowledged[k] == m for k, m in received.items())
