"""The G2RPOJob's status: its schema (rendered into the CRD next to the spec's) and its conditions.

The operator writes the whole status on every change, built through `JobStatus`, so the CRD's
status schema and what the operator writes cannot drift apart. Cleared fields are written as
null, which a merge patch turns into "remove".
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]

SPEC_VALID = "SpecValid"
SPEC_APPLIED = "SpecApplied"
REFERENCES_RESOLVED = "ReferencesResolved"
STORAGE_READY = "StorageReady"
READY = "Ready"
SUSPENDED = "Suspended"
COMPLETE = "Complete"
FAILED = "Failed"
SANDBOX_ISOLATED = "SandboxIsolated"
"""Jobs with a code reward only: whether every layer of the code sandbox holds on the trainer's node."""
CHILDREN_SYNCED = "ChildrenSynced"
"""Whether the API server took the operator's last writes of the job's children; False (APIRefused) names
each refused object and the API server's message."""
STALLED = "Stalled"
"""Jobs with runPolicy.stallTimeoutSeconds only: True from a stall until the next step completes."""
CONDITION_TYPES = (
    SPEC_VALID,
    SPEC_APPLIED,
    REFERENCES_RESOLVED,
    CHILDREN_SYNCED,
    STORAGE_READY,
    READY,
    SUSPENDED,
    COMPLETE,
    FAILED,
    SANDBOX_ISOLATED,
    STALLED,
)


class StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(StatusModel):
    type: str = Field(description="One of " + ", ".join(CONDITION_TYPES) + ".")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="Why, in one CamelCase word (e.g. InvalidSpec, MissingReference).")
    message: str = Field(description="Why, for humans: names the field or object concerned.")
    last_transition_time: str = Field(description="When `status` last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The spec generation this was computed from.")


class JobStatus(StatusModel):
    phase: Phase = Field(description="Pending, Running, Suspended, Succeeded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions, one per type.")
    observed_generation: int | None = Field(None, description="The spec generation last reconciled.")
    step: int | None = Field(None, description="Optimizer steps completed (from the guidance controller).")
    accuracy_reward: float | None = Field(None, description="Mean accuracy reward of the last step.")
    guidance_length: int | None = Field(None, description="Guidance length l_k for the next step, in tokens.")
    last_checkpoint: str | None = Field(
        None,
        description="The newest checkpoint the run has reached by its schedule (checkpoint.everySteps): "
        "<checkpoint.dir>/checkpoint-<step>.",
    )
    start_time: str | None = Field(
        None,
        description="When every trainer pod was first ready (reset by suspend, as for Jobs); "
        "runPolicy.activeDeadlineSeconds counts from it.",
    )
    completion_time: str | None = Field(None, description="When the job succeeded or failed.")
    running_since: str | None = Field(
        None,
        description="When every pod of the current trainer attempt became ready (null unless Running); "
        "runPolicy.stallTimeoutSeconds counts from it until the first step.",
    )
    last_step_time: str | None = Field(
        None,
        description="When the operator first saw `step` at its current value (within a poll of the step's end); "
        "runPolicy.stallTimeoutSeconds counts from it.",
    )
    restarts: int = Field(0, description="Trainer restarts from a checkpoint after a failure (runPolicy.backoffLimit).")
    disruptions: int = Field(
        0,
        description="Gang restarts after the cluster took a trainer pod away (preemption, drain, eviction); "
        "not counted against runPolicy.backoffLimit.",
    )
    last_failed_trainer: str | None = Field(
        None, description="uid of the last failed trainer Job counted as a restart (so none is counted twice)."
    )


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def condition(
    type_: str, ok: bool | None, reason: str, message: str, previous: list[dict], now: datetime, generation: int | None
) -> Condition:
    """A condition whose lastTransitionTime only moves when its status flips (the Kubernetes convention).

    `ok` None: Unknown."""
    status: ConditionStatus = "Unknown" if ok is None else "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else timestamp(now)
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
