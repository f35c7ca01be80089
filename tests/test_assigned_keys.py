"""Keys of other sizes and for additional slave SAEs, end to end: real daemons, the real
emulator, ETSI GS QKD 014 calls on the real Unix sockets. The master's site takes whole
ready keys, the slave's site confirms over the peer session (KEY_ASSIGN) before enc_keys
answers, and every slave collects each key once."""

from __future__ import annotations

import signal

import pytest
from site_edits import second_sae_at_b
from timeouts import timeout

from qkdd.client import BlockingKeyClient, KeyServiceClientError
from qkdd.demo import running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B

SECOND_B = "sae-b2"


def test_sizes_and_additional_slaves_through_real_daemons(tmp_path):
    with running_demo(tmp_path, second_sae_at_b(SECOND_B)) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 40, timeout=timeout(60))
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            status = app_a.status(SITE_B.sae_id)
            assert status["min_key_size"] <= 64 and status["max_key_size"] >= 1024
            big = app_a.enc_keys(SITE_B.sae_id, number=3, size=1024)
            small = app_a.enc_keys(SITE_B.sae_id, number=2, size=72)
            shared = app_a.enc_keys(SITE_B.sae_id, number=2, additional_slave_sae_ids=[SECOND_B])
        assert [len(k.material) for k in big] == [128] * 3
        assert [len(k.material) for k in small] == [9] * 2
        assert len({k.material for k in big + small + shared}) == 7
        sock_b = str(site_b.socket_path)
        with BlockingKeyClient(sock_b, sae_id=SITE_B.sae_id) as app_b:
            got = app_b.dec_keys(SITE_A.sae_id, [k.key_id for k in big + small + shared])
        assert [k.material for k in got] == [k.material for k in big + small + shared]
        with BlockingKeyClient(sock_b, sae_id=SECOND_B) as app_b2:
            # The additional slave collects the shared keys too, once; never the others.
            assert app_b2.dec_keys(SITE_A.sae_id, [k.key_id for k in shared]) == got[5:]
            for key_ids in ([shared[0].key_id], [big[0].key_id]):
                with pytest.raises(KeyServiceClientError) as info:
                    app_b2.dec_keys(SITE_A.sae_id, key_ids)
                assert info.value.status == 400

        # With the peer's daemon stopped, default-size keys still come from stock, but keys
        # that need the peer's confirmation are refused with the reason, and nothing leaks.
        site_b.process.send_signal(signal.SIGTERM)
        site_b.process.wait(timeout(15))
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            before = app_a.status(SITE_B.sae_id)["stored_key_count"]
            with pytest.raises(KeyServiceClientError) as info:
                app_a.enc_keys(SITE_B.sae_id, number=1, size=512)
            assert info.value.status == 503
            assert "site-b" in info.value.message
            assert app_a.status(SITE_B.sae_id)["stored_key_count"] == before
            assert len(app_a.enc_keys(SITE_B.sae_id, number=1)) == 1
