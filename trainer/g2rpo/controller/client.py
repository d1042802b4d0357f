"""How the trainer talks to the guidance controller.

Rank 0 holds a `GuidanceClient`; it reports each step and broadcasts the answer to every rank.
`InProcessGuidanceClient` serves the local run with the very same `GuidanceController` that the
controller service wraps, so both paths share one implementation of the schedule's semantics.
"""

from __future__ import annotations

from typing import Any, Protocol

from g2rpo.controller.core import GuidanceController


class GuidanceClient(Protocol):
    def current(self) -> tuple[int, int]:
        """(step expected next, guidance length in tokens for it)."""

    def report(self, step: int, reward: float, metrics: dict[str, float]) -> int:
        """Report finished step `step` with its driving reward r_k; returns l_{k+1} in tokens."""

    def rewind(self, step: int) -> int:
        """Return the schedule to its state after `step` steps (resume); returns l_step."""

    def snapshot(self) -> dict[str, Any]:
        """The controller's full state (saved with every checkpoint)."""

    def restore(self, snapshot: dict[str, Any]) -> int:
        """Continue from a checkpoint's snapshot; returns the next length."""


class InProcessGuidanceClient:
    """A GuidanceClient backed by a controller living in this process."""

    def __init__(self, controller: GuidanceController):
        self.controller = controller

    def current(self) -> tuple[int, int]:
        return self.controller.step, self.controller.length

    def report(self, step: int, reward: float, metrics: dict[str, float]) -> int:
        return self.controller.report(step, reward, metrics)

    def rewind(self, step: int) -> int:
        return self.controller.rewind(step)

    def snapshot(self) -> dict[str, Any]:
        return self.controller.snapshot()

    def restore(self, snapshot: dict[str, Any]) -> int:
        """Checked as the service checks it (ValueError naming the inconsistency); this process has no
        past of its own, so the snapshot's event log is kept whole."""
        self.controller = GuidanceController.from_checkpoint(snapshot)
        return self.controller.length
