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
the quota back (`release_quota`), as Kueue's own integrations do. Kueue then requeues the Workload;
the gang restarts from the newest checkpoint when it is admitted again. The operator also keeps the
Workload's PodsReady condition (`pods_ready`), which Kueue's waitForPodsReady reads: without it,
a cluster with that setting would evict every job at its timeout.
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


def admission_of(workload: Manifest | None, queue: str) -> Admission:
    """The Workload's state: admitted (quota reserved, admission checks passed), being evicted, or queued."""
    if workload is None:
        return Admission(False, None, "creating its Kueue Workload")
    reserved = bool((workload.get("status") or {}).get("admission")) and _is_true(workload, QUOTA_RESERVED)
    name = workload["metadata"]["name"]
    if reserved and _is_true(workload, EVICTED):
        message = (_condition(workload, EVICTED) or {}).get("message") or "evicted"
        return Admission(False, message, "")
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
    """The status patch that hands an evicted Workload's quota back once the gang has stopped: no admission,
    QuotaReserved False (Admitted too), so Kueue requeues it. Kueue leaves this write to the integration."""
    message = (_condition(workload, EVICTED) or {}).get("message") or reason
    stamp = timestamp(now)
    conditions = []
    for cond in (workload.get("status") or {}).get("conditions") or []:
        if cond.get("type") in (QUOTA_RESERVED, ADMITTED) and cond.get("status") == "True":
            why = "Pending" if cond["type"] == QUOTA_RESERVED else "NoReservation"
            cond = {**cond, "status": "False", "reason": why, "message": message, "lastTransitionTime": stamp}
        conditions.append(cond)
    return {"status": {"admission": None, "conditions": conditions}}


def pods_ready(workload: Manifest, ready: bool, now: datetime) -> Manifest | None:
    """The status patch that sets PodsReady (every pod of the gang ready: the job Running), or None when
    the condition already says so."""
    status = "True" if ready else "False"
    current = _condition(workload, PODS_READY)
    if current is not None and current.get("status") == status:
        return None
    reason, message = (
        ("PodsReady", "the rollout and every trainer pod are ready")
        if ready
        else (
            "WaitingForPods",
            "waiting for the rollout and the trainer pods to become ready",
        )
    )
    new = {
        "type": PODS_READY,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": timestamp(now),
    }
    others = [c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") != PODS_READY]
    return {"status": {"conditions": [*others, new]}}


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
