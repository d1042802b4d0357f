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
- `override(length=...)` sets the next length by hand; it is recorded in the event log.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from g2rpo.guidance import schedule as sched


class StepConflict(ValueError):
    """A report that does not fit the schedule's history (stale, conflicting, or skipping steps)."""


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

    def report(self, step: int, reward: float, metrics: dict[str, float] | None = None) -> int:
        """Record r_k for step k and return l_{k+1}, in tokens."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise ValueError(f"reward must be a finite number, got {reward!r}")
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
                reported_at=time.time(),
            )
        )
        return self.state.tokens

    def rewind(self, step: int) -> int:
        """Go back to the state after `step` steps (a resume from that checkpoint); returns l_step."""
        self.state = sched.rewind(self.state, step)
        del self.history[step:]
        self.events.append({"event": "rewind", "step": step, "at": time.time()})
        return self.state.tokens

    def override(self, length: float, reason: str = "") -> int:
        """An operator sets the next guidance length by hand (clipped to the bounds)."""
        if not math.isfinite(length) or length < 0:
            raise ValueError(f"length must be a non-negative finite number, got {length!r}")
        self.state = sched.with_length(self.params, self.state, float(length))
        self.events.append({"event": "override", "step": self.state.step, "length": length, "reason": reason, "at": time.time()})
        return self.state.tokens

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
