"""The one retry schedule: capped, doubling, optionally jittered, reset after a success."""

from __future__ import annotations

import pytest

from scoremesh.client.retry import Backoff


def test_waits_double_up_to_the_cap_and_start_over_after_a_reset() -> None:
    backoff = Backoff(0.25, 1.0)
    assert [backoff.next() for _ in range(5)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.25


def test_jitter_stays_in_the_upper_half_of_each_wait() -> None:
    backoff = Backoff(1.0, 8.0, jitter=True)
    for expected in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert expected / 2 <= backoff.next() <= expected


def test_a_schedule_that_cannot_be_is_refused() -> None:
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        Backoff(2.0, 1.0)
