"""Kueue's side of the GPU gang: what a job's Workload says, and the one status write Kueue expects back.

With runPolicy.gangScheduler kueue the operator is the job's Kueue integration (a G2RPOJob is what
Kueue calls an external framework, as an AppWrapper or a JobSet is): it creates one Workload with
two pod sets (the rollout pod and the trainer pods, see builders/gang.py), so Kueue reserves quota
for the whole gang or for none of it. Until the Workload is admitted neither the rollout Deployment
nor the trainer Job exists; once it is, both are created with the placement Kueue granted (the
assigned ResourceFlavors' node labels and tolerations, and any admission check's pod-set updates).

When Kueue evicts the Workload (preemption, an inactive Workload, a pods-ready timeout) it waits
for the integration to stop the job: the operator deletes the trainer Job (a disruption, which
does not spend runPolicy.backoffLimit) and the rollout Deployment, and once both are gone hands
the quota back (`release_quota`) with the conditions Kueue's own jobframework writes then
(pkg/controller/jobframework/reconciler.go, "handle eviction"): QuotaReserved and Admitted False, and
Requeued, True only for a preemption or a node failure; otherwise Kueue's workload controller sets
it True itself after its requeuing backoff (PodsReadyTimeout, AdmissionCheck) or on reactivation
(pkg/controller/core/workload_controller.go), and the Workload waits until then. The gang restarts
from the newest checkpoint when it is admitted again. The operator also keeps the Workload's
PodsReady condition (`pods_ready`, with the reasons of jobframework's generatePodsReadyCondition),
which Kueue's waitForPodsReady reads: on by default from Kueue 0.19 (config v1beta2, timeout 30
minutes; with config v1beta1 off by default, 5 minutes when on). The whole gang must be ready within
that timeout, so the trainer Job is created with the rollout, not after it (builders/gang.py).

Kueue also manages plain batch/v1 Jobs: its webhook labels a Job without a queue with the namespace's
LocalQueue `default` when one exists (LocalQueueDefaulting: beta and on by default from 0.12, always on
from 0.19; pkg/controller/jobframework/defaults.go) and suspends it, and `manageJobsWithoutQueueName`
suspends every Job. The trainer Job would then be queued a second time, by itself. Kueue leaves alone
a Job whose controller owner is a kind it manages, registered external frameworks included
(IntegrationManager.IsOwnerManagedByKueueForObject, FindAncestorJobManagedByKueue): the trainer Job's
controller ownerReference names its G2RPOJob, so registering `G2RPOJob.v1alpha1.g2rpo.dev` in
Kueue's `integrations.externalFrameworks` prevents it. `queued_by_kueue` detects it when it happens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from g2rpo.api.status import timestamp
from g2rpo_operator.builders.common import Manifest
from g2rpo_operator.kube import KUEUE_GROUP, KubeApi, workloads
from g2rpo_operator.settings import KUEUE_VERSIONS

QUOTA_RESERVED = "QuotaReserved"
ADMITTED = "Admitted"
EVICTED = "Evicted"
PODS_READY = "PodsReady"
REQUEUED = "Requeued"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DEFAULT_LOCAL_QUEUE = "default"
EXTERNAL_FRAMEWORK = "G2RPOJob.v1alpha1.g2rpo.dev"
"""How Kueue's configuration names G2RPOJobs in integrations.externalFrameworks (Kind.version.group)."""
REQUEUED_AT_ONCE = frozenset({"Preempted", "NodeFailures"})
"""Eviction reasons after which jobframework sets Requeued=True itself; after the others Kueue's workload
controller does, once its backoff ends (a Requeued=False Workload is not queued: cluster_queue.go)."""
PODS_READY_TIMEOUT = "PodsReadyTimeout"


def _condition(workload: Manifest, type_: str) -> dict[str, Any] | None:
    return next((c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _is_true(workload: Manifest, type_: str) -> bool:
    cond = _condition(workload, type_)
    return cond is not None and cond.get("status") == "True"


@dataclass(frozen=True)
class Placement:
    """What Kueue's admission adds to one pod set's pod template."""

    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    """Where a job's Workload stands. At most one of `admitted` and `evicted` holds."""

    admitted: bool
    evicted: str | None
    """Kueue's message while it waits for the gang to stop (quota still reserved); None otherwise."""
    waiting: str
    """Why the gang is not admitted (Kueue's own message where it gave one)."""
    eviction_reason: str = ""
    """The Evicted condition's reason while evicted (Preempted, PodsReadyTimeout, InactiveWorkload, ...)."""


def admission_of(workload: Manifest | None, queue: str) -> Admission:
    """The Workload's state: admitted (quota reserved, admission checks passed), being evicted, or queued."""
    if workload is None:
        return Admission(False, None, "creating its Kueue Workload")
    reserved = bool((workload.get("status") or {}).get("admission")) and _is_true(workload, QUOTA_RESERVED)
    name = workload["metadata"]["name"]
    if reserved and _is_true(workload, EVICTED):
        evicted = _condition(workload, EVICTED) or {}
        return Admission(False, evicted.get("message") or "evicted", "", evicted.get("reason") or "")
    if reserved and _is_true(workload, ADMITTED):
        return Admission(True, None, "")
    why = (_condition(workload, ADMITTED if reserved else QUOTA_RESERVED) or {}).get("message")
    state = "quota reserved, waiting for its admission checks" if reserved else f"queued in LocalQueue {queue!r}"
    return Admission(False, None, f"Kueue Workload {name} is {state}" + (f": {why}" if why else ""))


def assigned_flavors(workload: Manifest) -> set[str]:
    """The ResourceFlavors the admission assigned, to read their node labels and tolerations."""
    assignments = ((workload.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []
    return {name for assignment in assignments for name in (assignment.get("flavors") or {}).values()}


def placements(workload: Manifest, flavors: Mapping[str, Manifest | None]) -> dict[str, Placement]:
    """Per pod set, the placement the admission grants: its flavors' nodeLabels and tolerations, then
    the pod-set updates of its admission checks (as Kueue's built-in integrations apply them)."""
    status = workload.get("status") or {}
    found: dict[str, Placement] = {}
    for assignment in (status.get("admission") or {}).get("podSetAssignments") or []:
        placement = found.setdefault(assignment["name"], Placement())
        for flavor_name in sorted(set((assignment.get("flavors") or {}).values())):
            flavor_spec = (flavors.get(flavor_name) or {}).get("spec") or {}
            placement.node_selector.update(flavor_spec.get("nodeLabels") or {})
            _add_tolerations(placement, flavor_spec.get("tolerations") or [])
    for check in status.get("admissionChecks") or []:
        for update in check.get("podSetUpdates") or []:
            placement = found.setdefault(update["name"], Placement())
            placement.node_selector.update(update.get("nodeSelector") or {})
            placement.labels.update(update.get("labels") or {})
            placement.annotations.update(update.get("annotations") or {})
            _add_tolerations(placement, update.get("tolerations") or [])
    return found


def _add_tolerations(placement: Placement, tolerations: list[dict[str, Any]]) -> None:
    placement.tolerations.extend(t for t in tolerations if t not in placement.tolerations)


def release_quota(workload: Manifest, reason: str, now: datetime) -> Manifest:
    """The status patch that hands an evicted Workload's quota back once the gang has stopped, as Kueue's
    jobframework writes it (reconciler.go, "handle eviction"): no admission, QuotaReserved False (reason
    Pending, the fallback of PendingEvaluation, which only Kueue 0.19's UnadmittedWorkloadsObservability
    gate uses), Admitted False (NoReservation), and Requeued with the eviction's reason: True after a
    preemption or a node failure, else False so that Kueue's own backoff or reactivation requeues it."""
    evicted = _condition(workload, EVICTED) or {}
    message = evicted.get("message") or reason
    why_evicted = evicted.get("reason") or reason
    stamp = timestamp(now)
    conditions = []
    for cond in (workload.get("status") or {}).get("conditions") or []:
        if cond.get("type") == REQUEUED:
            continue
        if cond.get("type") in (QUOTA_RESERVED, ADMITTED) and cond.get("status") == "True":
            why = "Pending" if cond["type"] == QUOTA_RESERVED else "NoReservation"
            cond = {**cond, "status": "False", "reason": why, "message": message, "lastTransitionTime": stamp}
        conditions.append(cond)
    requeued = {
        "type": REQUEUED,
        "status": "True" if why_evicted in REQUEUED_AT_ONCE else "False",
        "reason": why_evicted,
        "message": message,
        "lastTransitionTime": stamp,
    }
    return {"status": {"admission": None, "conditions": [*conditions, requeued]}}


def pods_ready_reason(current: Manifest | None, ready: bool) -> str:
    """PodsReady's reason as Kueue's jobframework derives it for an admitted Workload (reconciler.go,
    generatePodsReadyCondition): Started, or Recovered after a recovery; while not ready WaitForStart,
    or WaitForRecovery once the gang had been ready (Kueue's waitForPodsReady.recoveryTimeout then counts)."""
    reason = (current or {}).get("reason")
    if ready:
        return "Recovered" if reason in ("WaitForRecovery", "Recovered") else "Started"
    if current is not None and (current.get("status") == "True" or reason == "WaitForRecovery"):
        return "WaitForRecovery"
    return "WaitForStart"


PODS_READY_MESSAGES = {
    "Started": "All pods reached readiness and the workload is running",
    "Recovered": "All pods reached readiness and the workload is running",
    "WaitForStart": "Not all pods are ready or succeeded",
    "WaitForRecovery": "At least one pod has failed, waiting for recovery",
}
"""Kueue's own messages for each reason (generatePodsReadyCondition)."""


def pods_ready(workload: Manifest, ready: bool, now: datetime) -> Manifest | None:
    """The status patch that sets PodsReady (the rollout and every trainer pod ready: the job Running), or
    None when the condition already says so."""
    status = "True" if ready else "False"
    current = _condition(workload, PODS_READY)
    reason = pods_ready_reason(current, ready)
    if current is not None and current.get("status") == status and current.get("reason") == reason:
        return None
    since = current.get("lastTransitionTime") if current and current.get("status") == status else None
    new = {
        "type": PODS_READY,
        "status": status,
        "reason": reason,
        "message": PODS_READY_MESSAGES[reason],
        "lastTransitionTime": since or timestamp(now),
    }
    others = [c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") != PODS_READY]
    return {"status": {"conditions": [*others, new]}}


def queued_by_kueue(children: list[Manifest], namespace: str) -> str | None:
    """Which of the job's own children Kueue took over as a job of its own (queue label set by its webhook,
    or a trainer Job suspended: the operator never suspends one), and the fix; None when none was."""
    found = []
    for child in children:
        meta = child["metadata"]
        queue = (meta.get("labels") or {}).get(QUEUE_LABEL)
        suspended = child.get("kind") == "Job" and (child.get("spec") or {}).get("suspend") is True
        if queue is not None:
            found.append(f"{child['kind']} {meta['name']} has label {QUEUE_LABEL}={queue}")
        elif suspended:
            found.append(f"Job {meta['name']} was suspended by Kueue (no queue label: manageJobsWithoutQueueName)")
    if not found:
        return None
    why = (
        f"Kueue's default LocalQueue (namespace {namespace!r} has a LocalQueue named {DEFAULT_LOCAL_QUEUE!r})"
        if any(f"{QUEUE_LABEL}={DEFAULT_LOCAL_QUEUE}" in item for item in found)
        else "Kueue's batch/Job integration"
    )
    return (
        f"{'; '.join(found)}: {why} queues it a second time, outside the job's gang, and it waits there. "
        f"Fix: add {EXTERNAL_FRAMEWORK!r} to integrations.externalFrameworks in Kueue's configuration (Kueue "
        "then leaves a G2RPOJob's children alone), and with manageJobsWithoutQueueName use "
        "spec.runPolicy.gangScheduler: kueue; then delete the child named here (the operator recreates it)"
    )


def served_version(api: KubeApi) -> str:
    """The newest Kueue API version whose Workloads the API server serves. kopf looks the kinds it
    watches up once, at startup, so an operator started before Kueue would never see a Workload change:
    without Kueue it exits instead, and its pod restarts (with back-off) until Kueue is installed."""
    for version in KUEUE_VERSIONS:
        if api.serves(workloads(version)):
            return version
    raise SystemExit(
        "the Kueue integration is on (G2RPO_KUEUE_ENABLED, chart value kueue.enabled) but the API server "
        f"serves no Kueue Workloads ({', '.join(f'{KUEUE_GROUP}/{v}' for v in KUEUE_VERSIONS)}): install Kueue "
        "(the operator restarts until it is served), or turn the integration off"
    )
