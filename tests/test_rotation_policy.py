"""The rotation and fail-closed decisions of a tunnel binding (``qkdd.rotation.policy``),
with synthetic times: the whole table, and a property test over random event histories.
WireGuard and IPsec bindings run on this one policy (tests/test_wireguard.py and
tests/test_ipsec.py drive it through their rotators)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdd.rotation.policy import KeyState, RotationAction, RotationPolicy


def policy(*, master: bool = True, now: float = 1000.0, **changes: float) -> RotationPolicy:
    args = dict(interval=120.0, max_key_age=600.0, startup_timeout=15.0)
    args.update(changes)
    return RotationPolicy(drives_rotation=master, now=now, **args)


def test_policy_master_starts_pending_and_rotates_at_once():
    p = policy()
    assert p.state(1000) is KeyState.PENDING
    assert p.poll(1000) is RotationAction.ROTATE
    assert p.next_attempt_at == 1000
    assert p.key_id is None


def test_policy_slave_waits_for_the_peer_until_the_startup_deadline():
    p = policy(master=False)
    assert p.next_attempt_at is None
    assert p.poll(1000) is RotationAction.WAIT
    assert p.wake_at() == 1015
    assert p.poll(1014.9) is RotationAction.WAIT
    assert p.must_fail_closed(1015)
    assert p.poll(1015) is RotationAction.FAIL_CLOSED


def test_policy_startup_retries_quickly_then_fails_closed():
    p = policy()
    p.attempt_failed(1000)
    assert p.next_attempt_at == 1001  # 1 s before the first key, not 5 s
    assert p.poll(1000.5) is RotationAction.WAIT
    assert p.wake_at() == 1001
    assert p.poll(1001) is RotationAction.ROTATE
    p.attempt_failed(1014.5)
    # Rotation and fail-closed both due: failing closed comes first.
    assert p.poll(1015.5) is RotationAction.FAIL_CLOSED
    p.failed_closed(1015.5)
    assert p.state(1015.5) is KeyState.FAIL_CLOSED
    assert p.poll(1015.5) is RotationAction.ROTATE  # and the driving site keeps trying


def test_policy_fresh_install_schedules_the_next_rotation():
    p = policy()
    p.fresh_installed(1000, "k1")
    assert p.state(1000) is KeyState.FRESH
    assert p.key_id == "k1" and p.last_fresh_at == 1000
    assert p.poll(1119.9) is RotationAction.WAIT
    assert p.wake_at() == 1120
    assert p.poll(1120) is RotationAction.ROTATE
    assert p.fail_closed_at == 1600


def test_policy_failed_rotation_keeps_the_key_and_retries_sooner():
    p = policy()
    p.fresh_installed(1000, "k1")
    p.attempt_failed(1120)
    assert p.key_id == "k1"
    assert p.state(1120) is KeyState.STALE
    assert p.consecutive_failures == 1
    assert p.next_attempt_at == 1125  # min(interval, 5 s)
    assert not p.must_fail_closed(1125)


def test_policy_backoff_never_exceeds_the_interval():
    p = policy(interval=2.0, max_key_age=10.0)
    p.fresh_installed(0, "k1")
    p.attempt_failed(2)
    assert p.next_attempt_at == 4


def test_policy_slave_reports_stale_when_the_peer_is_overdue():
    p = policy(master=False)
    p.fresh_installed(1000, "k1")
    assert p.poll(1500) is RotationAction.WAIT  # the other site never rotates by itself
    assert p.state(1124.9) is KeyState.FRESH
    assert p.state(1125) is KeyState.STALE  # one interval plus one backoff


def test_policy_too_old_fails_closed_once():
    p = policy()
    p.fresh_installed(1000, "k1")
    t = 1120.0
    while t < 1600:
        assert p.poll(t) is RotationAction.ROTATE
        assert not p.must_fail_closed(t)
        p.attempt_failed(t)
        t = p.wake_at()
    assert t == 1600  # woken exactly when the key becomes too old
    assert p.state(1600) is KeyState.STALE  # never "fresh" once too old
    assert p.must_fail_closed(1600)
    assert p.poll(1600) is RotationAction.FAIL_CLOSED
    p.failed_closed(1600)
    assert p.key_id is None
    assert p.state(1600) is KeyState.FAIL_CLOSED
    assert p.fail_closed_at is None
    # Never again, however long the outage lasts: one fail-closed step, one log line.
    for later in (1600, 1601, 1700, 10_000, 1e9):
        assert not p.must_fail_closed(later)
        assert p.poll(later) is not RotationAction.FAIL_CLOSED


def test_policy_slave_too_old_fails_closed_once():
    p = policy(master=False)
    p.fresh_installed(1000, "k1")
    assert p.wake_at() == 1600
    assert p.poll(1599.9) is RotationAction.WAIT
    assert p.poll(1600) is RotationAction.FAIL_CLOSED
    p.failed_closed(1600)
    assert p.wake_at() == math.inf
    assert p.poll(1e9) is RotationAction.WAIT


def test_policy_failed_fail_closed_step_is_retried_after_the_backoff():
    p = policy(master=False)
    p.fresh_installed(1000, "k1")
    p.fail_closed_failed(1600)
    assert p.must_fail_closed(1601)  # still true: the old key is still installed
    assert p.poll(1601) is RotationAction.WAIT  # but not asked again every tick
    assert p.wake_at() == 1605
    assert p.poll(1605) is RotationAction.FAIL_CLOSED


def test_policy_recovers_after_a_fresh_key():
    p = policy()
    p.fresh_installed(1000, "k1")
    p.failed_closed(1600)
    p.attempt_failed(1600)
    p.fresh_installed(1700, "k2")
    assert p.state(1700) is KeyState.FRESH
    assert p.key_id == "k2" and p.consecutive_failures == 0
    assert not p.must_fail_closed(2299.9)
    assert p.poll(2300) is RotationAction.FAIL_CLOSED  # a new max_key_age from the new key


def test_policy_rejects_inconsistent_timers():
    with pytest.raises(ValueError):
        policy(interval=600.0, max_key_age=600.0)
    with pytest.raises(ValueError):
        policy(startup_timeout=0.0)


EVENTS = st.sampled_from(["fresh", "failed", "closed", "closed_failed", "nothing"])


@settings(max_examples=300, deadline=None)
@given(
    master=st.booleans(),
    steps=st.lists(st.tuples(st.floats(0, 400), EVENTS), max_size=40),
)
def test_policy_invariants(master, steps):
    """For any history: never "fresh" at or after max_key_age; a too-old key is always
    due to be replaced; and a WAIT always names a future time (no busy loop)."""
    p = policy(master=master, now=0.0)
    now = 0.0
    for n, (delay, event) in enumerate(steps):
        now += delay
        fresh_at = p.last_fresh_at
        if p.state(now) is KeyState.FRESH:
            assert fresh_at is not None and now - fresh_at < p.max_key_age
        if p.key_id is not None and fresh_at is not None and now - fresh_at >= p.max_key_age:
            assert p.must_fail_closed(now)
        action = p.poll(now)
        if action is RotationAction.WAIT:
            assert p.wake_at() > now
        if action is RotationAction.ROTATE:
            assert master
        if event == "fresh":
            p.fresh_installed(now, f"k{n}")
        elif event == "failed":
            p.attempt_failed(now)
        elif event == "closed":
            p.failed_closed(now)
        elif event == "closed_failed":
            p.fail_closed_failed(now)
