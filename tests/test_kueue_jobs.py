"""Kueue around a G2RPOJob (issue 16, item 7): Kueue queueing the job's own children a second time, the
gang created whole for waitForPodsReady, and the Workload conditions Kueue's jobframework writes.

Kueue itself does not run here: KMock (tests/kmock_support.py) stands in for the API server, and the tests
write what Kueue's webhook and scheduler would (labels, suspend, the Workload's admission and eviction), as
read from kubernetes-sigs/kueue: pkg/controller/jobframework/{defaults.go,utils.go,reconciler.go},
pkg/controller/core/workload_controller.go, pkg/cache/queue/cluster_queue.go.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from test_operator_kmock import _kueue_admits, _workload, condition, trainer_uid

from g2rpo.api.spec import parse_spec
from g2rpo_operator.kueue import (
    EXTERNAL_FRAMEWORK,
    pods_ready,
    pods_ready_reason,
    queued_by_kueue,
    release_quota,
)
from g2rpo_operator.lifecycle import progress

from kmock_support import BATCH_JOBS, DEPLOYMENTS, kueue_workloads, wait_for
from operator_fixtures import NAMESPACE, job_manifest

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _evicted_workload(reason: str, message: str = "evicted") -> dict:
    return {
        "metadata": {"name": "demo-gang"},
        "status": {
            "admission": {"clusterQueue": "cq", "podSetAssignments": []},
            "conditions": [
                {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": ""},
                {"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""},
                {"type": "Evicted", "status": "True", "reason": reason, "message": message},
            ],
        },
    }


@pytest.mark.parametrize(
    ("reason", "requeued"),
    [("Preempted", "True"), ("NodeFailures", "True"), ("PodsReadyTimeout", "False"), ("InactiveWorkload", "False")],
)
def test_quota_handed_back_with_the_requeued_condition_kueue_sets(reason, requeued):
    """jobframework's eviction handling: Requeued True at once only after a preemption or node failures;
    False otherwise, and Kueue's workload controller turns it True after its backoff (PodsReadyTimeout) or on
    reactivation. A Workload without Requeued would be requeued at once, skipping that backoff."""
    status = release_quota(_evicted_workload(reason, "why"), "evicted", NOW)["status"]
    found = {c["type"]: c for c in status["conditions"]}
    assert status["admission"] is None
    assert (found["Requeued"]["status"], found["Requeued"]["reason"], found["Requeued"]["message"]) == (
        requeued,
        reason,
        "why",
    )
    assert (found["QuotaReserved"]["status"], found["Admitted"]["status"]) == ("False", "False")
    # A second eviction replaces the condition, never adds another.
    again = {**_evicted_workload(reason), "status": {**status, "conditions": status["conditions"]}}
    assert [c["type"] for c in release_quota(again, "evicted", NOW)["status"]["conditions"]].count("Requeued") == 1


def test_pods_ready_reasons_follow_kueues_own():
    """generatePodsReadyCondition: WaitForStart, Started; after a drop WaitForRecovery, then Recovered."""
    assert pods_ready_reason(None, False) == "WaitForStart"
    assert pods_ready_reason(None, True) == "Started"
    started = {"type": "PodsReady", "status": "True", "reason": "Started"}
    assert pods_ready_reason(started, False) == "WaitForRecovery"
    recovering = {"type": "PodsReady", "status": "False", "reason": "WaitForRecovery"}
    assert pods_ready_reason(recovering, False) == "WaitForRecovery"
    assert pods_ready_reason(recovering, True) == "Recovered"
    assert pods_ready_reason({"status": "False", "reason": "WaitForStart"}, True) == "Started"
    workload = {"metadata": {"name": "w"}, "status": {"conditions": [started]}}
    dropped = pods_ready(workload, False, NOW)["status"]["conditions"][-1]
    assert (dropped["reason"], dropped["message"]) == (
        "WaitForRecovery",
        "At least one pod has failed, waiting for recovery",
    )
    assert pods_ready({"metadata": {}, "status": {"conditions": [dropped]}}, False, NOW) is None  # no rewrite


def test_a_child_kueue_queued_is_named_with_the_fix():
    job = {"kind": "Job", "metadata": {"name": "demo-trainer", "labels": {}}, "spec": {}}
    rollout = {"kind": "Deployment", "metadata": {"name": "demo-rollout", "labels": {}}, "spec": {}}
    assert queued_by_kueue([job, rollout], "team") is None
    defaulted = {**job, "metadata": {**job["metadata"], "labels": {"kueue.x-k8s.io/queue-name": "default"}}}
    message = queued_by_kueue([defaulted, rollout], "team")
    assert "Job demo-trainer has label kueue.x-k8s.io/queue-name=default" in message
    assert "namespace 'team' has a LocalQueue named 'default'" in message
    assert EXTERNAL_FRAMEWORK == "G2RPOJob.v1alpha1.g2rpo.dev" and EXTERNAL_FRAMEWORK in message
    suspended = {**job, "spec": {"suspend": True}}
    message = queued_by_kueue([suspended], "team")
    assert "manageJobsWithoutQueueName" in message and "gangScheduler: kueue" in message


def test_running_needs_the_rollout_where_the_trainer_waits_for_it():
    spec = parse_spec(job_manifest(runPolicy={"gangScheduler": "kueue", "queue": "q"})["spec"])
    job = {"metadata": {"name": "demo-trainer", "uid": "u"}, "status": {"ready": 2}}
    assert progress(spec, {}, job, [], NOW, rollout_ready=False).phase == "Pending"
    assert progress(spec, {}, job, [], NOW, rollout_ready=True).phase == "Running"


# --- on KMock, with the real operator ------------------------------------------------------------------


async def _admitted_kueue_job(cluster, start_operator, **spec) -> None:
    await cluster.create_claim()
    await start_operator(kueue_enabled=True, kueue_api_version="v1beta2")
    await cluster.apply(job_manifest(runPolicy={"gangScheduler": "kueue", "queue": "team-a"}, **spec))
    await wait_for(lambda: _workload(cluster), what="the Workload")
    admitted = _kueue_admits(cluster)
    await cluster.emulator.patch_object(kueue_workloads("v1beta2"), NAMESPACE, "demo-gang", admitted, status=True)
    await wait_for(lambda: trainer_uid(cluster), what="the trainer Job")


@pytest.mark.asyncio
async def test_children_name_their_job_as_controller_so_kueue_leaves_them_alone(cluster, start_operator):
    """Prevention: Kueue neither defaults a queue for nor suspends a Job whose controller owner is a kind it
    manages, registered external frameworks included (defaults.go defaultLocalQueueApplies,
    utils.go WorkloadShouldBeSuspended; both read metav1.GetControllerOf). The trainer Job and the rollout
    Deployment must therefore carry a controller ownerReference to the G2RPOJob, with its kind and version."""
    await _admitted_kueue_job(cluster, start_operator)
    uid = cluster.job()["metadata"]["uid"]
    for res, name in ((BATCH_JOBS, "demo-trainer"), (DEPLOYMENTS, "demo-rollout")):
        refs = cluster.emulator.stored(res, NAMESPACE, name)["metadata"]["ownerReferences"]
        controller = [r for r in refs if r.get("controller")]
        assert len(controller) == 1 and controller[0]["uid"] == uid, refs
        kind, version, group = EXTERNAL_FRAMEWORK.split(".", 2)
        assert (controller[0]["kind"], controller[0]["apiVersion"]) == (kind, f"{group}/{version}")


@pytest.mark.asyncio
async def test_a_trainer_job_kueue_queued_again_is_reported_with_the_fix(cluster, start_operator):
    """What Kueue's batch/Job webhook does to the trainer Job in a namespace with a LocalQueue `default` when
    G2RPOJobs are not registered (defaults.go ApplyDefaultLocalQueue, then ApplyDefaultForSuspend): label and
    suspend. Played here by a patch; the operator must say so, naming the registration."""
    await _admitted_kueue_job(cluster, start_operator)
    kueue_webhook = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "default"}}, "spec": {"suspend": True}}
    await cluster.emulator.patch_object(BATCH_JOBS, NAMESPACE, "demo-trainer", kueue_webhook)
    await wait_for(lambda: condition(cluster, "Ready").get("reason") == "QueuedByKueue", what="QueuedByKueue")
    message = condition(cluster, "Ready")["message"]
    assert "Job demo-trainer has label kueue.x-k8s.io/queue-name=default" in message
    assert "integrations.externalFrameworks" in message and "G2RPOJob.v1alpha1.g2rpo.dev" in message
    assert cluster.status()["phase"] == "Pending"


@pytest.mark.asyncio
async def test_a_pods_ready_timeout_names_the_timeouts_and_waits_for_kueues_backoff(cluster, start_operator):
    await _admitted_kueue_job(cluster, start_operator, rollout={"startupTimeoutSeconds": 1500})
    evicted = _kueue_admits(cluster)
    evicted["status"]["conditions"][2] = {
        "type": "Evicted",
        "status": "True",
        "reason": "PodsReadyTimeout",
        "message": "Exceeded the PodsReady timeout default/demo-gang",
    }
    await cluster.emulator.patch_object(kueue_workloads("v1beta2"), NAMESPACE, "demo-gang", evicted, status=True)
    await wait_for(lambda: condition(cluster, "Ready").get("reason") == "Evicted", what="Evicted")
    message = condition(cluster, "Ready")["message"]
    assert "PodsReadyTimeout" in message and "waitForPodsReady.timeout" in message and "(1500 s)" in message
    released = await wait_for(
        lambda: (w := _workload(cluster)) and not w["status"].get("admission") and w, what="quota handed back"
    )
    requeued = next(c for c in released["status"]["conditions"] if c["type"] == "Requeued")
    assert (requeued["status"], requeued["reason"]) == ("False", "PodsReadyTimeout")  # Kueue's backoff decides
    assert cluster.status()["restarts"] == 0 and cluster.status()["disruptions"] == 1
