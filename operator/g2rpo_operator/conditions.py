"""The status the operator writes: every condition and field, derived from what one pass observed
(`Facts`), the previous status and the clock.

Ready=False always names the most actionable reason: a missing reference, a child it does not own, a
write of a child the API server refused (also ChildrenSynced=False), the checkpoint claim, Kueue's
queue, a pod the scheduler or the kubelet cannot start, then waiting. A status equal to the previous
one is not written (no write, no watch event).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from g2rpo.api.spec import MUTABLE_FIELDS, G2RPOJobSpec
from g2rpo.api.status import (
    CHILDREN_SYNCED,
    COMPLETE,
    CONDITION_TYPES,
    FAILED,
    READY,
    REFERENCES_RESOLVED,
    SANDBOX_ISOLATED,
    SPEC_APPLIED,
    SPEC_VALID,
    STALLED,
    STORAGE_READY,
    SUSPENDED,
    JobStatus,
    condition,
)
from g2rpo_operator.builders.common import COMPONENT_LABEL, Manifest
from g2rpo_operator.controller_client import ControllerReport
from g2rpo_operator.kueue import PODS_READY_TIMEOUT, Admission
from g2rpo_operator.lifecycle import CLAIM_FIXES, Progress

IMAGE_PROBLEMS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
START_PROBLEMS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff", "RunContainerError"}
)


AFFINITY_MISMATCH = "didn't match Pod's node affinity"
"""How the scheduler's message counts nodes refused by the pod's nodeSelector or required node affinity
(kubernetes pkg/scheduler/framework/plugins/nodeaffinity/node_affinity.go, ErrReasonPod: "node(s) didn't
match Pod's node affinity/selector" since 1.22, "... node affinity" before); it is the PodScheduled
condition's message, as in the FailedScheduling event."""


CREATING = frozenset({"ContainerCreating", "PodInitializing"})
MOUNT_EVENTS = frozenset({"FailedMount", "FailedAttachVolume"})
"""The kubelet's (FailedMount) and the attach/detach controller's (FailedAttachVolume, e.g. Multi-Attach)
event reasons for a volume a pod cannot get: only events say why a pod stays in ContainerCreating."""


KUBELET_WAITS = frozenset({"Waiting", "WaitingForRollout", *MOUNT_EVENTS})
"""Ready reasons of a job whose pods may wait on the kubelet (mounting volumes): such a job is polled."""


def creating(pod: Manifest) -> bool:
    """A scheduled pod whose containers wait to be created (volumes are mounted first)."""
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or status.get("phase") != "Pending":
        return False
    containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    return any(((c.get("state") or {}).get("waiting") or {}).get("reason") in CREATING for c in containers)


def mount_problems(pod: Manifest, events: Sequence[Manifest]) -> list[tuple[str, str]]:
    """(reason, message) of the newest mount event of each reason about `pod` (from the events of its
    namespace: the caller may pass more)."""
    name = pod["metadata"]["name"]
    newest: dict[str, Manifest] = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        if involved.get("kind") != "Pod" or involved.get("name") != name or event.get("reason") not in MOUNT_EVENTS:
            continue
        if involved.get("uid") and pod["metadata"].get("uid") and involved["uid"] != pod["metadata"]["uid"]:
            continue  # an earlier pod of the same name
        if event["reason"] not in newest or _event_time(event) >= _event_time(newest[event["reason"]]):
            newest[event["reason"]] = event
    return [
        (reason, f"pod {name}: {reason}: {event.get('message', '')}".rstrip(": "))
        for reason, event in sorted(newest.items())
    ]


def _event_time(event: Manifest) -> str:
    return event.get("lastTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp") or ""


def pod_problems(pods: list[Manifest], placement_hints: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(reason, message) for each pod that waits on something the user or the cluster must fix: the
    scheduler's Unschedulable (with its message: which resources, taints, affinity), image pulls,
    container start errors. Pods being deleted are skipped (an old attempt going away). Where the scheduler
    found no node with the labels a pod requires, the message goes on with `placement_hints` of the pod's
    component (builders/common.py placement_hint: the labels tried and the fields that change them)."""
    hints = placement_hints or {}
    found: list[tuple[str, str]] = []
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        name, status = pod["metadata"]["name"], pod.get("status") or {}
        component = (pod["metadata"].get("labels") or {}).get(COMPONENT_LABEL, "")
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                message = f"pod {name}: {cond.get('message', '')}".rstrip(": ")
                if AFFINITY_MISMATCH in message and component in hints:
                    message = f"{message.rstrip('. ')}; {hints[component]}"
                found.append((cond.get("reason") or "Unschedulable", message))
        for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in IMAGE_PROBLEMS | START_PROBLEMS:
                message = (
                    f"pod {name}: container {container['name']}: {waiting['reason']}: {waiting.get('message', '')}"
                )
                found.append((waiting["reason"], message.rstrip(": ")))
    return found


def claim_problems(claim: Manifest | None, name: str, replicas: int) -> tuple[str, str] | None:
    """Why the checkpoint claim cannot serve the job yet, as (reason, message); None when it can.

    ClaimNotShared (a claim without ReadWriteMany) blocks the job, whatever trainer.replicas: the
    controller pod mounts the claim too, and it is a CPU pod that the scheduler puts on another node
    than the GPU pods, so a ReadWriteOnce volume attached to one of them leaves the other in
    ContainerCreating (Multi-Attach error). Co-locating every pod that mounts the claim (a required
    podAffinity) was the alternative, and a worse one: the controller would need the GPU nodes'
    taints tolerated, the first pod scheduled would pin the whole gang to its node (one that may
    lack the trainer's free GPUs, or that Kueue's admitted flavor excludes), and after a node
    failure the gang could not move. ClaimNotBound is reported but not blocking: claims of
    WaitForFirstConsumer classes bind only once a pod uses them.
    """
    if claim is None:
        return None
    modes = (claim.get("status") or {}).get("accessModes") or (claim.get("spec") or {}).get("accessModes") or []
    phase = (claim.get("status") or {}).get("phase") or "Pending"
    if "ReadWriteMany" not in modes:
        return (
            "ClaimNotShared",
            f"PersistentVolumeClaim {name!r} has access modes {modes or 'none'} (phase {phase}); the controller "
            f"pod and the {replicas} trainer pod(s) mount it from different nodes, which needs ReadWriteMany "
            "(a ReadWriteOnce volume hangs the second pod in ContainerCreating with a Multi-Attach error): use a "
            "claim of an RWX class (see spec.checkpoint.storageClassName)",
        )
    if phase != "Bound":
        return (
            "ClaimNotBound",
            f"PersistentVolumeClaim {name!r} is {phase}, not Bound (access modes {modes or 'none'}): check its "
            "storageClassName and `kubectl describe pvc`",
        )
    return None


@dataclass(frozen=True)
class Facts:
    """Everything a status is derived from, besides the previous status and the clock."""

    progress: Progress
    spec: G2RPOJobSpec
    checkpoint_dir: str
    generation: int | None
    spec_errors: list[str]
    refused: list[str]
    missing: list[str]
    conflicts: list[str]
    storage: tuple[str, str] | None
    problems: list[tuple[str, str]]
    waiting_for: list[str]
    """Deployments the trainer waits for (gating), empty once it may start."""
    trainer_ready: str
    """'ready/replicas' of the current trainer Job, '' when there is none."""
    report: ControllerReport | None
    kueue: Admission | None = None
    """The Workload's state under Kueue; None without it."""
    api_refusals: tuple[str, ...] = ()
    """The writes of the job's children the API server refused in this pass (reconcile.refusal)."""
    queued_by_kueue: str | None = None
    """Children Kueue queued as jobs of their own, and the fix (kueue.queued_by_kueue); None when none."""


Verdict = tuple[bool | None, str, str]
"""A condition's (status: None is Unknown, reason, message)."""


def _spec_applied(facts: Facts) -> Verdict:
    if facts.spec_errors:
        return False, "InvalidSpec", "the edit is invalid; still running the accepted spec"
    if facts.refused:
        fields = ", ".join(f"spec.{path}" for path in facts.refused)
        mutable = ", ".join(f"spec.{path}" for path in sorted(MUTABLE_FIELDS))
        return (
            False,
            "ImmutableFieldChanged",
            f"{fields} cannot change after creation (only {mutable} can); revert the edit or create a new "
            "job; still running the accepted spec",
        )
    return True, "Applied", "the spec is applied"


def _ready(facts: Facts) -> Verdict:
    """Why the job is not (yet) running, most actionable reason first."""
    p = facts.progress
    if p.phase in ("Succeeded", "Failed", "Suspended"):
        return False, p.reason, p.message
    if p.phase == "Running":
        return True, "Running", "the controller, the rollout server and every trainer pod are ready"
    if facts.missing:
        return False, "MissingReference", "; ".join(facts.missing)
    if facts.conflicts:
        owned = "; ".join(f"{c} exists and is not owned by this job (delete or rename it)" for c in facts.conflicts)
        return False, "ChildConflict", owned
    if facts.api_refusals:
        return _children_synced(facts)
    if facts.storage:
        return False, *facts.storage
    if facts.queued_by_kueue:
        return False, "QueuedByKueue", facts.queued_by_kueue
    if facts.kueue and facts.kueue.evicted is not None:
        return False, "Evicted", _evicted(facts)
    if facts.kueue and not facts.kueue.admitted:
        return False, "Queued", facts.kueue.waiting
    if facts.problems:
        return False, facts.problems[0][0], "; ".join(message for _, message in facts.problems)
    if p.reason == "Restarting":
        return False, p.reason, p.message
    if facts.waiting_for:
        return (
            False,
            "WaitingForRollout",
            "the trainer starts once these are Available: "
            + ", ".join(facts.waiting_for)
            + " (vLLM may take up to spec.rollout.startupTimeoutSeconds to load the model)",
        )
    if facts.trainer_ready:
        return False, "Waiting", f"waiting for the trainer pods to become ready ({facts.trainer_ready} ready)"
    return False, "Waiting", "waiting for the trainer Job"


def _children_synced(facts: Facts) -> Verdict:
    if facts.api_refusals:
        return (
            False,
            "APIRefused",
            "; ".join(facts.api_refusals) + " (retried with a growing delay; fix the cause named here: RBAC, an "
            "admission webhook or policy, a quota)",
        )
    return True, "Synced", "the API server took every write of the job's children"


def _evicted(facts: Facts) -> str:
    """Kueue's eviction, with its reason; a pods-ready timeout names the settings that must agree."""
    assert facts.kueue is not None
    reason = facts.kueue.eviction_reason or "Evicted"
    message = (
        f"Kueue evicted the gang ({reason}: {facts.kueue.evicted}): stopping the rollout and the trainer, then "
        "the Workload is queued again and the gang resumes from the newest checkpoint once admitted"
    )
    if reason == PODS_READY_TIMEOUT:
        message += (
            ". The gang must be ready within Kueue's waitForPodsReady.timeout: raise it above image pulls plus "
            f"spec.rollout.startupTimeoutSeconds ({facts.spec.rollout.startup_timeout_seconds} s), or lower the "
            "latter if vLLM loads faster"
        )
    return message


def _in_phase(p: Progress, phase: str, otherwise: str) -> Verdict:
    return (True, p.reason, p.message) if p.phase == phase else (False, otherwise, "")


def _storage(facts: Facts) -> Verdict:
    claim = facts.spec.checkpoint.volume_claim
    if any("spec.checkpoint.volumeClaim" in m for m in facts.missing):
        return False, "MissingReference", f"PersistentVolumeClaim {claim!r} not found"
    if facts.storage:
        return False, *facts.storage
    if facts.progress.reason in CLAIM_FIXES:
        return False, facts.progress.reason, facts.progress.message
    return True, "Bound", f"PersistentVolumeClaim {claim!r} is Bound"


def _sandbox(facts: Facts, previous: list[dict]) -> Verdict | None:
    """How strong the code reward's sandbox is on the trainer's node; None (no condition) without a code reward."""
    if not any(reward.name == "code" for reward in facts.spec.rewards):
        return None
    layers = facts.report.sandbox_layers if facts.report else None
    if layers is None:  # no step reported yet, or the controller did not answer: keep what was known
        before = next((c for c in previous if c.get("type") == SANDBOX_ISOLATED), None)
        if before is not None:
            return {"True": True, "False": False}.get(before["status"]), before["reason"], before["message"]
        return None, "NotReported", "the trainer reports the code sandbox's layers with its first step"
    missing = sorted(layer for layer, held in layers.items() if not held)
    if missing:
        return (
            False,
            "LayersMissing",
            f"model-written programs run without the sandbox's {', '.join(missing)} layer(s) on the trainer's "
            "node: the trainer's log says why; docs/sandbox.md lists what each layer needs from the image and "
            "the pod's securityContext",
        )
    return True, "AllLayersHold", "every layer of the code sandbox holds: " + ", ".join(sorted(layers))


def _stalled(facts: Facts, prev: Manifest) -> Verdict | None:
    """Whether the trainer hung (no condition without runPolicy.stallTimeoutSeconds): True from the pass that
    saw the stall until a later step completes, so the reason outlives the restart it caused."""
    timeout = facts.spec.run_policy.stall_timeout_seconds
    if not timeout:
        return None
    p = facts.progress
    if p.stalled is not None:
        return True, "NoStepCompleted", p.message  # names the stall, and the restart or the failure it causes
    before = next((c for c in prev.get("conditions") or [] if c.get("type") == STALLED), None)
    if before is not None and before.get("status") == "True" and p.last_step_time == prev.get("lastStepTime"):
        return True, before["reason"], before["message"]
    return False, "StepsCompleting", f"steps complete within runPolicy.stallTimeoutSeconds ({timeout} s)"


def job_status(facts: Facts, prev: Manifest, now: datetime) -> JobStatus:
    p = facts.progress
    errors, missing = "; ".join(facts.spec_errors), "; ".join(facts.missing)
    verdicts: dict[str, Verdict] = {
        SPEC_VALID: (False, "InvalidSpec", errors) if errors else (True, "Valid", "the spec is valid"),
        SPEC_APPLIED: _spec_applied(facts),
        REFERENCES_RESOLVED: (False, "MissingReference", missing) if missing else (True, "Resolved", "all exist"),
        CHILDREN_SYNCED: _children_synced(facts),
        STORAGE_READY: _storage(facts),
        READY: _ready(facts),
        SUSPENDED: _in_phase(p, "Suspended", "NotSuspended"),
        COMPLETE: _in_phase(p, "Succeeded", "NotComplete"),
        FAILED: _in_phase(p, "Failed", "NotFailed"),
    }
    old = prev.get("conditions") or []
    sandbox = _sandbox(facts, old)
    if sandbox is not None:
        verdicts[SANDBOX_ISOLATED] = sandbox
    stalled = _stalled(facts, prev)
    if stalled is not None:
        verdicts[STALLED] = stalled
    conditions = [condition(t, *verdicts[t], old, now, facts.generation) for t in CONDITION_TYPES if t in verdicts]
    report = facts.report
    step = report.step if report else prev.get("step")
    every = facts.spec.checkpoint.every_steps
    reached = (step // every) * every if step else 0
    return JobStatus(
        phase=p.phase,
        conditions=conditions,
        observed_generation=facts.generation,
        step=step,
        accuracy_reward=report.reward if report and report.reward is not None else prev.get("accuracyReward"),
        guidance_length=report.length if report else prev.get("guidanceLength"),
        last_checkpoint=f"{facts.checkpoint_dir}/checkpoint-{reached}" if reached else prev.get("lastCheckpoint"),
        start_time=p.start_time,
        completion_time=p.completion_time,
        running_since=p.running_since,
        last_step_time=p.last_step_time,
        restarts=p.restarts,
        disruptions=p.disruptions,
        last_failed_trainer=p.last_failed_trainer,
    )


def invalid_status(errors: list[str], prev: Manifest, now: datetime, generation: int | None) -> JobStatus:
    """A job whose spec was never accepted: Failed with InvalidSpec, and nothing created."""
    old = prev.get("conditions") or []
    message = "; ".join(errors)
    return JobStatus(
        phase="Failed",
        conditions=[
            condition(SPEC_VALID, False, "InvalidSpec", message, old, now, generation),
            condition(READY, False, "InvalidSpec", "nothing is created until the spec is fixed", old, now, generation),
        ],
        observed_generation=generation,
    )


def status_patch(status: JobStatus, prev: Manifest) -> Manifest | None:
    """The status to write, or None when it would change nothing (no write, no watch event)."""
    new = status.model_dump(by_alias=True, mode="json")
    if all(prev.get(key) == value for key, value in new.items()):
        return None
    return new
