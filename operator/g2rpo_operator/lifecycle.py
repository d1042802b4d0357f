"""The job's life cycle: from the previous status, the trainer Job, its pods and the clock to the phase,
and what the gang must do about it (run, wait, stop, restart).

Rules worth knowing:
- A failed trainer Job is first counted (status.restarts, status.lastFailedTrainer = its uid), and
  deleted on the next pass; so a crash between the two can neither skip nor double-count a restart.
  Counting raises the gang epoch (restarts + disruptions), an annotation of the rollout's pod
  template: the Deployment replaces the vLLM pod, which drops its NCCL weight-sync group with the
  dead rank 0, and the next trainer Job waits until the new rollout is Available. Within
  runPolicy.backoffLimit the trainer resumes from the newest checkpoint (checkpoint.resume auto);
  past it the job fails with the pods' exit reasons.
- A trainer pod disrupted by the cluster (condition DisruptionTarget: preemption, drain, eviction)
  restarts the gang the same way but counts in status.disruptions, not against backoffLimit. A
  problem no retry fixes fails the job at once, with its own reason (FAILURE_REASONS): a trainer or
  rollout container that exits with one of those codes (InvalidConfiguration, DriverTooOld,
  CheckpointsNotWritable), or whose termination message starts with the reason (a rank under
  `accelerate launch` exits 1 whatever it returned: CheckpointsFull). Storage reasons name the claim.
- Phase Running means every trainer pod is ready (Job status.ready), not merely created, and the rollout
  is Available (it may still be loading where the trainer is created with it, under volcano or kueue): until then
  the phase is Pending and Ready says why (claim not Bound, Unschedulable with the scheduler's
  message, image pull errors, waiting for the rollout). status.startTime is the first time every
  rank was ready; runPolicy.activeDeadlineSeconds counts from it (the Job's own deadline would count
  queueing and image pulls, so the operator enforces it and leaves the Job's unset).
- A Running job whose step does not advance for runPolicy.stallTimeoutSeconds (counted from the last
  step the operator saw, or from when the current trainer's pods became ready, status.runningSince) has
  hung (a weight-sync or NCCL wait that never raises): the gang restarts from the newest checkpoint as
  after a failure, counted against backoffLimit, and `stalled` says which step was the last and when.
- Suspend deletes the trainer Job and scales the Deployments to zero; resume recreates them. A
  finished job (status.completionTime set) is never restarted; its GPUs are released.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from g2rpo.api.spec import EXIT_INVALID_SPEC, FAILURE_REASONS, G2RPOJobSpec
from g2rpo.api.status import COMPLETE, FAILED, Phase, parse_timestamp, timestamp
from g2rpo_operator.builders.common import GANG_EPOCH_ANNOTATION, Manifest


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
    running_since: str | None = None
    """When every pod of the current trainer Job was ready (None unless Running): the stall clock's start."""
    last_step_time: str | None = None
    """When the operator first saw the current step (status.step): the stall clock's restart."""
    stalled: str | None = None
    """Why the job counts as stalled on this pass (the last step and when it completed); None otherwise."""

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


CLAIM_FIXES = {
    "CheckpointsNotWritable": "its volume must be writable by uid 1000 or gid 1000, which the pods run as: its "
    "driver did not apply the pods' fsGroup (NFS, Filestore, EFS: chown the export's root to 1000:1000, or an EFS "
    "access point with uid/gid 1000; README: Checkpoint storage)",
    "CheckpointsFull": "give it room (expand it if its StorageClass allows volume expansion, or use a bigger claim) "
    "or keep fewer checkpoints (checkpoint.keep)",
}
"""What the checkpoint claim needs, per storage reason."""


def fatal_failure(pods: list[Manifest]) -> tuple[str, str] | None:
    """(reason, detail) of the first container that said no retry can help, or None.

    Read from the current and the last termination (a Deployment's crash-looping init container keeps its
    exit in lastState): an exit code of FAILURE_REASONS, or a termination message `<reason>: <line>`."""
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            for ended in (
                (container.get("state") or {}).get("terminated"),
                (container.get("lastState") or {}).get("terminated"),
            ):
                if not ended:
                    continue
                message = (ended.get("message") or "").strip()
                said, _, line = message.partition(": ")
                reason = FAILURE_REASONS.get(ended.get("exitCode") or 0) or (
                    said if said in FAILURE_REASONS.values() else None
                )
                if reason:
                    where = f"pod {pod['metadata']['name']}, container {container['name']}, exit code {ended.get('exitCode')}"
                    return reason, f"{line if said == reason else message or 'no message'} ({where})"
    return None


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
    step: int | None = None,
    rollout_ready: bool = True,
    rollout_pods: Sequence[Manifest] = (),
) -> Progress:
    """The phase and the trainer's fate, from the previous status, the trainer Job, its pods and the clock
    (and `evicted`, Kueue's message while it evicts the job's Workload; `step`, the steps completed as the
    guidance controller reports them, None when it did not answer; `rollout_ready`, whether the rollout of
    the current gang epoch is Available: where the trainer waits for it in process, Running needs it too;
    `rollout_pods`, whose driver check can fail the job).

    Precedence: a finished job stays finished; then the trainer's success; then suspend (which
    wins over a failure, so a suspended job is never restarted); then a configuration error, a
    disruption (a pod's, or Kueue's eviction), a failure; then the deadline. Running needs every
    trainer pod ready, and a step within runPolicy.stallTimeoutSeconds.
    """
    stepped = step is not None and step != prev.get("step")
    last_step_time = timestamp(now) if stepped else prev.get("lastStepTime")
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
        last_step_time=last_step_time,
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
    fatal = (fatal_failure(pods) if job is not None else None) or fatal_failure(list(rollout_pods))
    if fatal:
        return replace(
            base,
            phase="Failed",
            reason=fatal[0],
            message=_fatal_message(spec, fatal, job, pods),
            active=False,
            delete_trainer=unfinished,
            last_failed_trainer=job["metadata"]["uid"] if job is not None else base.last_failed_trainer,
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
    if base.last_failed_trainer and job is not None and job["metadata"]["uid"] == base.last_failed_trainer:
        # Counted already (a failure, a disruption or a stall): never Running again, only removed.
        return replace(base, reason="Restarting", message="the failed trainer is being removed", delete_trainer=True)
    gang_ready = rollout_ready and ready_count(job) >= spec.trainer.replicas
    if job is not None and not job["metadata"].get("deletionTimestamp") and gang_ready:
        running_since = prev.get("runningSince") if prev.get("phase") == "Running" else None
        running = replace(
            base,
            phase="Running",
            reason="TrainerRunning",
            message="every trainer pod is ready",
            start_time=base.start_time or stamp,
            running_since=running_since or stamp,
        )
        stalled = stall(spec, running, prev.get("step"), now)
        if stalled is None:
            return running
        uid = job["metadata"]["uid"]
        if base.restarts >= spec.run_policy.backoff_limit:
            return replace(
                base,
                phase="Failed",
                reason="Stalled",
                message=f"{stalled}; the trainer failed or stalled {base.restarts + 1} times "
                f"(runPolicy.backoffLimit {spec.run_policy.backoff_limit})",
                active=False,
                delete_trainer=True,
                last_failed_trainer=uid,
                completion_time=stamp,
                stalled=stalled,
            )
        restart = _gang_restart(base, uid, stalled, disruption=False, limit=spec.run_policy.backoff_limit)
        return replace(restart, stalled=stalled)
    return base


def stall(spec: G2RPOJobSpec, running: Progress, step: int | None, now: datetime) -> str | None:
    """Why a Running job counts as hung, or None: no step within runPolicy.stallTimeoutSeconds, counted from
    the later of the last step the operator saw and the current trainer's pods becoming ready."""
    timeout = spec.run_policy.stall_timeout_seconds
    if not timeout or running.running_since is None:
        return None
    marks = [parse_timestamp(running.running_since)]
    if running.last_step_time:
        marks.append(parse_timestamp(running.last_step_time))
    if now - max(marks) <= timedelta(seconds=timeout):
        return None
    if running.last_step_time and parse_timestamp(running.last_step_time) >= marks[0]:
        last = f"the last, step {step}, completed at {running.last_step_time}"
    else:
        done = f"step {step} completed before it" if step else "no step completed yet"
        last = f"none since the trainer pods became ready at {running.running_since} ({done})"
    return (
        f"no step completed within runPolicy.stallTimeoutSeconds ({timeout} s): {last}; a weight-sync or NCCL "
        "wait that never returned is the usual cause (the trainer's log shows where it stopped)"
    )


def _fatal_message(spec: G2RPOJobSpec, fatal: tuple[str, str], job: Manifest | None, pods: list[Manifest]) -> str:
    reason, detail = fatal
    if reason == "InvalidConfiguration" and job is not None:
        return f"the trainer cannot run this job (exit code {EXIT_INVALID_SPEC}, not retried): " + failure_detail(
            job, pods
        )
    message = f"{detail}; not retried: another attempt would fail the same way"
    claim = spec.checkpoint.volume_claim
    if reason in CLAIM_FIXES and claim:
        message += f"; checkpoint claim {claim!r}: {CLAIM_FIXES[reason]}"
    return message


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
