"""Reconciliation: what a G2RPOJob should have, what it has, and the status that follows.

Level-triggered: every pass reads the children afresh and moves them one step towards the
desired state, so a pass interrupted anywhere (operator killed between two creates) is completed
by the next one — creates that already happened answer 409 and are recognised as ours by their
ownerReference, nothing is created twice and nothing is left without an owner.

Decisions are pure functions (`validate`, `spec_changes`, `progress`, `job_status`) over dicts;
`Reconciler` is the thin shell that reads and writes through the API.

Rules worth knowing:
- The ConfigMap's job.yaml is the accepted spec. An edit touching only MUTABLE_FIELDS is applied;
  any other edit is refused as a whole (condition SpecApplied=False naming the fields) and the job
  keeps running the accepted spec. An edit to an invalid spec is refused the same way.
- The gang starts in order: the trainer Job is created only once the controller and the rollout
  Deployments are Available (with the current gang epoch), Ready=False WaitingForRollout until
  then. Under Volcano the Job is created with the rollout (the PodGroup must see every pod) and the
  trainer waits in process (vllm_server_timeout = rollout.startupTimeoutSeconds).
- A failed trainer Job is first counted (status.restarts, status.lastFailedTrainer = its uid), and
  deleted on the next pass; so a crash between the two can neither skip nor double-count a restart.
  Counting raises the gang epoch (restarts + disruptions), an annotation of the rollout's pod
  template: the Deployment replaces the vLLM pod, which drops its NCCL weight-sync group with the
  dead rank 0, and the next trainer Job waits until the new rollout is Available. Within
  runPolicy.backoffLimit the trainer resumes from the newest checkpoint (checkpoint.resume auto);
  past it the job fails with the pods' exit reasons.
- A trainer pod disrupted by the cluster (condition DisruptionTarget: preemption, drain, eviction)
  restarts the gang the same way but counts in status.disruptions, not against backoffLimit; a pod
  that exits with EXIT_INVALID_SPEC fails the job at once (InvalidConfiguration).
- Phase Running means every trainer pod is ready (Job status.ready), not merely created: until then
  the phase is Pending and Ready says why (claim not Bound, Unschedulable with the scheduler's
  message, image pull errors, waiting for the rollout). status.startTime is the first time every
  rank was ready; runPolicy.activeDeadlineSeconds counts from it (the Job's own deadline would count
  queueing and image pulls, so the operator enforces it and leaves the Job's unset).
- The checkpoint claim must exist (or is created from checkpoint.volumeSize), must request
  ReadWriteMany when trainer.replicas > 1 (nothing is created otherwise) and is reported until Bound
  (condition StorageReady; pods are still created, since WaitForFirstConsumer classes bind only
  for a pod).
- Suspend deletes the trainer Job and scales the Deployments to zero; resume recreates them. A
  finished job (status.completionTime set) is never restarted; its GPUs are released.
- Under Kueue (runPolicy.gangScheduler kueue) one Workload holds the GPU gang: the rollout
  Deployment and the trainer Job exist only while Kueue admits it (Ready=False Queued until then),
  and an eviction stops the gang as a disruption, then hands the quota back (kueue.py). A suspended
  or finished job's Workload is deleted, which returns its quota.
- Passes read through a watch-fed cache (cache.py) except every settings.resync_seconds, when they
  read everything from the API.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from g2rpo.api.names import CHECKPOINT_MOUNT, TOKEN_KEY
from g2rpo.api.spec import (
    EXIT_INVALID_SPEC,
    MAX_NAME_LENGTH,
    MUTABLE_FIELDS,
    G2RPOJobSpec,
    SpecError,
    check_batch_layout,
    parse_spec,
)
from g2rpo.api.status import (
    COMPLETE,
    CONDITION_TYPES,
    FAILED,
    READY,
    REFERENCES_RESOLVED,
    SANDBOX_ISOLATED,
    SPEC_APPLIED,
    SPEC_VALID,
    STORAGE_READY,
    SUSPENDED,
    JobStatus,
    Phase,
    condition,
    parse_timestamp,
    timestamp,
)
from kopf import append_owner_reference
from pydantic import ValidationError

from g2rpo_operator.builders import JobContext, children, config
from g2rpo_operator.builders.common import APP_NAME, GANG_EPOCH_ANNOTATION, MANAGED_BY, child_name
from g2rpo_operator.builders.gang import kueue_queue, trainer_waits_in_process
from g2rpo_operator.cache import ObjectCache, View
from g2rpo_operator.controller_client import ControllerReport, read_controller
from g2rpo_operator.kueue import Admission, Placement, admission_of, assigned_flavors, placements, release_quota
from g2rpo_operator.kube import (
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    PODS,
    PVCS,
    RESOURCE_FLAVORS,
    SECRETS,
    WORKLOADS,
    KubeApi,
    KubeError,
    Manifest,
    Resource,
    resource_of,
)
from g2rpo_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


# --- pure decisions ------------------------------------------------------------------------------


def validate(
    name: str, raw_spec: Any, settings: OperatorSettings | None = None
) -> tuple[G2RPOJobSpec | None, list[str]]:
    """The spec if it can run on a cluster, else every reason why not (`field.path: reason`).

    Beyond the model's own validation (which the CRD schema cannot fully express: cross-field
    rules), a cluster run needs a name that fits its children's names and a checkpoint claim:
    suspend/resume and restarts continue from checkpoints, which must outlive the pods. A linear
    or concave schedule needs its length up front: the controller pod has no dataset to count.
    """
    errors: list[str] = []
    if not re.match(r"^[a-z]", name):
        errors.append("metadata.name: must start with a letter (it names the job's Services)")
    if len(name) > MAX_NAME_LENGTH:
        errors.append(f"metadata.name: at most {MAX_NAME_LENGTH} characters (children add suffixes), got {len(name)}")
    try:
        spec = parse_spec(raw_spec)
    except SpecError as exc:
        return None, errors + exc.lines()
    if not spec.checkpoint.volume_claim:
        errors.append(
            "spec.checkpoint.volumeClaim: required on a cluster (restarts and resume continue from checkpoints "
            "on this PersistentVolumeClaim)"
        )
    if spec.guidance.schedule in ("linear", "concave") and not (spec.guidance.total_steps or spec.training.max_steps):
        errors.append(
            f"spec.guidance.totalSteps: the {spec.guidance.schedule} schedule needs the run's length on a cluster "
            "(set guidance.totalSteps or training.maxSteps): the controller pod computes l_k without the dataset"
        )
    if spec.run_policy.gang_scheduler == "kueue" and not (spec.run_policy.queue or (settings and settings.kueue_queue)):
        errors.append(
            "spec.runPolicy.queue: gangScheduler kueue needs a queue (the Kueue LocalQueue name); the operator "
            "has no default (G2RPO_KUEUE_QUEUE)"
        )
    if spec.run_policy.gang_scheduler == "kueue" and settings and not settings.kueue_enabled:
        errors.append(
            "spec.runPolicy.gangScheduler: kueue needs the operator's Kueue integration, which is off (install "
            "the chart with kueue.enabled=true, G2RPO_KUEUE_ENABLED): it creates and watches the job's Workload"
        )
    try:
        check_batch_layout(spec, spec.trainer.replicas * spec.trainer.gpus_per_replica)
    except SpecError as exc:
        errors += exc.lines()
    directory = spec.checkpoint.dir
    if directory and directory != CHECKPOINT_MOUNT and not directory.startswith(CHECKPOINT_MOUNT + "/"):
        errors.append(
            f"spec.checkpoint.dir: must lie under {CHECKPOINT_MOUNT} (where the claim is mounted), got {directory!r}"
        )
    return (None if errors else spec), errors


def spec_changes(accepted: Any, proposed: Any, path: str = "") -> list[str]:
    """Dotted paths where `proposed` differs from `accepted`.

    Keys missing from `accepted` are not changes: they are fields a newer operator added to the
    model, and their defaults must not count as an edit of a job accepted before.
    """
    if isinstance(accepted, dict) and isinstance(proposed, dict):
        found: list[str] = []
        for key, value in accepted.items():
            found += spec_changes(value, proposed.get(key), f"{path}.{key}" if path else key)
        return found
    return [] if accepted == proposed else [path]


@dataclass(frozen=True)
class Progress:
    """Where the run stands, and what the children must do about it."""

    phase: Phase
    reason: str
    message: str
    active: bool
    """Workloads should run (not suspended, not finished)."""
    delete_trainer: bool
    restarts: int
    disruptions: int
    last_failed_trainer: str | None
    start_time: str | None
    completion_time: str | None

    @property
    def gang_epoch(self) -> int:
        """Gang restarts so far, of either kind: the rollout pod is replaced each time it rises."""
        return self.restarts + self.disruptions


def _true_condition(obj: Manifest | None, type_: str) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def trainer_outcome(job: Manifest | None) -> str | None:
    """'complete' or 'failed' once the Job controller has decided (pods gone), else None."""
    if _true_condition(job, "Complete"):
        return "complete"
    if _true_condition(job, "Failed"):
        return "failed"
    return None


def _terminations(pod: Manifest) -> list[tuple[str, dict]]:
    status = pod.get("status") or {}
    return [
        (container["name"], ended)
        for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        if (ended := (container.get("state") or {}).get("terminated"))
    ]


def failure_detail(job: Manifest, pods: list[Manifest]) -> str:
    """Why a trainer Job failed: its condition, then each failed pod's exit code and reason."""
    cond = _true_condition(job, "Failed") or {}
    parts = [f"{cond.get('reason', 'Failed')}: {cond.get('message', 'the trainer Job failed')}"]
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Failed":
            continue
        status = pod.get("status") or {}
        name = pod["metadata"]["name"]
        if status.get("reason"):
            parts.append(f"pod {name}: {status['reason']}: {status.get('message', '')}".rstrip(": "))
        for container, ended in _terminations(pod):
            if ended.get("exitCode"):
                why = f" ({ended['reason']})" if ended.get("reason") else ""
                parts.append(f"pod {name}: container {container} exited with code {ended['exitCode']}{why}")
    return "; ".join(parts)


def disrupted(pods: list[Manifest]) -> list[str]:
    """Trainer pods the cluster took away (DisruptionTarget: preemption, drain, eviction), with the reason.
    The Job's podFailurePolicy ignores them; the gang restarts without spending the retry budget."""
    found = []
    for pod in pods:
        cond = _true_condition(pod, "DisruptionTarget")
        if cond:
            why = f"{cond.get('reason', 'DisruptionTarget')}: {cond.get('message', '')}".rstrip(": ")
            found.append(f"pod {pod['metadata']['name']}: {why}")
    return found


def invalid_configuration(pods: list[Manifest]) -> bool:
    """A trainer container said its job cannot run (EXIT_INVALID_SPEC): retrying would fail the same way."""
    return any(ended.get("exitCode") == EXIT_INVALID_SPEC for pod in pods for _, ended in _terminations(pod))


def ready_count(job: Manifest | None) -> int:
    """Trainer pods that are ready (Job status.ready); `active` would also count Pending pods."""
    return int(((job or {}).get("status") or {}).get("ready") or 0)


def progress(
    spec: G2RPOJobSpec,
    prev: Manifest,
    job: Manifest | None,
    pods: list[Manifest],
    now: datetime,
    evicted: str | None = None,
) -> Progress:
    """The phase and the trainer's fate, from the previous status, the trainer Job, its pods and the clock
    (and `evicted`, Kueue's message while it evicts the job's Workload).

    Precedence: a finished job stays finished; then the trainer's success; then suspend (which
    wins over a failure, so a suspended job is never restarted); then a configuration error, a
    disruption (a pod's, or Kueue's eviction), a failure; then the deadline. Running needs every
    trainer pod ready.
    """
    base = Progress(
        phase="Pending",
        reason="Starting",
        message="waiting for the trainer pods to become ready",
        active=True,
        delete_trainer=False,
        restarts=int(prev.get("restarts") or 0),
        disruptions=int(prev.get("disruptions") or 0),
        last_failed_trainer=prev.get("lastFailedTrainer"),
        start_time=prev.get("startTime"),
        completion_time=prev.get("completionTime"),
    )
    outcome = trainer_outcome(job)
    unfinished = job is not None and outcome is None
    stamp = timestamp(now)
    if base.completion_time and prev.get("phase") in ("Succeeded", "Failed"):
        reason, message = _previous(prev, FAILED if prev["phase"] == "Failed" else COMPLETE)
        return replace(
            base, phase=prev["phase"], reason=reason, message=message, active=False, delete_trainer=unfinished
        )
    if outcome == "complete":
        return replace(
            base,
            phase="Succeeded",
            reason="TrainerSucceeded",
            message="the trainer finished",
            active=False,
            completion_time=stamp,
        )
    if spec.suspend:
        return replace(
            base,
            phase="Suspended",
            reason="Suspended",
            message="spec.suspend is true: scaled to zero",
            active=False,
            delete_trainer=job is not None,
            start_time=None,
        )
    if job is not None and invalid_configuration(pods):
        return replace(
            base,
            phase="Failed",
            reason="InvalidConfiguration",
            message=f"the trainer cannot run this job (exit code {EXIT_INVALID_SPEC}, not retried): "
            + failure_detail(job, pods),
            active=False,
            delete_trainer=unfinished,
            last_failed_trainer=job["metadata"]["uid"],
            completion_time=stamp,
        )
    disruptions = disrupted(pods) if job is not None else []
    if job is not None and evicted is not None:
        disruptions.append(f"Kueue evicted the gang's Workload: {evicted}")
    if disruptions:
        assert job is not None
        return _gang_restart(base, job["metadata"]["uid"], "; ".join(disruptions), disruption=True, limit=0)
    if outcome == "failed":
        assert job is not None
        detail = failure_detail(job, pods)
        if job["metadata"]["uid"] != base.last_failed_trainer and base.restarts >= spec.run_policy.backoff_limit:
            return replace(
                base,
                phase="Failed",
                reason="TrainerFailed",
                message=f"the trainer failed {base.restarts + 1} times (runPolicy.backoffLimit "
                f"{spec.run_policy.backoff_limit}); last: {detail}",
                active=False,
                last_failed_trainer=job["metadata"]["uid"],
                completion_time=stamp,
            )
        return _gang_restart(
            base, job["metadata"]["uid"], detail, disruption=False, limit=spec.run_policy.backoff_limit
        )
    deadline = spec.run_policy.active_deadline_seconds
    if deadline and base.start_time and now - parse_timestamp(base.start_time) > timedelta(seconds=deadline):
        return replace(
            base,
            phase="Failed",
            reason="DeadlineExceeded",
            message=f"running longer than runPolicy.activeDeadlineSeconds ({deadline} s, counted from "
            f"status.startTime {base.start_time})",
            active=False,
            delete_trainer=unfinished,
            completion_time=stamp,
        )
    if job is not None and not job["metadata"].get("deletionTimestamp") and ready_count(job) >= spec.trainer.replicas:
        started = base.start_time or stamp
        return replace(
            base, phase="Running", reason="TrainerRunning", message="every trainer pod is ready", start_time=started
        )
    if base.last_failed_trainer and job is not None and job["metadata"]["uid"] == base.last_failed_trainer:
        return replace(base, reason="Restarting", message="the failed trainer is being removed", delete_trainer=True)
    return base


def _gang_restart(base: Progress, uid: str, detail: str, disruption: bool, limit: int) -> Progress:
    """Count the trainer Job `uid`'s end once (a restart, or a disruption that is free), then delete it."""
    if uid == base.last_failed_trainer:  # counted on an earlier pass: now remove it, the next pass recreates it
        what = f"disruption {base.disruptions} (not counted)" if disruption else f"restart {base.restarts} of {limit}"
        return replace(base, reason="Restarting", message=f"{what}: {detail}", delete_trainer=True)
    if disruption:
        return replace(
            base,
            reason="Restarting",
            message=f"disruption {base.disruptions + 1} (not counted against runPolicy.backoffLimit): {detail}",
            disruptions=base.disruptions + 1,
            last_failed_trainer=uid,
        )
    return replace(
        base,
        reason="Restarting",
        message=f"restart {base.restarts + 1} of {limit}: {detail}",
        restarts=base.restarts + 1,
        last_failed_trainer=uid,
    )


def _previous(prev: Manifest, type_: str) -> tuple[str, str]:
    for cond in prev.get("conditions") or []:
        if cond.get("type") == type_:
            return cond.get("reason", type_), cond.get("message", "")
    return type_, ""


def deployment_available(obj: Manifest | None, gang_epoch: int | None = None) -> bool:
    """The Deployment's controller has rolled out the current template (and, for the rollout, the current
    gang epoch) and its pod is available: not a pod of an earlier epoch still answering."""
    if obj is None:
        return False
    meta, status = obj["metadata"], obj.get("status") or {}
    if gang_epoch is not None:
        annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
        if annotations.get(GANG_EPOCH_ANNOTATION, "0") != str(gang_epoch):
            return False
    observed = status.get("observedGeneration")
    if observed is None or int(observed) < int(meta.get("generation") or 0):
        return False
    return int(status.get("updatedReplicas") or 0) >= 1 and int(status.get("availableReplicas") or 0) >= 1


IMAGE_PROBLEMS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
START_PROBLEMS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff", "RunContainerError"}
)


def pod_problems(pods: list[Manifest]) -> list[tuple[str, str]]:
    """(reason, message) for each pod that waits on something the user or the cluster must fix: the
    scheduler's Unschedulable (with its message: which resources, taints, affinity), image pulls,
    container start errors. Pods being deleted are skipped (an old attempt going away)."""
    found: list[tuple[str, str]] = []
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        name, status = pod["metadata"]["name"], pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                found.append(
                    (cond.get("reason") or "Unschedulable", f"pod {name}: {cond.get('message', '')}".rstrip(": "))
                )
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

    ClaimNotShared (a multi-node trainer on a claim that does not request ReadWriteMany) blocks the
    job: its pods would hang on the attach. ClaimNotBound is reported but not blocking: claims of
    WaitForFirstConsumer classes bind only once a pod uses them.
    """
    if claim is None:
        return None
    modes = (claim.get("status") or {}).get("accessModes") or (claim.get("spec") or {}).get("accessModes") or []
    phase = (claim.get("status") or {}).get("phase") or "Pending"
    if replicas > 1 and "ReadWriteMany" not in modes:
        return (
            "ClaimNotShared",
            f"PersistentVolumeClaim {name!r} has access modes {modes or 'none'} (phase {phase}); trainer.replicas "
            f"{replicas} pods on different nodes need ReadWriteMany: use a claim of an RWX class (see "
            "spec.checkpoint.storageClassName)",
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
    if facts.storage:
        return False, *facts.storage
    if facts.kueue and facts.kueue.evicted is not None:
        return (
            False,
            "Evicted",
            f"Kueue evicted the gang ({facts.kueue.evicted}): stopping the rollout and the trainer, then the "
            "Workload is queued again and the gang resumes from the newest checkpoint once admitted",
        )
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
            "the trainer Job is created once these are Available: "
            + ", ".join(facts.waiting_for)
            + " (vLLM may take up to spec.rollout.startupTimeoutSeconds to load the model)",
        )
    if facts.trainer_ready:
        return False, "Waiting", f"waiting for the trainer pods to become ready ({facts.trainer_ready} ready)"
    return False, "Waiting", "waiting for the trainer Job"


def _in_phase(p: Progress, phase: str, otherwise: str) -> Verdict:
    return (True, p.reason, p.message) if p.phase == phase else (False, otherwise, "")


def _storage(facts: Facts) -> Verdict:
    claim = facts.spec.checkpoint.volume_claim
    if any("spec.checkpoint.volumeClaim" in m for m in facts.missing):
        return False, "MissingReference", f"PersistentVolumeClaim {claim!r} not found"
    if facts.storage:
        return False, *facts.storage
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


def job_status(facts: Facts, prev: Manifest, now: datetime) -> JobStatus:
    p = facts.progress
    errors, missing = "; ".join(facts.spec_errors), "; ".join(facts.missing)
    verdicts: dict[str, Verdict] = {
        SPEC_VALID: (False, "InvalidSpec", errors) if errors else (True, "Valid", "the spec is valid"),
        SPEC_APPLIED: _spec_applied(facts),
        REFERENCES_RESOLVED: (False, "MissingReference", missing) if missing else (True, "Resolved", "all exist"),
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


def owned_by(obj: Manifest, uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences") or [])


def job_pod_labels(name: str) -> dict[str, str]:
    """Every pod of the job (all components), as its builders label them."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": name}


def checkpoint_claim(ctx: JobContext) -> Manifest:
    """The claim the operator creates from checkpoint.volumeSize: ReadWriteMany (every trainer pod and the
    controller mount it), labelled but not owned by the job (checkpoints outlive it)."""
    checkpoint = ctx.spec.checkpoint
    spec: Manifest = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": checkpoint.volume_size}}}
    storage_class = checkpoint.storage_class_name or ctx.settings.storage_class_name
    if storage_class:
        spec["storageClassName"] = storage_class
    labels = {
        **job_pod_labels(ctx.name),
        "app.kubernetes.io/component": "checkpoints",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": checkpoint.volume_claim, "namespace": ctx.namespace, "labels": labels},
        "spec": spec,
    }


# --- the shell: read, decide, write --------------------------------------------------------------


def _key(res: Resource, name: str) -> tuple[str, str]:
    return (res.kind, name)


class Reconciler:
    """One reconcile pass per call; safe to call again at any time (see the module docstring)."""

    def __init__(
        self,
        api: KubeApi,
        settings: OperatorSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cache: ObjectCache | None = None,
    ):
        self.api = api
        self.settings = settings
        self.clock = clock
        self.cache = cache if cache is not None else ObjectCache()

    def reconcile(self, body: Manifest, fresh: bool = True) -> Manifest | None:
        """Bring the job's children one step closer to its spec; returns the status patch (None: unchanged).
        `fresh` reads everything from the API; otherwise watched kinds come from the cache (cache.py)."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # the garbage collector removes the children through their ownerReferences
        view = View(self.api, self.cache, fresh)
        name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
        prev = body.get("status") or {}
        now = self.clock()
        spec, errors = validate(name, body.get("spec"), self.settings)
        configmap = view.get(CONFIGMAPS, namespace, child_name(name, "config"))
        accepted = self._accepted(name, namespace, configmap)
        if spec is None and accepted is None:
            return status_patch(invalid_status(errors, prev, now, generation), prev)
        ctx, refused = self._effective(name, namespace, spec, accepted)
        observed = self._observe(view, ctx, configmap)
        missing = self._missing_references(view, ctx)
        claim = (
            view.get(PVCS, namespace, ctx.spec.checkpoint.volume_claim) if ctx.spec.checkpoint.volume_claim else None
        )
        storage = claim_problems(claim, ctx.spec.checkpoint.volume_claim or "", ctx.spec.trainer.replicas)
        job = observed.get(_key(JOBS, ctx.child("trainer")))
        pods = view.list(PODS, namespace, job_pod_labels(name))
        trainer_pods = [pod for pod in pods if job is not None and owned_by(pod, job["metadata"]["uid"])]
        workload = observed.get(_key(WORKLOADS, ctx.child("gang")))
        kueue = admission_of(workload, kueue_queue(ctx)) if ctx.spec.run_policy.gang_scheduler == "kueue" else None
        prog = progress(ctx.spec, prev, job, trainer_pods, now, evicted=kueue.evicted if kueue else None)
        waiting_for = self._waiting_for(ctx, observed, prog.gang_epoch)
        token = self._token(observed.get(_key(SECRETS, ctx.token_name)), body["metadata"]["uid"])
        blocked = bool(missing) or (storage is not None and storage[0] == "ClaimNotShared")
        conflicts = self._apply(
            view,
            ctx,
            body,
            observed,
            prog,
            token or secrets.token_urlsafe(32),
            create=not blocked,
            with_trainer=trainer_waits_in_process(ctx) or not waiting_for,
            admitted=self._admitted(view, workload, kueue),
        )
        if kueue and kueue.evicted is not None and workload is not None:
            self._release_when_stopped(view, ctx, observed, workload, now)
        report = self._read_controller(ctx, observed, token)
        facts = Facts(
            progress=prog,
            spec=ctx.spec,
            checkpoint_dir=ctx.checkpoint_dir,
            generation=generation,
            spec_errors=errors,
            refused=refused,
            missing=missing,
            conflicts=conflicts,
            storage=storage,
            problems=pod_problems(pods) if prog.active else [],
            waiting_for=waiting_for if job is None else [],
            trainer_ready=f"{ready_count(job)}/{ctx.spec.trainer.replicas}" if job is not None else "",
            report=report,
            kueue=kueue if prog.active else None,
        )
        return status_patch(job_status(facts, prev, now), prev)

    @staticmethod
    def _admitted(view: View, workload: Manifest | None, kueue: Admission | None) -> dict[str, Placement] | None:
        """What `children` needs of Kueue: the placement per pod set once admitted, else None (no gang)."""
        if kueue is None:
            return {}
        if not kueue.admitted or workload is None:
            return None
        return placements(workload, {name: view.get(RESOURCE_FLAVORS, "", name) for name in assigned_flavors(workload)})

    @staticmethod
    def _release_when_stopped(
        view: View, ctx: JobContext, observed: dict[tuple[str, str], Manifest], workload: Manifest, now: datetime
    ) -> None:
        """Hand an evicted Workload's quota back once neither the trainer Job nor the rollout Deployment
        (deleted in the foreground: their pods go first) is left; Kueue then requeues it."""
        if _key(JOBS, ctx.child("trainer")) in observed or _key(DEPLOYMENTS, ctx.child("rollout")) in observed:
            return
        meta = workload["metadata"]
        view.patch(WORKLOADS, meta["namespace"], meta["name"], release_quota(workload, "evicted", now), "status")

    def _effective(
        self, name: str, namespace: str, spec: G2RPOJobSpec | None, accepted: JobContext | None
    ) -> tuple[JobContext, list[str]]:
        """What runs, and the refused edits: the proposed spec, unless it is invalid or edits a fixed
        field; then the accepted one, as a whole (never half of an edit)."""
        if spec is None:
            assert accepted is not None
            return accepted, []
        proposed = JobContext.resolve(name, namespace, spec, self.settings)
        if accepted is None:
            return proposed, []
        changes = spec_changes(config.spec_document(accepted.spec), config.spec_document(proposed.spec))
        refused = [path for path in changes if path not in MUTABLE_FIELDS]
        return (accepted, refused) if refused else (proposed, [])

    def _read_controller(
        self, ctx: JobContext, observed: dict[tuple[str, str], Manifest], token: str | None
    ) -> ControllerReport | None:
        """The controller's report, asked only once its Deployment is available (no pointless timeouts)."""
        if not token or not deployment_available(observed.get(_key(DEPLOYMENTS, ctx.child("controller")))):
            return None
        url = self.settings.controller_url_template.format(name=ctx.name, namespace=ctx.namespace)
        return read_controller(url, token, self.settings.http_timeout_seconds)

    def _accepted(self, name: str, namespace: str, configmap: Manifest | None) -> JobContext | None:
        document = config.accepted_spec(configmap) if configmap else None
        if document is None:
            return None
        try:
            return JobContext(name, namespace, G2RPOJobSpec.model_validate(document), self.settings)
        except ValidationError:
            log.warning(
                "job %s/%s: its ConfigMap's accepted spec no longer parses; using the current spec", namespace, name
            )
            return None

    def _observe(self, view: View, ctx: JobContext, configmap: Manifest | None) -> dict[tuple[str, str], Manifest]:
        found = {_key(CONFIGMAPS, ctx.config_name): configmap} if configmap else {}
        for manifest in children(ctx, token="", active=True):
            res = resource_of(manifest)
            key = _key(res, manifest["metadata"]["name"])
            if key not in found and res is not CONFIGMAPS:
                obj = view.get(res, ctx.namespace, key[1])
                if obj is not None:
                    found[key] = obj
        return found

    def _missing_references(self, view: View, ctx: JobContext) -> list[str]:
        """Objects the spec names but the job does not own: they must exist before any pod can start.
        A missing claim with checkpoint.volumeSize is created instead (see checkpoint_claim)."""
        checkpoint = ctx.spec.checkpoint
        if (
            checkpoint.volume_claim
            and checkpoint.volume_size
            and view.get(PVCS, ctx.namespace, checkpoint.volume_claim) is None
        ):
            try:
                view.create(checkpoint_claim(ctx))
            except KubeError as exc:
                if exc.status != 409:
                    raise
        wanted = [
            (PVCS, checkpoint.volume_claim, "spec.checkpoint.volumeClaim"),
            (SECRETS, ctx.spec.env_from_secret, "spec.envFromSecret"),
        ]
        return [
            f"{res.kind} {name!r} ({field}) not found in namespace {ctx.namespace!r}; "
            f"retrying every {self.settings.poll_seconds:g} s"
            for res, name, field in wanted
            if name and view.get(res, ctx.namespace, name) is None
        ]

    @staticmethod
    def _token(secret: Manifest | None, uid: str) -> str | None:
        """The controller token from the job's own Secret (never from a same-named foreign one)."""
        if secret is None or not owned_by(secret, uid):
            return None
        encoded = (secret.get("data") or {}).get(TOKEN_KEY)
        return base64.b64decode(encoded).decode() if encoded else None

    @staticmethod
    def _waiting_for(ctx: JobContext, observed: dict[tuple[str, str], Manifest], gang_epoch: int) -> list[str]:
        """The Deployments the trainer must wait for: the controller, and the rollout of this gang epoch."""
        epochs = {"controller": None, "rollout": gang_epoch}
        return [
            f"{component} Deployment {ctx.child(component)}"
            for component, epoch in epochs.items()
            if not deployment_available(observed.get(_key(DEPLOYMENTS, ctx.child(component))), epoch)
        ]

    def _apply(
        self,
        view: View,
        ctx: JobContext,
        owner: Manifest,
        observed: dict[tuple[str, str], Manifest],
        prog: Progress,
        token: str,
        create: bool,
        with_trainer: bool,
        admitted: dict[str, Placement] | None,
    ) -> list[str]:
        """Create what is missing, update what may change, delete the trainer when due (and, under Kueue,
        the gang and the Workload when they may not run); returns conflicts."""
        uid = owner["metadata"]["uid"]
        desired = children(
            ctx, token, prog.active, prog.gang_epoch, with_trainer and not prog.delete_trainer, admitted
        )
        retired = [(JOBS, ctx.child("trainer"))] if prog.delete_trainer else []
        if ctx.spec.run_policy.gang_scheduler == "kueue":
            wanted = {_key(resource_of(m), m["metadata"]["name"]) for m in desired}
            retired += [
                (res, name)
                for res, name in ((DEPLOYMENTS, ctx.child("rollout")), (WORKLOADS, ctx.child("gang")))
                if _key(res, name) not in wanted
            ]
        for res, name in retired:
            current = observed.get(_key(res, name))
            if current is not None and owned_by(current, uid) and not current["metadata"].get("deletionTimestamp"):
                # Foreground: the object disappears only after its pods, so a new attempt never overlaps the old one.
                view.delete(res, ctx.namespace, name, propagation="Foreground")
        conflicts: list[str] = []
        for manifest in desired:
            res = resource_of(manifest)
            name = manifest["metadata"]["name"]
            current = observed.get(_key(res, name))
            if current is None:
                if not create:
                    continue
                current = self._create(view, manifest, owner)
                if current is None:
                    continue
            if not owned_by(current, uid):
                conflicts.append(f"{res.kind} {name}")
            else:
                self._update(view, res, current, manifest)
        return conflicts

    def _create(self, view: View, manifest: Manifest, owner: Manifest) -> Manifest | None:
        """Create; on 409 return what is there (ours from an interrupted pass, or a conflict to report).

        Ownership is kopf.append_owner_reference, not kopf.adopt: adopt also copies the job's labels
        onto its children, and a Kueue queue label on a job would then make Kueue manage them all.
        """
        append_owner_reference(manifest, owner=owner)
        try:
            view.create(manifest)
            return None
        except KubeError as exc:
            if exc.status != 409:
                raise
        meta = manifest["metadata"]
        return View(view.api, view.cache, fresh=True).get(resource_of(manifest), meta["namespace"], meta["name"])

    def _update(self, view: View, res: Resource, current: Manifest, desired: Manifest) -> None:
        """Only what may change on a live child: Deployment scale, the rollout's gang epoch, and the
        ConfigMap's accepted spec.

        Pod templates are otherwise never rewritten: that would restart vLLM or the controller mid-run
        (and a Job's template is immutable); placement fields are therefore not in MUTABLE_FIELDS.
        The gang-epoch annotation is the one deliberate exception: raising it replaces the vLLM pod.
        """
        meta = current["metadata"]
        if res is DEPLOYMENTS:
            patch: Manifest = {}
            if current["spec"].get("replicas") != desired["spec"]["replicas"]:
                patch["replicas"] = desired["spec"]["replicas"]
            wanted = (desired["spec"]["template"]["metadata"].get("annotations") or {}).get(GANG_EPOCH_ANNOTATION)
            have = (current["spec"]["template"]["metadata"].get("annotations") or {}).get(GANG_EPOCH_ANNOTATION)
            if wanted is not None and wanted != have:
                patch["template"] = {"metadata": {"annotations": {GANG_EPOCH_ANNOTATION: wanted}}}
            if patch:
                view.patch(res, meta["namespace"], meta["name"], {"spec": patch})
        elif res is CONFIGMAPS and current.get("data") != desired["data"]:
            view.patch(res, meta["namespace"], meta["name"], {"data": desired["data"]})
