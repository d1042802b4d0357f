"""The guidance controller: the single source of truth for l_k, shared by all trainer ranks.

Rank 0 reports each finished step's statistics and gets back the next guidance length; every
rank then uses that length. The same object runs in process (the local run) and behind the
controller service's HTTP API (one pod per job in a cluster).

Semantics, the contract of both:

- `report(step=k, ...)` with k equal to the number of steps observed advances the schedule once.
- Reporting the last step again with the same reward (a retry whose answer was lost) is
  idempotent: no second advance; the answer is the current length (the same one, unless an
  operator overrode it in between).
- Any other step is refused with `StepConflict`: an older step (use `rewind` when the trainer
  resumes from a checkpoint), a retry with a different reward, or a step from the future.
- `rewind(step)` returns the schedule to the state it had after `step` steps.
- `override(length=..., params=...)` sets the next length and/or the schedule parameters by hand;
  it is recorded in the event log.
- `restore(snapshot)` continues from a checkpoint's snapshot; the event log keeps its past.

Every mutation checks everything it depends on before it changes anything: a refusal leaves the
controller as it was. Each takes the time to record as `at` (default: now), so that the durable
store (store.py) can stamp it with its own clock and a journal replay repeats the original times.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from g2rpo.guidance import schedule as sched


class StepConflict(ValueError):
    """A report that does not fit the schedule's history (stale, conflicting, or skipping steps)."""


def check_step(step: Any) -> None:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")


def check_reward(reward: Any) -> None:
    if not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ValueError(f"reward must be a finite number, got {reward!r}")


def check_override(length: float | None, params: sched.ScheduleParams | None) -> None:
    if length is None and params is None:
        raise ValueError("an override needs a length or schedule parameters")
    if length is not None and (not isinstance(length, (int, float)) or not math.isfinite(length) or length < 0):
        raise ValueError(f"length must be a non-negative finite number, got {length!r}")


def _now(at: float | None) -> float:
    return time.time() if at is None else at


@dataclass
class StepRecord:
    step: int
    reward: float
    length_used: int
    next_length: int
    metrics: dict[str, float]
    reported_at: float


@dataclass
class GuidanceController:
    params: sched.ScheduleParams
    state: sched.ScheduleState = field(init=False)
    history: list[StepRecord] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = sched.initial_state(self.params)

    @property
    def length(self) -> int:
        """l_k in tokens for the next step."""
        return self.state.tokens

    @property
    def step(self) -> int:
        """How many steps have been observed (the step number expected next)."""
        return self.state.step

    def report(
        self, step: int, reward: float, metrics: dict[str, float] | None = None, *, at: float | None = None
    ) -> int:
        """Record r_k for step k and return l_{k+1}, in tokens."""
        check_step(step)
        check_reward(reward)
        if self.history and step == self.history[-1].step:
            last = self.history[-1]
            if last.reward != float(reward):
                raise StepConflict(
                    f"step {step} was already reported with reward {last.reward}; a retry must repeat it "
                    f"(got {reward}). To replay from an earlier step, rewind first."
                )
            return self.state.tokens  # the answer it lost, or an operator's override made since
        if step != self.state.step:
            raise StepConflict(
                f"step {step} reported but the controller expects step {self.state.step}"
                + ("; rewind to resume from an older checkpoint" if step < self.state.step else "")
            )
        length_used = self.state.tokens
        self.state = sched.advance(self.params, self.state, float(reward))
        self.history.append(
            StepRecord(
                step=step,
                reward=float(reward),
                length_used=length_used,
                next_length=self.state.tokens,
                metrics=dict(metrics or {}),
                reported_at=_now(at),
            )
        )
        return self.state.tokens

    def rewind(self, step: int, *, at: float | None = None) -> int:
        """Go back to the state after `step` steps (a resume from that checkpoint); returns l_step."""
        self.state = sched.rewind(self.state, step)  # raises before anything changes if step is out of range
        del self.history[step:]
        self.events.append({"event": "rewind", "step": step, "at": _now(at)})
        return self.state.tokens

    def override(
        self,
        length: float | None,
        reason: str = "",
        params: sched.ScheduleParams | None = None,
        *,
        at: float | None = None,
    ) -> int:
        """An operator sets the next guidance length and/or the schedule parameters by hand.

        The length is clipped to the bounds in force afterwards; new parameters alone re-clip the
        current length to theirs. The event keeps the request as it came (None for what it left out).
        """
        check_override(length, params)
        if params is not None:
            self.params = params
        requested = self.state.length if length is None else float(length)
        self.state = sched.with_length(self.params, self.state, requested)
        self.events.append(
            {
                "event": "override",
                "step": self.state.step,
                "length": length,
                "reason": reason,
                "at": _now(at),
                "params": params.to_dict() if params is not None else None,
            }
        )
        return self.state.tokens

    def restore(self, snapshot: Any, *, at: float | None = None) -> int:
        """Continue from a checkpoint's snapshot (ValueError if it is not one); the event log keeps its past."""
        restored = self.from_checkpoint(snapshot)
        self.params, self.state, self.history = restored.params, restored.state, restored.history
        self.events.append({"event": "restore", "step": restored.step, "length": restored.length, "at": _now(at)})
        return self.length

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to restore this controller exactly (JSON-serialisable)."""
        return {
            "params": self.params.to_dict(),
            "state": self.state.to_dict(),
            "history": [record.__dict__ for record in self.history],
            "events": list(self.events),
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> GuidanceController:
        controller = cls(sched.ScheduleParams.from_dict(data["params"]))
        controller.state = sched.ScheduleState.from_dict(data["state"])
        controller.history = [StepRecord(**record) for record in data["history"]]
        controller.events = list(data.get("events", []))
        return controller

    @classmethod
    def from_checkpoint(cls, snapshot: Any) -> GuidanceController:
        """A controller from a checkpoint's snapshot, checked for consistency (ValueError if not)."""
        try:
            restored = cls.from_snapshot(snapshot)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a guidance controller snapshot: {exc!r}") from None
        if not (len(restored.history) == len(restored.state.rewards) == len(restored.state.lengths) == restored.step):
            raise ValueError(
                f"inconsistent snapshot: state.step={restored.step} but {len(restored.history)} history records, "
                f"{len(restored.state.rewards)} rewards and {len(restored.state.lengths)} lengths"
            )
        return restored
