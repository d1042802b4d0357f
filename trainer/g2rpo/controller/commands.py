"""The controller's mutations as typed commands, and the one function that applies them.

A command is a frozen dataclass: what to change, and `at`, the Unix time to record for it.
`DurableController` (store.py) makes each command with its clock, applies it with `execute` and
journals it; a restart decodes the journal's records back into the same commands, their original
times included, and applies them with the same `execute`. The live path and a replay therefore
cannot drift apart, and a replay ends in exactly the state that was acknowledged.

A command checks the fields it can check alone when it is made (ValueError naming the field).
The checks that need the controller (a step that does not fit the history, a rewind past the end,
a snapshot that is not a consistent one) are `GuidanceController`'s, made before it changes
anything. Either way a refused command leaves the state as it was and is never journaled.

`encode` writes a command as the journal record that the store has always written (JSON with an
`op` string: report, rewind, override, restore) and `decode` reads one back, so journals written
before the commands existed replay as they did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, assert_never

from g2rpo.controller.core import GuidanceController, check_override, check_reward, check_step
from g2rpo.guidance import schedule as sched


@dataclass(frozen=True)
class Report:
    """Trainer rank 0 finished step `step` with driving reward `reward` and these statistics."""

    step: int
    reward: float
    metrics: Mapping[str, float]
    at: float

    def __post_init__(self) -> None:
        check_step(self.step)
        check_reward(self.reward)
        if not isinstance(self.metrics, Mapping):
            raise ValueError(f"metrics must be an object of numbers, got {self.metrics!r}")
        for name, value in self.metrics.items():
            # The journal writes strict JSON: a NaN refused here is one that cannot leave memory ahead of the disk.
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"metrics.{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Rewind:
    """The trainer resumed from the checkpoint taken after `step` steps."""

    step: int
    at: float

    def __post_init__(self) -> None:
        check_step(self.step)


@dataclass(frozen=True)
class Override:
    """An operator sets the next length and/or the schedule parameters (None: leave it)."""

    length: float | None
    params: sched.ScheduleParams | None
    reason: str
    at: float

    def __post_init__(self) -> None:
        check_override(self.length, self.params)
        if not isinstance(self.reason, str):
            raise ValueError(f"reason must be a string, got {self.reason!r}")


@dataclass(frozen=True)
class Restore:
    """Continue from the controller snapshot saved in a trainer checkpoint."""

    snapshot: dict[str, Any]
    at: float


Command = Report | Rewind | Override | Restore


def execute(controller: GuidanceController, command: Command) -> int:
    """Apply `command` to `controller` and return the next guidance length.

    Raises (StepConflict, ValueError) before changing anything when the command does not fit.
    """
    match command:
        case Report():
            return controller.report(command.step, command.reward, dict(command.metrics), at=command.at)
        case Rewind():
            return controller.rewind(command.step, at=command.at)
        case Override():
            return controller.override(command.length, command.reason, command.params, at=command.at)
        case Restore():
            return controller.restore(command.snapshot, at=command.at)
        case _:
            assert_never(command)


def encode(command: Command, seq: int) -> dict[str, Any]:
    """The journal record of `command` as record number `seq`."""
    fields: dict[str, Any]
    match command:
        case Report():
            reward, metrics = float(command.reward), dict(command.metrics)
            fields = {"op": "report", "step": command.step, "reward": reward, "metrics": metrics}
        case Rewind():
            fields = {"op": "rewind", "step": command.step}
        case Override():
            params = command.params.to_dict() if command.params is not None else None
            fields = {"op": "override", "length": command.length, "params": params, "reason": command.reason}
        case Restore():
            fields = {"op": "restore", "snapshot": command.snapshot}
        case _:
            assert_never(command)
    return {"seq": seq, "at": command.at, **fields}


def decode(record: Mapping[str, Any]) -> Command:
    """The command a journal record holds (KeyError, TypeError or ValueError if it holds none)."""
    at = record["at"]
    match record["op"]:
        case "report":
            return Report(record["step"], record["reward"], record["metrics"], at)
        case "rewind":
            return Rewind(record["step"], at)
        case "override":
            params = sched.ScheduleParams.from_dict(record["params"]) if record["params"] is not None else None
            return Override(record["length"], params, record["reason"], at)
        case "restore":
            return Restore(record["snapshot"], at)
        case op:
            raise ValueError(f"op: unknown journal operation {op!r}")
