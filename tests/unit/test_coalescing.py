"""The adaptive stream interval (core/coalescing.py): tokens per streamed chunk from the streams
running and the engine's pace, and the pace's measurement."""

from __future__ import annotations

import pytest

from jamba_server.core.coalescing import MAX_INTERVAL, CoalescePolicy, TokenPace

POLICY = CoalescePolicy(fixed_interval=1, max_gap=0.05, min_streams=4)


def test_an_idle_server_never_delays_a_stream():
    assert POLICY.interval(streams=1, seconds_per_token=0.001) == 1
    assert POLICY.interval(streams=3, seconds_per_token=0.001) == 1
    assert CoalescePolicy(fixed_interval=3, max_gap=0.05, min_streams=4).interval(2, 0.001) == 3  # the operator's floor


def test_under_load_a_chunk_gathers_the_steps_that_fit_the_gap():
    assert POLICY.interval(streams=4, seconds_per_token=0.010) == 5
    assert POLICY.interval(streams=64, seconds_per_token=0.012) == 4  # 0.048 s fits, 0.060 would not
    assert POLICY.interval(streams=16, seconds_per_token=0.030) == 1  # slow steps: one already fills the gap


def test_the_interval_is_bounded_both_ways():
    assert POLICY.interval(streams=16, seconds_per_token=1e-6) == MAX_INTERVAL
    floor = CoalescePolicy(fixed_interval=6, max_gap=0.05, min_streams=4)
    assert floor.interval(streams=16, seconds_per_token=0.020) == 6  # never under the fixed interval


@pytest.mark.parametrize("pace", [None, 0.0])
def test_no_pace_measured_yet_means_the_fixed_interval(pace):
    assert POLICY.interval(streams=16, seconds_per_token=pace) == 1


def test_a_zero_gap_turns_the_adaptive_interval_off():
    assert CoalescePolicy(fixed_interval=2, max_gap=0.0, min_streams=1).interval(64, 0.001) == 2


def test_pace_starts_at_the_first_sample_and_steps_towards_later_ones():
    pace = TokenPace(step=0.5)
    assert pace.seconds_per_token is None
    pace.observe(0.040, 4)  # a chunk of four tokens 40 ms after the last
    assert pace.seconds_per_token == pytest.approx(0.010)
    pace.observe(1.0, 1)  # however far above: one step up
    assert pace.seconds_per_token == pytest.approx(0.015)
    pace.observe(0.001, 1)
    assert pace.seconds_per_token == pytest.approx(0.010)
    pace.observe(0.5, 0)  # no tokens (a finish without text): nothing to learn
    pace.observe(0.0, 2)
    assert pace.seconds_per_token == pytest.approx(0.010)


def test_pace_is_the_median_not_the_mean_of_gaps_with_rare_stalls():
    """One step in ten a long prefill stalls every stream: the mean per-token gap doubles, the
    median (what the chunk-gap bound is about) stays at the decode step."""
    pace = TokenPace()
    for i in range(2000):
        pace.observe(0.120 if i % 10 == 0 else 0.010, 1)
    assert pace.seconds_per_token == pytest.approx(0.010, rel=0.05)
    assert POLICY.interval(16, pace.seconds_per_token) in (4, 5)


def test_pace_follows_a_change_of_load():
    pace = TokenPace()
    for _ in range(300):
        pace.observe(0.010, 1)
    for _ in range(300):
        pace.observe(0.030, 1)
    assert pace.seconds_per_token == pytest.approx(0.030, rel=0.05)
    assert POLICY.interval(16, pace.seconds_per_token) == 1
