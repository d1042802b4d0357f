"""The guidance-length schedules as pure functions, and the controller's step semantics."""

from __future__ import annotations

import json
import math

import pytest

from g2rpo.controller.core import GuidanceController, StepConflict
from g2rpo.guidance.rows import guided_rows
from g2rpo.guidance.schedule import ScheduleParams, ScheduleState, advance, initial_state, lengths_for, rewind


def params(schedule="adaptive", **kw):
    base = dict(schedule=schedule, initial_length=100, min_length=1, max_length=400, window=2)
    base.update(kw)
    return ScheduleParams(**base)


def test_adaptive_direction_reward_up_shrinks_reward_down_grows():
    # r: 0.5 then 1.0 (up) -> l * 0.5/1.0 ; then 0.25 (down) -> l * mean(0.5, 1.0)/0.25
    assert lengths_for(params(), [0.5, 1.0, 0.25]) == [100, 100, 50, 150]


def test_adaptive_uses_a_window_of_T_past_rewards():
    # T = 2: step 3 compares 0.3 with mean(0.2, 0.4) = 0.3 -> unchanged, not with r_0.
    wide = dict(max_length=10_000)
    ls = lengths_for(params(window=2, **wide), [0.9, 0.2, 0.4, 0.3])
    assert ls == [100, 100, 450, 619, 619]
    # T = 3 also sees r_0 = 0.9: 618.75 * mean(0.9, 0.2, 0.4) / 0.3 = 1031.25
    assert lengths_for(params(window=3, **wide), [0.9, 0.2, 0.4, 0.3])[4] == 1031


def test_adaptive_clips_to_bounds():
    assert lengths_for(params(max_length=120), [0.5, 0.1])[-1] == 120
    assert lengths_for(params(min_length=30), [0.5, 1.0, 1.0, 1.0, 1.0])[-1] >= 30
    assert lengths_for(params(min_length=30), [0.01, 1.0])[-1] == 30


def test_zero_reward_grows_guidance_instead_of_freezing():
    ls = lengths_for(params(), [0.0, 0.0, 0.0, 0.0])
    assert ls == [100, 100, 200, 400, 400]
    tiny = lengths_for(params(initial_length=0, min_length=0), [0.0, 0.0, 0.0])
    assert tiny[-1] > 0, "a zero length must still be able to grow"


def test_history_mean_zero_then_reward_drops_guidance_to_minimum():
    assert lengths_for(params(), [0.0, 0.5]) == [100, 100, 1]


def test_first_step_keeps_the_initial_length():
    assert lengths_for(params(), [0.7]) == [100, 100]


def test_fractional_lengths_accumulate_without_rounding_drift():
    # 10 * 0.9/1.0 = 9.0 ; small ratios keep adding up in the float state
    state = initial_state(params(initial_length=3, min_length=0))
    for r in [1.0, 1.1, 1.2, 1.3, 1.4]:
        state = advance(params(initial_length=3, min_length=0), state, r)
    assert state.length < 3 and state.tokens == round(state.length)


@pytest.mark.parametrize(
    ("schedule", "extra", "expected"),
    [
        ("fixed", {}, [100, 100, 100, 100, 100]),
        ("linear", {"total_steps": 4}, [100, 75, 50, 25, 1]),
        ("concave", {"total_steps": 4, "power": 2.0}, [100, 56, 25, 6, 1]),
        ("stepwise", {"decay": 0.5, "interval": 2}, [100, 100, 50, 50, 25]),
    ],
)
def test_timed_schedules(schedule, extra, expected):
    assert lengths_for(params(schedule, **extra), [0.3, 0.9, 0.1, 0.5]) == expected


def test_reward_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        advance(params(), initial_state(params()), math.nan)


def test_state_round_trips_exactly_through_json():
    p = params()
    state = initial_state(p)
    for r in [0.3, 0.7, 0.1, 0.0, 0.45]:
        state = advance(p, state, r)
    restored = ScheduleState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    assert advance(p, restored, 0.6) == advance(p, state, 0.6)


def test_rewind_returns_the_state_after_that_many_steps():
    p = params()
    states = [initial_state(p)]
    for r in [0.3, 0.7, 0.1, 0.5]:
        states.append(advance(p, states[-1], r))
    for k in range(5):
        assert rewind(states[-1], k) == states[k]
    with pytest.raises(ValueError):
        rewind(states[-1], 5)


def test_controller_retry_is_idempotent_and_stale_steps_are_refused():
    c = GuidanceController(params())
    first = c.report(0, 0.5, {})
    second = c.report(1, 1.0, {})
    assert c.report(1, 1.0, {}) == second and c.step == 2
    with pytest.raises(StepConflict, match="already reported"):
        c.report(1, 0.9, {})
    with pytest.raises(StepConflict, match="rewind"):
        c.report(0, 0.5, {})
    with pytest.raises(StepConflict, match="expects step 2"):
        c.report(5, 0.5, {})
    assert c.rewind(1) == first and c.step == 1
    assert c.report(1, 0.25, {}) == 200  # 100 * r_0 / r_1 = 100 * 0.5 / 0.25


def test_controller_snapshot_round_trip():
    c = GuidanceController(params())
    for k, r in enumerate([0.2, 0.4, 0.1]):
        c.report(k, r, {"reward_std": 0.1})
    c.override(42, reason="test")
    again = GuidanceController.from_snapshot(json.loads(json.dumps(c.snapshot())))
    assert again.snapshot() == c.snapshot() and again.length == 42


@pytest.mark.parametrize(("g", "n"), [(4, 1), (6, 2), (8, 3), (5, 5)])
def test_guided_rows_do_not_depend_on_the_rank_layout(g, n):
    groups = 6
    single = guided_rows(g * groups, 0, g, n)
    for ranks in (2, 3):
        per_rank = g * groups // ranks
        split = sum((guided_rows(per_rank, r * per_rank, g, n) for r in range(ranks)), [])
        assert split == single
    assert single[:g] == [True] * n + [False] * (g - n)
