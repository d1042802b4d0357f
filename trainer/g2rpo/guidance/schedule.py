"""Guidance-length schedules of G2RPO-A, as pure functions of a small, serialisable state.

Names from the paper (arXiv 2508.13023):

- k      the training step (0-based here: the first optimizer step is k = 0).
- l_k    the guidance length used at step k, in tokens: guided roll-outs start with the first
         l_k tokens of the prompt's reference reasoning trajectory.
- r_k    the mean of the guidance-driving reward (accuracy) over step k's whole global batch.
- T      the history window of the adaptive rule (`window`).
- alpha  the guided fraction of each group (see g2rpo.guidance.rows).

Schedules (l0 = initialLength; results are clipped to [minLength, maxLength]):

- fixed      l_k = l0
- linear     l_k = l0 * (1 - k/T_total)
- concave    l_k = l0 * (1 - k/T_total) ** power
- stepwise   l_k = l0 * decay ** floor(k / interval)
- adaptive   l_{k+1} = l_k * mean(r_{k-1}, ..., r_{k-min(T,k)}) / r_k       (paper Eq. 5, see below)
- cosine     l_k = l0 * (1 + cos(pi * min(k, T_total) / T_total)) / 2              (beyond the paper)

cosine anneals the guidance to 0 at step T_total and keeps it there, as the hint-annealing methods
that report gains over GRPO do (UFT, Prefix-RFT, QuestA); it reaches 0 only with minLength 0.

The adaptive rule, direction. The paper's text ("when recent rewards rise, l_k is reduced") and
the official code agree: reward up -> guidance down. Eq. 5 as printed has the ratio upside down
(r_k over the history mean), which would do the opposite; we implement the text.

Edge cases of the adaptive rule, each a deliberate choice:

- k = 0 (no history yet): l_1 = l_0; there is nothing to compare with.
- r_k = 0: the ratio is undefined. The official code skips the update, so a model that solves
  nothing keeps its guidance forever. Here the length grows instead: l_{k+1} = l_k * g with
  g = zeroRewardGrowth (default 2), and by at least one token while g > 1, so that a length of
  0 or 1 can grow too. A model that solves nothing needs more guidance.
- history mean 0, r_k > 0: the ratio is 0, so the length drops to minLength. That is Eq. 5's
  own answer (the model went from solving nothing to solving something), kept as is.

Smoothing, an option beyond the paper (`guidance.smoothing`, off by default). With a small batch
r_k is noisy: one unlucky step of reward 0 doubles l, and a window mean of 0 followed by any
success sends l to minLength, so l can cycle minLength -> ... -> maxLength and back. Two knobs,
each a no-op at its default, so that without them the rule above holds exactly:

- rewardEma = beta in [0, 1): Eq. 5 reads s_k = beta * s_{k-1} + (1 - beta) * r_k (s_0 = r_0) in
  place of r_k, for the current step and the window alike. s_k is 0 only while every reward so
  far was 0, so after the first success a zero-reward step no longer multiplies l by g: with a
  steady history it moves l by about 1/beta.
- maxChangeFactor = c >= 1: l_{k+1} / l_k is kept within [1/c, c] (before the clip to
  [minLength, maxLength]); a length of 0 may still grow by the one token of the zero-reward rule.
  This bounds the drop to minLength that a window mean of 0 would cause.

s is recomputed from the raw reward history (O(k) per step, microseconds against a training
step), so the state needs no extra field and a rewind or a change of smoothing stays exact.

The state keeps the exact float length (no rounding drift; small lengths can still move by
fractions that add up) and the reward history; the token count used is round(length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from g2rpo.api.spec import GuidanceSpec


@dataclass(frozen=True)
class ScheduleParams:
    """The schedule's parameters; built from the job spec's `guidance` section."""

    schedule: str
    initial_length: int
    min_length: int
    max_length: int
    window: int = 2
    total_steps: int | None = None
    power: float = 2.0
    decay: float = 0.5
    interval: int = 50
    zero_reward_growth: float = 2.0
    reward_ema: float = 0.0
    max_change_factor: float | None = None

    @classmethod
    def from_spec(cls, guidance: GuidanceSpec, run_total_steps: int | None = None) -> ScheduleParams:
        total = guidance.total_steps or run_total_steps
        if guidance.schedule in ("linear", "concave", "cosine") and not total:
            raise ValueError(f"the {guidance.schedule} schedule needs guidance.totalSteps or a known run length")
        return cls(
            schedule=guidance.schedule,
            initial_length=guidance.initial_length,
            min_length=guidance.min_length,
            max_length=guidance.max_length,
            window=guidance.window,
            total_steps=total,
            power=guidance.power,
            decay=guidance.decay,
            interval=guidance.interval,
            zero_reward_growth=guidance.zero_reward_growth,
            reward_ema=guidance.smoothing.reward_ema if guidance.smoothing else 0.0,
            max_change_factor=guidance.smoothing.max_change_factor if guidance.smoothing else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleParams:
        return cls(**data)


@dataclass(frozen=True)
class ScheduleState:
    """Where the schedule stands: `step` steps observed, `length` is l_step (the next step's length).

    `rewards[i]` is r_i and `lengths[i]` the float length used at step i, for i < step.
    """

    step: int
    length: float
    rewards: tuple[float, ...] = field(default_factory=tuple)
    lengths: tuple[float, ...] = field(default_factory=tuple)

    @property
    def tokens(self) -> int:
        """The guidance length in whole tokens for the next step."""
        return round(self.length)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "length": self.length, "rewards": list(self.rewards), "lengths": list(self.lengths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleState:
        return cls(
            step=int(data["step"]),
            length=float(data["length"]),
            rewards=tuple(float(r) for r in data["rewards"]),
            lengths=tuple(float(x) for x in data["lengths"]),
        )


def initial_state(params: ScheduleParams) -> ScheduleState:
    return ScheduleState(step=0, length=_clip(params, _timed_length(params, 0)))


def advance(params: ScheduleParams, state: ScheduleState, reward: float) -> ScheduleState:
    """Record r_k for step k = state.step and return the state holding l_{k+1}."""
    if not math.isfinite(reward):
        raise ValueError(f"reward must be a finite number, got {reward}")
    k = state.step
    if params.schedule == "adaptive":
        smoothed = smoothed_rewards(params, (*state.rewards, reward))
        next_length = _adaptive_next(params, state.length, history=smoothed[:-1], reward=smoothed[-1])
    else:
        next_length = _timed_length(params, k + 1)
    return ScheduleState(
        step=k + 1,
        length=_clip(params, next_length),
        rewards=(*state.rewards, reward),
        lengths=(*state.lengths, state.length),
    )


def rewind(state: ScheduleState, step: int) -> ScheduleState:
    """The state as it was when `step` steps had been observed (a resume from that checkpoint)."""
    if not 0 <= step <= state.step:
        raise ValueError(f"cannot rewind to step {step}: the schedule has observed steps 0..{state.step - 1}")
    if step == state.step:
        return state
    return ScheduleState(
        step=step, length=state.lengths[step], rewards=state.rewards[:step], lengths=state.lengths[:step]
    )


def with_length(params: ScheduleParams, state: ScheduleState, length: float) -> ScheduleState:
    """The same state with the next length replaced (an operator's override), clipped to the bounds."""
    return replace(state, length=_clip(params, length))


def lengths_for(params: ScheduleParams, rewards: list[float]) -> list[int]:
    """The token lengths l_0, l_1, ..., l_n that the schedule yields for rewards r_0..r_{n-1}."""
    state = initial_state(params)
    out = [state.tokens]
    for r in rewards:
        state = advance(params, state, r)
        out.append(state.tokens)
    return out


def smoothed_rewards(params: ScheduleParams, rewards: tuple[float, ...]) -> tuple[float, ...]:
    """s_0..s_k, the rewards the adaptive rule reads: the raw r_k unless rewardEma is set."""
    beta = params.reward_ema
    if beta == 0.0 or not rewards:
        return rewards
    smoothed = [rewards[0]]
    for reward in rewards[1:]:
        smoothed.append(beta * smoothed[-1] + (1.0 - beta) * reward)
    return tuple(smoothed)


def _adaptive_next(params: ScheduleParams, length: float, history: tuple[float, ...], reward: float) -> float:
    recent = history[-params.window :]
    if not recent:
        return length
    if reward == 0.0:
        grown = length * params.zero_reward_growth
        proposed = max(grown, length + 1.0) if params.zero_reward_growth > 1.0 else grown
    else:
        proposed = length * (sum(recent) / len(recent)) / reward
    return _capped(params, length, proposed)


def _capped(params: ScheduleParams, length: float, proposed: float) -> float:
    """`proposed` within a factor maxChangeFactor of `length` (no cap when it is unset or length is 0)."""
    factor = params.max_change_factor
    if factor is None or length <= 0.0:
        return proposed
    return min(length * factor, max(length / factor, proposed))


def _timed_length(params: ScheduleParams, k: int) -> float:
    l0 = float(params.initial_length)
    if params.schedule in ("fixed", "adaptive"):
        return l0
    if params.schedule == "stepwise":
        return l0 * params.decay ** (k // params.interval)
    assert params.total_steps, "linear, concave and cosine schedules need total_steps"
    remaining = max(0.0, 1.0 - k / params.total_steps)
    if params.schedule == "cosine":
        return l0 * (1.0 + math.cos(math.pi * (1.0 - remaining))) / 2.0
    if params.schedule == "linear":
        return l0 * remaining
    if params.schedule == "concave":
        return l0 * remaining**params.power
    raise ValueError(f"unknown schedule {params.schedule!r}")


def _clip(params: ScheduleParams, length: float) -> float:
    return min(float(params.max_length), max(float(params.min_length), length))
