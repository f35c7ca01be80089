"""Both daemons started at (nearly) the same moment, in either order: exactly one session,
and identical keys at both sites."""

from __future__ import annotations

import random

import pytest
from timeouts import timeout

from qkdd.demo import exchange_keys, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_B

RNG = random.Random(7)
STARTS = [(RNG.random() < 0.5, RNG.uniform(0.0, 2.0)) for _ in range(4)]


@pytest.mark.parametrize("b_first,gap", STARTS, ids=lambda v: str(round(v, 2)))
def test_start_order_and_gap_make_one_session(tmp_path, b_first, gap):
    with running_demo(tmp_path, b_first=b_first, gap=gap) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(30))
        assert all(row["match"] for row in exchange_keys(site_a, site_b, 4))
        for site in (site_a, site_b):
            log = site.log_file.read_text()
            assert log.count("event=session_established") == 1, log
            assert "auth=ml-dsa-bootstrap" in log
