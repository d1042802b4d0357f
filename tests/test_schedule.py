"""The guidance-length schedules as pure functions, and the controller's step semantics."""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator

import pytest

from g2rpo.controller.core import GuidanceController, StepConflict
from g2rpo.guidance.rows import guided_rows
from g2rpo.guidance.schedule import ScheduleParams, ScheduleState, advance, initial_state, lengths_for, rewind


def params(schedule="adaptive", **kw):
    base = {"schedule": schedule, "initial_length": 100, "min_length": 1, "max_length": 400, "window": 2}
    base.update(kw)
    return ScheduleParams(**base)


def test_adaptive_direction_reward_up_shrinks_reward_down_grows():
    # r: 0.5 then 1.0 (up) -> l * 0.5/1.0 ; then 0.25 (down) -> l * mean(0.5, 1.0)/0.25
    assert lengths_for(params(), [0.5, 1.0, 0.25]) == [100, 100, 50, 150]


def test_adaptive_uses_a_window_of_T_past_rewards():
    # T = 2: step 3 compares 0.3 with mean(0.2, 0.4) = 0.3 -> unchanged, not with r_0.
    wide = {"max_length": 10_000}
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
        # 100 * (1 + cos(pi * k/4)) / 2: 85.36, 50, 14.64, then 0 clipped to minLength 1
        ("cosine", {"total_steps": 4}, [100, 85, 50, 15, 1]),
    ],
)
def test_timed_schedules(schedule, extra, expected):
    assert lengths_for(params(schedule, **extra), [0.3, 0.9, 0.1, 0.5]) == expected


def test_cosine_anneals_to_zero_at_the_end_step_and_stays_there():
    cosine = params("cosine", total_steps=6, min_length=0)
    lengths = lengths_for(cosine, [0.0, 1.0, 0.5, 0.0, 1.0, 0.2, 0.9, 0.0])
    assert lengths == [100, 93, 75, 50, 25, 7, 0, 0, 0], "the rewards do not move it"
    assert all(a >= b for a, b in itertools.pairwise(lengths))
    state = initial_state(cosine)
    for r in [0.5] * 4:
        state = advance(cosine, state, r)
    assert rewind(state, 2).tokens == lengths[2]


def test_cosine_needs_an_end_step():
    from g2rpo.api.spec import GuidanceSpec

    spec = GuidanceSpec(schedule="cosine", initial_length=64, max_length=64, min_length=0)
    with pytest.raises(ValueError, match=r"the cosine schedule needs guidance\.totalSteps"):
        ScheduleParams.from_spec(spec)
    assert ScheduleParams.from_spec(spec, run_total_steps=40).total_steps == 40
    assert ScheduleParams.from_spec(spec.model_copy(update={"total_steps": 30}), run_total_steps=40).total_steps == 30


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
        split = functools.reduce(operator.iadd, (guided_rows(per_rank, r * per_rank, g, n) for r in range(ranks)), [])
        assert split == single
    assert single[:g] == [True] * n + [False] * (g - n)


# --- opt-in smoothing (beyond the paper) -----------------------------------------------------------------


def _noisy_rewards(seed: int, count: int = 60) -> list[float]:
    """Step rewards of a small batch: a few successes out of 8 roll-outs, often none."""
    import random

    rng = random.Random(seed)
    return [sum(rng.random() < 0.2 for _ in range(8)) / 8 for _ in range(count)]


@pytest.mark.parametrize("seed", range(8))
def test_smoothing_off_is_the_paper_rule_exactly(seed):
    rewards = _noisy_rewards(seed)
    paper = params()
    for off in (params(reward_ema=0.0), params(reward_ema=0.0, max_change_factor=None)):
        state_a, state_b = initial_state(paper), initial_state(off)
        for r in rewards:
            state_a, state_b = advance(paper, state_a, r), advance(off, state_b, r)
            assert state_a == state_b


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0, 3.0])
@pytest.mark.parametrize("ema", [0.0, 0.5, 0.9])
def test_change_factor_cap_bounds_every_step(seed, factor, ema):
    """With bounds that never bind, l_{k+1}/l_k lies in [1/c, c] at every step, whatever the rewards."""
    p = params(min_length=0, max_length=10**9, reward_ema=ema, max_change_factor=factor)
    state = initial_state(p)
    for r in [*_noisy_rewards(seed), 0.0, 0.0, 1.0, 0.0, 1.0]:
        before = state.length
        state = advance(p, state, r)
        assert before / factor * (1 - 1e-12) <= state.length <= before * factor * (1 + 1e-12)


def test_cap_applies_before_the_clip_to_bounds():
    p = params(min_length=60, max_change_factor=4.0)
    # History mean 0 then a success: the paper's rule drops to minLength; the cap allows 100/4 = 25,
    # which the clip then raises to minLength 60.
    assert lengths_for(p, [0.0, 0.5]) == [100, 100, 60]
    assert lengths_for(params(max_change_factor=4.0), [0.0, 0.5]) == [100, 100, 25]


def test_cap_lets_a_zero_length_grow():
    p = params(initial_length=0, min_length=0, max_change_factor=1.5)
    assert lengths_for(p, [0.5, 0.0])[-1] == 1


def test_reward_ema_is_read_in_place_of_r_k():
    p = params(reward_ema=0.5, max_length=10_000)
    # s = 0.4, 0.5*0.4 + 0.5*0.8 = 0.6, 0.5*0.6 + 0 = 0.3 ; l2 = 100*0.4/0.6, l3 = l2 * mean(0.4, 0.6)/0.3
    ls = lengths_for(p, [0.4, 0.8, 0.0])
    assert ls == [100, 100, round(100 * 0.4 / 0.6), round(100 * 0.4 / 0.6 * 0.5 / 0.3)]


def test_smoothing_stops_the_cycle_of_noisy_rewards():
    """The issue's cycle: with the paper's rule, noisy small-batch rewards swing l between the bounds."""
    bounds = {"initial_length": 24, "min_length": 4, "max_length": 80}
    rewards = [0.0, 0.25, 0.0, 0.0, 0.25, 0.0, 0.125, 0.0, 0.0, 0.25, 0.0, 0.0] * 3
    paper = lengths_for(params(**bounds), rewards)
    smooth = lengths_for(params(**bounds, reward_ema=0.8, max_change_factor=1.5), rewards)
    assert paper[2:6] == [4, 8, 16, 4] and paper.count(4) >= 8 and max(paper) == 32  # the cycle 4 -> 32 -> 4
    p = params(**bounds, reward_ema=0.8, max_change_factor=1.5)
    states = [initial_state(p)]
    for r in rewards:
        states.append(advance(p, states[-1], r))
    assert all(1 / 1.5 - 1e-9 <= b.length / a.length <= 1.5 + 1e-9 for a, b in itertools.pairwise(states))
    assert min(smooth) >= 8 and max(smooth[12:]) / min(smooth[12:]) < 3 < max(paper[12:]) / min(paper[12:])


def test_smoothed_state_round_trips_and_rewinds_exactly():
    p = params(reward_ema=0.7, max_change_factor=1.5)
    states = [initial_state(p)]
    for r in [0.3, 0.7, 0.0, 0.1, 0.5]:
        states.append(advance(p, states[-1], r))
    restored = ScheduleState.from_dict(json.loads(json.dumps(states[-1].to_dict())))
    assert restored == states[-1] and advance(p, restored, 0.6) == advance(p, states[-1], 0.6)
    for k in range(len(states)):
        assert advance(p, rewind(states[-1], k), 0.4) == advance(p, states[k], 0.4)
    assert ScheduleParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_smoothing_spec_fields_and_errors():
    from g2rpo.api.spec import GuidanceSpec

    spec = GuidanceSpec.model_validate({"smoothing": {"rewardEma": 0.8, "maxChangeFactor": 1.5}})
    p = ScheduleParams.from_spec(spec)
    assert (p.reward_ema, p.max_change_factor) == (0.8, 1.5)
    assert ScheduleParams.from_spec(GuidanceSpec()).reward_ema == 0.0
    with pytest.raises(ValueError, match="rewardEma"):
        GuidanceSpec.model_validate({"smoothing": {"rewardEma": 1.0}})
    with pytest.raises(ValueError, match="maxChangeFactor"):
        GuidanceSpec.model_validate({"smoothing": {"maxChangeFactor": 0.5}})
    with pytest.raises(ValueError, match="adaptive schedule only"):
        GuidanceSpec.model_validate({"schedule": "fixed", "smoothing": {"rewardEma": 0.5}})
