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
- A failed trainer Job is first counted (status.restarts, status.lastFailedTrainer = its uid), and
  deleted on the next pass; so a crash between the two can neither skip nor double-count a restart.
  Within runPolicy.backoffLimit the next pass creates it again and the trainer resumes from the
  newest checkpoint (checkpoint.resume auto); past it the job fails with the pods' exit reasons.
- Suspend deletes the trainer Job and scales the Deployments to zero; resume recreates them. A
  finished job (status.completionTime set) is never restarted; its GPUs are released.
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

from g2rpo.spec import G2RPOJobSpec, SpecError, parse_spec
from kopf import append_owner_reference
from pydantic import ValidationError

from g2rpo_operator.builders import JobContext, children, config
from g2rpo_operator.builders.common import CHECKPOINT_MOUNT, TOKEN_KEY, child_name
from g2rpo_operator.controller_client import ControllerReport, read_controller
from g2rpo_operator.kube import (
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    PODS,
    PVCS,
    SECRETS,
    KubeApi,
    KubeError,
    Manifest,
    Resource,
    resource_of,
)
from g2rpo_operator.settings import OperatorSettings
from g2rpo_operator.status import (
    COMPLETE,
    CONDITION_TYPES,
    FAILED,
    READY,
    REFERENCES_RESOLVED,
    SPEC_APPLIED,
    SPEC_VALID,
    SUSPENDED,
    JobStatus,
    Phase,
    condition,
    parse_timestamp,
    timestamp,
)

log = logging.getLogger(__name__)

MUTABLE_FIELDS = frozenset({"suspend", "runPolicy.backoffLimit", "runPolicy.activeDeadlineSeconds"})
"""Spec fields (camelCase paths under spec) that may change after creation; every other is fixed."""

MAX_NAME_LENGTH = 52
"""63 (a DNS label) minus the longest suffix the job's children and pod hostnames add ("-controller")."""


# --- pure decisions ------------------------------------------------------------------------------


def validate(name: str, raw_spec: Any) -> tuple[G2RPOJobSpec | None, list[str]]:
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
    last_failed_trainer: str | None
    start_time: str | None
    completion_time: str | None


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


def failure_detail(job: Manifest, pods: list[Manifest]) -> str:
    """Why a trainer Job failed: its condition, then each failed pod's exit code and reason."""
    cond = _true_condition(job, "Failed") or {}
    parts = [f"{cond.get('reason', 'Failed')}: {cond.get('message', 'the trainer Job failed')}"]
    for pod in pods:
        status = pod.get("status") or {}
        name = pod["metadata"]["name"]
        if status.get("reason"):
            parts.append(f"pod {name}: {status['reason']}: {status.get('message', '')}".rstrip(": "))
        for container in status.get("containerStatuses") or []:
            ended = (container.get("state") or {}).get("terminated")
            if ended and ended.get("exitCode"):
                why = f" ({ended['reason']})" if ended.get("reason") else ""
                parts.append(f"pod {name}: container {container['name']} exited with code {ended['exitCode']}{why}")
    return "; ".join(parts)


def progress(spec: G2RPOJobSpec, prev: Manifest, job: Manifest | None, detail: str, now: datetime) -> Progress:
    """The phase and the trainer's fate, from the previous status, the trainer Job and the clock.

    Precedence: a finished job stays finished; then the trainer's success; then suspend (which
    wins over a failure, so a suspended job is never restarted); then a failure; then the deadline.
    """
    base = Progress(
        phase="Pending",
        reason="Starting",
        message="waiting for the trainer pods to start",
        active=True,
        delete_trainer=False,
        restarts=int(prev.get("restarts") or 0),
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
    if outcome == "failed":
        assert job is not None
        return _after_failure(spec, base, job["metadata"]["uid"], detail, stamp)
    deadline = spec.run_policy.active_deadline_seconds
    if deadline and base.start_time and now - parse_timestamp(base.start_time) > timedelta(seconds=deadline):
        return replace(
            base,
            phase="Failed",
            reason="DeadlineExceeded",
            message=f"running longer than runPolicy.activeDeadlineSeconds ({deadline} s)",
            active=False,
            delete_trainer=unfinished,
            completion_time=stamp,
        )
    if job is not None and int((job.get("status") or {}).get("active") or 0) > 0:
        started = base.start_time or stamp
        return replace(
            base, phase="Running", reason="TrainerRunning", message="the trainer is running", start_time=started
        )
    return replace(base, phase="Running" if base.start_time else "Pending")


def _after_failure(spec: G2RPOJobSpec, base: Progress, uid: str, detail: str, stamp: str) -> Progress:
    limit = spec.run_policy.backoff_limit
    if uid == base.last_failed_trainer:  # counted on an earlier pass: now remove it, the next pass recreates it
        message = f"restart {base.restarts} of {limit}: {detail}"
        return replace(base, phase="Running", reason="Restarting", message=message, delete_trainer=True)
    if base.restarts >= limit:
        return replace(
            base,
            phase="Failed",
            reason="TrainerFailed",
            message=f"the trainer failed {base.restarts + 1} times (runPolicy.backoffLimit {limit}); last: {detail}",
            active=False,
            last_failed_trainer=uid,
            completion_time=stamp,
        )
    return replace(
        base,
        phase="Running",
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


def deployment_available(obj: Manifest | None) -> bool:
    return int(((obj or {}).get("status") or {}).get("availableReplicas") or 0) >= 1


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
    waiting: list[str]
    report: ControllerReport | None


Verdict = tuple[bool, str, str]
"""A condition's (status, reason, message)."""


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
    p = facts.progress
    if p.phase in ("Succeeded", "Failed", "Suspended") or p.reason == "Restarting":
        return False, p.reason, p.message
    if facts.missing:
        return False, "MissingReference", "; ".join(facts.missing)
    if facts.conflicts:
        owned = "; ".join(f"{c} exists and is not owned by this job (delete or rename it)" for c in facts.conflicts)
        return False, "ChildConflict", owned
    if facts.waiting:
        return False, "Waiting", "waiting for: " + ", ".join(facts.waiting)
    return True, "Running", "the controller, the rollout server and the trainer are up"


def _in_phase(p: Progress, phase: str, otherwise: str) -> Verdict:
    return (True, p.reason, p.message) if p.phase == phase else (False, otherwise, "")


def job_status(facts: Facts, prev: Manifest, now: datetime) -> JobStatus:
    p = facts.progress
    errors, missing = "; ".join(facts.spec_errors), "; ".join(facts.missing)
    verdicts: dict[str, Verdict] = {
        SPEC_VALID: (False, "InvalidSpec", errors) if errors else (True, "Valid", "the spec is valid"),
        SPEC_APPLIED: _spec_applied(facts),
        REFERENCES_RESOLVED: (False, "MissingReference", missing) if missing else (True, "Resolved", "all exist"),
        READY: _ready(facts),
        SUSPENDED: _in_phase(p, "Suspended", "NotSuspended"),
        COMPLETE: _in_phase(p, "Succeeded", "NotComplete"),
        FAILED: _in_phase(p, "Failed", "NotFailed"),
    }
    old = prev.get("conditions") or []
    conditions = [condition(t, *verdicts[t], old, now, facts.generation) for t in CONDITION_TYPES]
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
    ):
        self.api = api
        self.settings = settings
        self.clock = clock

    def reconcile(self, body: Manifest) -> Manifest | None:
        """Bring the job's children one step closer to its spec; returns the status patch (None: unchanged)."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # the garbage collector removes the children through their ownerReferences
        name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
        prev = body.get("status") or {}
        now = self.clock()
        spec, errors = validate(name, body.get("spec"))
        configmap = self.api.get(CONFIGMAPS, namespace, child_name(name, "config"))
        accepted = self._accepted(name, namespace, configmap)
        if spec is None and accepted is None:
            return status_patch(invalid_status(errors, prev, now, generation), prev)
        ctx, refused = self._effective(name, namespace, spec, accepted)
        observed = self._observe(ctx, configmap)
        missing = self._missing_references(ctx)
        job = observed.get(_key(JOBS, ctx.child("trainer")))
        detail = failure_detail(job, self._trainer_pods(ctx, job)) if trainer_outcome(job) == "failed" else ""
        prog = progress(ctx.spec, prev, job, detail, now)
        token = self._token(observed.get(_key(SECRETS, ctx.token_name)), body["metadata"]["uid"])
        conflicts = self._apply(ctx, body, observed, prog, token or secrets.token_urlsafe(32), create=not missing)
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
            waiting=self._waiting(ctx, observed, job) if prog.active else [],
            report=report,
        )
        return status_patch(job_status(facts, prev, now), prev)

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

    def _observe(self, ctx: JobContext, configmap: Manifest | None) -> dict[tuple[str, str], Manifest]:
        found = {_key(CONFIGMAPS, ctx.config_name): configmap} if configmap else {}
        for manifest in children(ctx, token="", active=True):
            res = resource_of(manifest)
            key = _key(res, manifest["metadata"]["name"])
            if key not in found and res is not CONFIGMAPS:
                obj = self.api.get(res, ctx.namespace, key[1])
                if obj is not None:
                    found[key] = obj
        return found

    def _missing_references(self, ctx: JobContext) -> list[str]:
        """Objects the spec names but the job does not own: they must exist before any pod can start."""
        wanted = [
            (PVCS, ctx.spec.checkpoint.volume_claim, "spec.checkpoint.volumeClaim"),
            (SECRETS, ctx.spec.env_from_secret, "spec.envFromSecret"),
        ]
        return [
            f"{res.kind} {name!r} ({field}) not found in namespace {ctx.namespace!r}; "
            f"retrying every {self.settings.resync_seconds:g} s"
            for res, name, field in wanted
            if name and self.api.get(res, ctx.namespace, name) is None
        ]

    def _trainer_pods(self, ctx: JobContext, job: Manifest | None) -> list[Manifest]:
        if job is None:
            return []
        labels = {"app.kubernetes.io/instance": ctx.name, "app.kubernetes.io/component": "trainer"}
        pods = self.api.list(PODS, ctx.namespace, labels)
        uid = job["metadata"]["uid"]
        return [pod for pod in pods if owned_by(pod, uid) and (pod.get("status") or {}).get("phase") == "Failed"]

    @staticmethod
    def _token(secret: Manifest | None, uid: str) -> str | None:
        """The controller token from the job's own Secret (never from a same-named foreign one)."""
        if secret is None or not owned_by(secret, uid):
            return None
        encoded = (secret.get("data") or {}).get(TOKEN_KEY)
        return base64.b64decode(encoded).decode() if encoded else None

    @staticmethod
    def _waiting(ctx: JobContext, observed: dict[tuple[str, str], Manifest], job: Manifest | None) -> list[str]:
        waiting = [
            f"{component} Deployment {ctx.child(component)}"
            for component in ("controller", "rollout")
            if not deployment_available(observed.get(_key(DEPLOYMENTS, ctx.child(component))))
        ]
        if job is None or int((job.get("status") or {}).get("active") or 0) < ctx.spec.trainer.replicas:
            waiting.append(f"trainer pods of Job {ctx.child('trainer')}")
        return waiting

    def _apply(
        self,
        ctx: JobContext,
        owner: Manifest,
        observed: dict[tuple[str, str], Manifest],
        prog: Progress,
        token: str,
        create: bool,
    ) -> list[str]:
        """Create what is missing, scale what exists, delete the trainer when due; returns conflicts."""
        uid = owner["metadata"]["uid"]
        job = observed.get(_key(JOBS, ctx.child("trainer")))
        if prog.delete_trainer and job is not None and not job["metadata"].get("deletionTimestamp"):
            # Foreground: the Job disappears only after its pods, so a new attempt never overlaps the old one.
            self.api.delete(JOBS, ctx.namespace, job["metadata"]["name"], propagation="Foreground")
        conflicts: list[str] = []
        for manifest in children(ctx, token, prog.active):
            res = resource_of(manifest)
            name = manifest["metadata"]["name"]
            current = observed.get(_key(res, name))
            if current is None:
                if not create:
                    continue
                current = self._create(manifest, owner)
                if current is None:
                    continue
            if not owned_by(current, uid):
                conflicts.append(f"{res.kind} {name}")
            else:
                self._update(res, current, manifest)
        return conflicts

    def _create(self, manifest: Manifest, owner: Manifest) -> Manifest | None:
        """Create; on 409 return what is there (ours from an interrupted pass, or a conflict to report).

        Ownership is kopf.append_owner_reference, not kopf.adopt: adopt also copies the job's labels
        onto its children, and a Kueue queue label on a job would then make Kueue manage them all.
        """
        append_owner_reference(manifest, owner=owner)
        try:
            self.api.create(manifest)
            return None
        except KubeError as exc:
            if exc.status != 409:
                raise
        meta = manifest["metadata"]
        return self.api.get(resource_of(manifest), meta["namespace"], meta["name"])

    def _update(self, res: Resource, current: Manifest, desired: Manifest) -> None:
        """Only what may change on a live child: Deployment scale and the ConfigMap's accepted spec.

        Pod templates are never rewritten: that would restart vLLM or the controller mid-run (and a
        Job's template is immutable); placement fields are therefore not in MUTABLE_FIELDS.
        """
        meta = current["metadata"]
        if res is DEPLOYMENTS and current["spec"].get("replicas") != desired["spec"]["replicas"]:
            self.api.patch(res, meta["namespace"], meta["name"], {"spec": {"replicas": desired["spec"]["replicas"]}})
        elif res is CONFIGMAPS and current.get("data") != desired["data"]:
            self.api.patch(res, meta["namespace"], meta["name"], {"data": desired["data"]})
