"""The real operator against KMock: what a node or a volume can refuse, as the job's conditions.

A too-old NVIDIA driver (the rollout's check-driver init container, crash-looping), a checkpoint
folder uid 1000 cannot write (check-spec's exit code), a full volume (a rank's termination message:
accelerate launch exits 1 whatever the rank returned) each fail the job at once with their own
reason; a pod stuck in ContainerCreating shows its mount event. The kubelet and the controllers do
not exist here: the tests write the pod statuses and events they would (their shapes are core/v1's:
ContainerStatus.state/lastState.terminated.{exitCode,message}, Event.involvedObject/reason/message).
"""

from __future__ import annotations

import asyncio

import kmock
import pytest
from test_operator_kmock import _granted, _verb, all_children, children_before_trainer, condition, phase_is

from g2rpo.api.spec import EXIT_CHECKPOINTS_NOT_WRITABLE, EXIT_DRIVER_TOO_OLD

from kmock_support import BATCH_JOBS, DEPLOYMENTS, PODS, wait_for
from operator_fixtures import CLAIM, NAMESPACE, Cluster, job_manifest

pytestmark = pytest.mark.asyncio
EVENTS = kmock.resource("v1/events")
DRIVER_LINE = "NVIDIA driver 550.163.01 on this node is too old for this image's CUDA 13: it needs driver R580 or newer"


def _pod(name: str, template_of: dict, statuses: dict, owner: dict | None = None) -> dict:
    meta: dict = {"name": name, "uid": f"uid-{name}", "labels": template_of["spec"]["template"]["metadata"]["labels"]}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
            }
        ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": {"phase": "Pending", **statuses}}


def _ended(name: str, exit_code: int, message: str) -> dict:
    return {"name": name, "state": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}}}


async def _trainer_pod_ends(cluster: Cluster, status_key: str, container: dict) -> None:
    job = cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")
    pod = _pod("demo-trainer-0-abcde", job, {status_key: [container]}, owner=job)
    pod["status"]["phase"] = "Failed"
    await cluster.emulator.create_object(PODS, NAMESPACE, pod)


async def test_a_too_old_driver_under_the_rollout_fails_the_job_and_frees_its_gpu(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest())
    found = await children_before_trainer(cluster)
    rollout = found[("deployments", "demo-rollout")]
    assert [c["name"] for c in rollout["spec"]["template"]["spec"]["initContainers"]] == ["check-driver"]
    crash_looping = {
        "name": "check-driver",
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
        "lastState": {
            "terminated": {
                "exitCode": EXIT_DRIVER_TOO_OLD,
                "reason": "Error",
                "message": f"DriverTooOld: {DRIVER_LINE}",
            }
        },
    }
    pod = _pod("demo-rollout-7c9f-x", rollout, {"initContainerStatuses": [crash_looping]})
    await cluster.emulator.create_object(PODS, NAMESPACE, pod)
    await wait_for(phase_is(cluster, "Failed"), what="phase Failed")
    failed = condition(cluster, "Failed")
    assert failed["reason"] == "DriverTooOld" and failed["message"].startswith(DRIVER_LINE)
    assert "container check-driver, exit code 3" in failed["message"]
    await wait_for(
        lambda: cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["replicas"] == 0,
        what="the rollout scaled to zero",
    )


async def test_an_unwritable_claim_fails_the_job_at_once_naming_the_claim(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(runPolicy={"backoffLimit": 3}))
    await all_children(cluster)
    line = "checkpoint folder /checkpoints/demo is not writable by uid 1000 (gid 1000, groups 1000): Permission denied"
    check = _ended("check-spec", EXIT_CHECKPOINTS_NOT_WRITABLE, f"CheckpointsNotWritable: {line}")
    await _trainer_pod_ends(cluster, "initContainerStatuses", check)
    await wait_for(phase_is(cluster, "Failed"), what="phase Failed")
    failed = condition(cluster, "Failed")
    assert failed["reason"] == "CheckpointsNotWritable" and failed["message"].startswith(line)
    assert f"checkpoint claim '{CLAIM}'" in failed["message"] and "fsGroup" in failed["message"]
    storage = condition(cluster, "StorageReady")
    assert storage["status"] == "False" and storage["reason"] == "CheckpointsNotWritable"
    assert cluster.status()["restarts"] == 0  # not retried: the next attempt would fail the same way


async def test_a_full_volume_fails_the_job_naming_the_claim_though_the_rank_exited_1(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(runPolicy={"backoffLimit": 3}))
    await all_children(cluster)
    line = (
        "no room for checkpoint-300 in /checkpoints/demo: 2.1 GiB free, the last checkpoint took 9.8 GiB; newest "
        "complete checkpoint: /checkpoints/demo/checkpoint-250 (a restarted trainer resumes from it); ..."
    )
    await _trainer_pod_ends(cluster, "containerStatuses", _ended("trainer", 1, f"CheckpointsFull: {line}"))
    await wait_for(phase_is(cluster, "Failed"), what="phase Failed")
    failed = condition(cluster, "Failed")
    assert failed["reason"] == "CheckpointsFull" and failed["message"].startswith(line)
    assert f"checkpoint claim '{CLAIM}'" in failed["message"] and "checkpoint.keep" in failed["message"]
    assert condition(cluster, "StorageReady")["reason"] == "CheckpointsFull"


async def test_a_pod_stuck_in_container_creating_shows_its_mount_error(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest())
    found = await children_before_trainer(cluster)
    multi_attach = 'Multi-Attach error for volume "pvc-0d1f" Volume is already used by pod(s) demo-trainer-0-abcde'
    creating = {"name": "controller", "state": {"waiting": {"reason": "ContainerCreating"}}}
    pod = _pod("demo-controller-5d8c-x", found[("deployments", "demo-controller")], {"containerStatuses": [creating]})
    pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
    await cluster.emulator.create_object(PODS, NAMESPACE, pod)
    await wait_for(lambda: condition(cluster, "Ready").get("reason") == "WaitingForRollout", what="waiting")
    await asyncio.sleep(1.0)  # the passes the pod's creation and the status write caused are over
    # Events are not watched: the job, waiting for its pods, is polled, and the poll reads them.
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "demo-controller-5d8c-x.17f3"},
        "involvedObject": {"kind": "Pod", "name": "demo-controller-5d8c-x", "namespace": NAMESPACE},
        "reason": "FailedAttachVolume",
        "message": multi_attach,
        "type": "Warning",
        "lastTimestamp": "2026-01-01T00:00:05Z",
    }
    await cluster.emulator.create_object(EVENTS, NAMESPACE, event)
    await wait_for(lambda: condition(cluster, "Ready").get("reason") == "FailedAttachVolume", what="the mount reason")
    assert condition(cluster, "Ready")["message"] == f"pod demo-controller-5d8c-x: FailedAttachVolume: {multi_attach}"
    assert cluster.status()["phase"] == "Pending"
    asked = {
        (r.resource.group, r.resource.plural, _verb(r))
        for r in cluster.emulator[lambda r: r.resource is not None and r.resource.plural == "events"]
        if not r.headers.get("User-Agent", "").startswith("kmock")
    }
    assert asked == {("", "events", "list")} and asked <= _granted()  # the chart's rules allow the read
