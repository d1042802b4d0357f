"""The real operator (kopf + g2rpo_operator) against KMock, the sanctioned fake of the Kubernetes API
server (tests/kmock_support.py says what it emulates). Nothing else is faked: the guidance
controller is the real service, reached over HTTP with the token the operator generated, and the
trainer's reports go through the trainer's real client. Kubernetes' own controllers do not exist
here, so the tests play them: they set Deployment and Job status and create the trainer's pods.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import time
from collections import Counter
from pathlib import Path

import aiohttp
import kmock
import pytest
import yaml
from rbac_support import owner_reference_checks

from g2rpo.api.spec import parse_spec
from g2rpo.controller.http_client import HttpGuidanceClient
from g2rpo.controller.metrics import SANDBOX_LAYERS
from g2rpo.controller.service import GuidanceService, ServiceConfig, start_server
from g2rpo.guidance.schedule import ScheduleParams
from g2rpo_operator.cache import ObjectCache, View
from g2rpo_operator.kube import KubeApi
from g2rpo_operator.reconcile import Reconciler
from g2rpo_operator.settings import OperatorSettings

from kmock_support import (
    BATCH_JOBS,
    CHILD_RESOURCES,
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    NAMESPACED_PEERINGS,
    NETWORK_POLICIES,
    PEERINGS,
    PODGROUPS,
    PODS,
    PVCS,
    SECRETS,
    SERVICES,
    WORKLOADS,
    free_port,
    kueue_flavors,
    kueue_workloads,
    wait_for,
)
from operator_fixtures import NAMESPACE, Cluster, job_manifest

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[1]

BEFORE_TRAINER = {
    ("configmaps", "demo-config"),
    ("secrets", "demo-token"),
    ("networkpolicies", "demo-controller"),
    ("networkpolicies", "demo-rollout"),
    ("networkpolicies", "demo-trainer"),
    ("services", "demo-controller"),
    ("services", "demo-rollout"),
    ("services", "demo-trainer"),
    ("deployments", "demo-controller"),
    ("deployments", "demo-rollout"),
}
EXPECTED = BEFORE_TRAINER | {("jobs", "demo-trainer")}


def children(cluster: Cluster) -> dict[tuple[str, str], dict]:
    """The job's children: objects labelled with its instance (a user's Secret is not one)."""
    return {
        (res.plural, name): obj
        for res in CHILD_RESOURCES
        for name, obj in cluster.emulator.named(res, NAMESPACE).items()
        if obj["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == "demo"
    }


def condition(cluster: Cluster, type_: str) -> dict:
    return next((c for c in cluster.status().get("conditions", []) if c["type"] == type_), {})


def phase_is(cluster: Cluster, phase: str):
    return lambda: cluster.status().get("phase") == phase


async def children_before_trainer(cluster: Cluster) -> dict[tuple[str, str], dict]:
    def complete() -> dict | None:
        found = children(cluster)
        return found if BEFORE_TRAINER <= set(found) <= EXPECTED else None

    return await wait_for(complete, what="every child but (perhaps) the trainer Job")


async def all_children(cluster: Cluster) -> dict[tuple[str, str], dict]:
    """Every child: the gang comes up in order (the Deployment controller is played here)."""
    await children_before_trainer(cluster)
    await make_available(cluster, "demo-controller", "demo-rollout")

    def complete() -> dict | None:
        found = children(cluster)
        return found if set(found) == EXPECTED else None

    return await wait_for(complete, what="all children")


async def make_available(cluster: Cluster, *deployments: str) -> None:
    """What the Deployment controller reports once the current template's pod is available."""
    for name in deployments:
        generation = cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, name)["metadata"]["generation"]
        status = {"observedGeneration": generation, "updatedReplicas": 1, "availableReplicas": 1, "replicas": 1}
        await cluster.emulator.patch_object(DEPLOYMENTS, NAMESPACE, name, {"status": status}, status=True)


async def start_trainer(cluster: Cluster, replicas: int = 2) -> None:
    await cluster.emulator.patch_object(
        BATCH_JOBS, NAMESPACE, "demo-trainer", {"status": {"active": replicas, "ready": replicas}}, status=True
    )


async def fail_trainer_pod(cluster: Cluster, exit_code: int, reason: str, container: str = "trainer") -> str:
    """What the kubelet reports when rank 0's `container` ends: a Failed pod of the current trainer Job."""
    job = cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")
    uid = job["metadata"]["uid"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"demo-trainer-0-{uid[:5]}",
            "labels": job["spec"]["template"]["metadata"]["labels"],
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "demo-trainer", "uid": uid, "controller": True}
            ],
        },
        "status": {
            "phase": "Failed",
            "initContainerStatuses" if container == "check-spec" else "containerStatuses": [
                {"name": container, "state": {"terminated": {"exitCode": exit_code, "reason": reason}}}
            ],
        },
    }
    await cluster.emulator.create_object(PODS, NAMESPACE, pod)
    return uid


async def fail_trainer(cluster: Cluster, exit_code: int = 137, reason: str = "OOMKilled") -> str:
    """What the Job controller and kubelet do when rank 0 dies: a Failed pod, then a Failed Job."""
    uid = await fail_trainer_pod(cluster, exit_code, reason)
    failed = {
        "type": "Failed",
        "status": "True",
        "reason": "BackoffLimitExceeded",
        "message": "Job has reached the specified backoff limit",
    }
    await cluster.emulator.patch_object(
        BATCH_JOBS,
        NAMESPACE,
        "demo-trainer",
        {"status": {"active": 0, "failed": 1, "conditions": [failed]}},
        status=True,
    )
    return uid


def token(cluster: Cluster) -> str:
    return base64.b64decode(cluster.emulator.stored(SECRETS, NAMESPACE, "demo-token")["data"]["token"]).decode()


def owner_uids(obj: dict) -> list[str]:
    return [ref["uid"] for ref in obj["metadata"].get("ownerReferences", []) if ref.get("controller")]


async def test_apply_creates_every_child_owned_and_labelled(cluster, start_operator):
    await cluster.create_claim()
    running = await start_operator()
    metrics_port = running.operator.metrics.serve(0, addr="127.0.0.1")
    job = await cluster.apply(job_manifest(trainer={"replicas": 2, "gpusPerReplica": 8}))
    found = await all_children(cluster)
    uid = job["metadata"]["uid"]
    for (_, name), obj in found.items():
        assert owner_uids(obj) == [uid], name
        refs = obj["metadata"]["ownerReferences"]
        assert refs[0]["kind"] == "G2RPOJob" and refs[0]["blockOwnerDeletion"] is True
        labels = obj["metadata"]["labels"]
        assert (
            labels["app.kubernetes.io/instance"] == "demo"
            and labels["app.kubernetes.io/managed-by"] == "g2rpo-operator"
        )
    trainer = found[("jobs", "demo-trainer")]["spec"]
    assert (trainer["completionMode"], trainer["parallelism"]) == ("Indexed", 2)
    assert trainer["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert found[("deployments", "demo-rollout")]["spec"]["template"]["spec"]["containers"][0]["command"][:2] == [
        "trl",
        "vllm-serve",
    ]
    await wait_for(lambda: "(0/2 ready)" in condition(cluster, "Ready").get("message", ""), what="waiting for pods")
    assert cluster.status()["phase"] == "Pending" and condition(cluster, "Ready")["reason"] == "Waiting"
    async with aiohttp.ClientSession() as http:
        async with http.get(running.health_url) as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            text = await response.text()
    assert 'g2rpo_operator_jobs{phase="Pending"} 1.0' in text
    assert 'g2rpo_operator_reconciles_total{result="ok",trigger="watch"}' in text


async def test_status_follows_the_children_and_the_controller(cluster, start_operator, tmp_path):
    port = free_port()
    await cluster.create_claim()
    await start_operator(controller_url_template=f"http://127.0.0.1:{port}")
    manifest = job_manifest(checkpoint={"everySteps": 1}, guidance={"initialLength": 1000, "maxLength": 3072})
    await cluster.apply(manifest)
    await all_children(cluster)
    params = ScheduleParams.from_spec(parse_spec(manifest["spec"]).guidance)
    config = ServiceConfig(job="demo", params=params, token=token(cluster), state_dir=tmp_path)
    server = await start_server(GuidanceService(config), "127.0.0.1", port)
    try:
        await make_available(cluster, "demo-controller", "demo-rollout")
        await start_trainer(cluster)
        await wait_for(phase_is(cluster, "Running"), what="phase Running")
        assert cluster.status()["startTime"] and condition(cluster, "Ready")["status"] == "True"
        assert condition(cluster, "SandboxIsolated") == {}  # no code reward, no sandbox
        trainer = HttpGuidanceClient(server.url, token(cluster))  # what trainer rank 0 does each step
        for step, accuracy in enumerate([0.2, 0.4]):
            await asyncio.to_thread(trainer.report, step, accuracy, {"accuracy": accuracy})
        length = (await asyncio.to_thread(trainer.current))[1]
        await wait_for(lambda: cluster.status().get("step") == 2, what="step 2")
        status = cluster.status()
        assert (status["guidanceLength"], status["accuracyReward"]) == (length, 0.4)
        assert status["lastCheckpoint"] == "/checkpoints/demo/checkpoint-2"
        complete = {"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": "done"}
        await cluster.emulator.patch_object(
            BATCH_JOBS, NAMESPACE, "demo-trainer", {"status": {"active": 0, "conditions": [complete]}}, status=True
        )
        await wait_for(phase_is(cluster, "Succeeded"), what="phase Succeeded")
        assert cluster.status()["completionTime"] and condition(cluster, "Complete")["status"] == "True"
        await wait_for(
            lambda: cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["replicas"] == 0,
            what="GPUs released",
        )
    finally:
        await server.close()


async def test_sandbox_condition_follows_the_trainers_layer_report(cluster, start_operator, tmp_path):
    """A code reward job's SandboxIsolated condition: Unknown until the first step report, then False naming
    each missing layer, True once all hold; the controller in between is the real service."""
    port = free_port()
    await cluster.create_claim()
    await start_operator(controller_url_template=f"http://127.0.0.1:{port}")
    manifest = job_manifest(
        rewards=[{"name": "code"}], dataset={"name": "openai/openai_humaneval", "testsColumn": "test"}
    )
    await cluster.apply(manifest)
    await all_children(cluster)
    await wait_for(lambda: condition(cluster, "SandboxIsolated").get("reason") == "NotReported", what="Unknown")
    assert condition(cluster, "SandboxIsolated")["status"] == "Unknown"
    params = ScheduleParams.from_spec(parse_spec(manifest["spec"]).guidance)
    config = ServiceConfig(job="demo", params=params, token=token(cluster), state_dir=tmp_path)
    server = await start_server(GuidanceService(config), "127.0.0.1", port)
    try:
        await make_available(cluster, "demo-controller", "demo-rollout")  # the operator asks available controllers
        await start_trainer(cluster)
        trainer = HttpGuidanceClient(server.url, token(cluster))
        layers = {f"sandbox_{layer}": 1.0 for layer in SANDBOX_LAYERS}
        await asyncio.to_thread(trainer.report, 0, 0.5, {**layers, "sandbox_landlock": 0.0, "sandbox_seccomp": 0.0})
        await wait_for(lambda: condition(cluster, "SandboxIsolated").get("status") == "False", what="layers missing")
        weak = condition(cluster, "SandboxIsolated")
        assert weak["reason"] == "LayersMissing" and "landlock, seccomp layer(s)" in weak["message"]
        await asyncio.to_thread(trainer.report, 1, 0.5, layers)
        await wait_for(lambda: condition(cluster, "SandboxIsolated").get("status") == "True", what="all layers hold")
    finally:
        await server.close()
    # The controller going away keeps the last known verdict (the operator polls every 0.2 s here).
    await asyncio.sleep(1.0)
    assert condition(cluster, "SandboxIsolated")["reason"] == "AllLayersHold"


def rollout_epoch(cluster: Cluster) -> str | None:
    deployment = cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")
    template = deployment["spec"]["template"]["metadata"] if deployment else {}
    return (template.get("annotations") or {}).get("g2rpo.dev/gang-epoch")


def trainer_uid(cluster: Cluster) -> str | None:
    job = cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")
    return job["metadata"]["uid"] if job else None


async def test_gating_no_trainer_job_before_the_rollout_is_available(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(rollout={"startupTimeoutSeconds": 600}))
    await children_before_trainer(cluster)
    await make_available(cluster, "demo-controller")
    await wait_for(
        lambda: "Available: rollout Deployment demo-rollout (" in condition(cluster, "Ready").get("message", ""),
        what="the rollout named as what the trainer waits for",
    )
    assert condition(cluster, "Ready")["reason"] == "WaitingForRollout"
    await asyncio.sleep(0.5)  # several polls: still no trainer, still Pending
    assert trainer_uid(cluster) is None and cluster.status()["phase"] == "Pending"
    await make_available(cluster, "demo-rollout")
    await wait_for(lambda: trainer_uid(cluster), what="the trainer Job once the rollout is Available")


async def test_failed_trainer_restarts_the_whole_gang_then_fails_past_the_budget(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(runPolicy={"backoffLimit": 1}))
    await all_children(cluster)
    await start_trainer(cluster)
    await wait_for(phase_is(cluster, "Running"), what="phase Running")
    assert rollout_epoch(cluster) == "0"
    first = await fail_trainer(cluster)
    await wait_for(lambda: cluster.status().get("restarts") == 1, what="one restart")
    # The gang restarts: vLLM's pod is replaced (new epoch on its template) and the old trainer goes.
    await wait_for(lambda: rollout_epoch(cluster) == "1", what="the rollout pod replaced")
    await wait_for(lambda: trainer_uid(cluster) is None, what="the failed trainer Job removed")
    assert not cluster.emulator.named(PODS, NAMESPACE), "the failed attempt's pods go with its Job"
    await wait_for(lambda: condition(cluster, "Ready").get("reason") == "WaitingForRollout", what="waiting again")
    await asyncio.sleep(0.5)  # the old rollout pod's availability does not count for the new epoch
    assert trainer_uid(cluster) is None and cluster.status()["phase"] == "Pending"
    await make_available(cluster, "demo-rollout")
    await wait_for(lambda: trainer_uid(cluster) not in (None, first), what="a new trainer Job")
    second = await fail_trainer(cluster, exit_code=1, reason="Error")
    await wait_for(phase_is(cluster, "Failed"), what="phase Failed")
    failed = condition(cluster, "Failed")
    assert failed["reason"] == "TrainerFailed" and "exited with code 1 (Error)" in failed["message"]
    assert cluster.status()["restarts"] == 1 and cluster.status()["completionTime"]
    await asyncio.sleep(0.5)  # several passes: a failed job is never restarted again
    assert trainer_uid(cluster) == second
    assert cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["replicas"] == 0


async def test_disrupted_trainer_restarts_the_gang_without_spending_the_budget(cluster, start_operator):
    """A preempted rank (the kubelet's DisruptionTarget condition; the Job's podFailurePolicy ignores it)."""
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(runPolicy={"backoffLimit": 0}))
    await all_children(cluster)
    assert cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")["spec"]["podFailurePolicy"]["rules"][0][
        "onPodConditions"
    ] == [{"type": "DisruptionTarget", "status": "True"}]
    await start_trainer(cluster)
    job = cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")
    uid = job["metadata"]["uid"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "demo-trainer-1-x",
            "labels": job["spec"]["template"]["metadata"]["labels"],
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "demo-trainer", "uid": uid, "controller": True}
            ],
        },
        "status": {
            "phase": "Failed",
            "conditions": [
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": "preempted",
                }
            ],
        },
    }
    await cluster.emulator.create_object(PODS, NAMESPACE, pod)
    await wait_for(lambda: cluster.status().get("disruptions") == 1, what="a disruption counted")
    await wait_for(lambda: trainer_uid(cluster) is None and rollout_epoch(cluster) == "1", what="the gang restarted")
    await make_available(cluster, "demo-rollout")
    await wait_for(lambda: trainer_uid(cluster) not in (None, uid), what="a new trainer Job")
    assert cluster.status()["restarts"] == 0 and cluster.status()["phase"] != "Failed"  # backoffLimit 0 untouched


async def test_configuration_error_fails_the_job_at_once(cluster, start_operator):
    """The check-spec init container exits EXIT_INVALID_SPEC; the Job's podFailurePolicy fails it (FailJob)
    and the operator fails the job without spending its retries: another attempt would fail the same way."""
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(runPolicy={"backoffLimit": 3}))
    await all_children(cluster)
    # The operator acts on the pod's exit code, before (or without) the Job controller's FailJob verdict.
    await fail_trainer_pod(cluster, exit_code=2, reason="Error", container="check-spec")
    await wait_for(phase_is(cluster, "Failed"), what="phase Failed")
    failed = condition(cluster, "Failed")
    assert failed["reason"] == "InvalidConfiguration" and "container check-spec exited with code 2" in failed["message"]
    assert cluster.status()["restarts"] == 0 and rollout_epoch(cluster) == "0"


async def test_pending_says_why_the_pods_wait(cluster, start_operator):
    await cluster.create_claim(phase="Pending")
    await start_operator()
    await cluster.apply(job_manifest())
    await children_before_trainer(cluster)
    await wait_for(lambda: condition(cluster, "StorageReady").get("reason") == "ClaimNotBound", what="claim unbound")
    assert condition(cluster, "Ready")["reason"] == "ClaimNotBound" and cluster.status()["phase"] == "Pending"
    await cluster.emulator.patch_object(
        PVCS,
        NAMESPACE,
        "g2rpo-checkpoints",
        {"status": {"phase": "Bound", "accessModes": ["ReadWriteMany"]}},
        status=True,
    )
    await wait_for(
        lambda: condition(cluster, "StorageReady").get("status") == "True", what="claim bound (a watch event)"
    )
    rollout_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "demo-rollout-abc",
            "labels": {
                "app.kubernetes.io/name": "g2rpo",
                "app.kubernetes.io/instance": "demo",
                "app.kubernetes.io/component": "rollout",
                "app.kubernetes.io/managed-by": "g2rpo-operator",
            },
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.",
                }
            ],
        },
    }
    await cluster.emulator.create_object(PODS, NAMESPACE, rollout_pod)
    await wait_for(lambda: condition(cluster, "Ready").get("reason") == "Unschedulable", what="Unschedulable")
    message = condition(cluster, "Ready")["message"]
    assert "pod demo-rollout-abc: 0/3 nodes are available" in message
    # No node has the GPU labels: the message names them and the override (tests/test_placement.py).
    assert "cloud.google.com/gke-accelerator" in message and "spec.rollout.gpuProducts" in message
    pulling = {
        "containerStatuses": [
            {"name": "vllm", "state": {"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}}}
        ]
    }
    await cluster.emulator.patch_object(
        PODS, NAMESPACE, "demo-rollout-abc", {"status": {"conditions": [], **pulling}}, status=True
    )
    await wait_for(lambda: condition(cluster, "Ready").get("reason") == "ErrImagePull", what="ErrImagePull")
    assert cluster.status()["phase"] == "Pending"


async def test_multi_node_trainer_needs_a_shared_claim(cluster, start_operator):
    await cluster.create_claim(modes=("ReadWriteOnce",))
    await start_operator()
    await cluster.apply(job_manifest(trainer={"replicas": 2}))
    await wait_for(lambda: condition(cluster, "StorageReady").get("reason") == "ClaimNotShared", what="ClaimNotShared")
    message = condition(cluster, "StorageReady")["message"]
    assert "'g2rpo-checkpoints'" in message and "ReadWriteOnce" in message and "ReadWriteMany" in message
    assert condition(cluster, "Ready")["reason"] == "ClaimNotShared"
    await asyncio.sleep(0.3)
    assert not children(cluster)  # nothing would start: the second node could not attach the claim


async def test_claim_created_from_the_spec_with_the_storage_class(cluster, start_operator):
    await start_operator(storage_class_name="standard-rwx")
    await cluster.apply(job_manifest(checkpoint={"volumeSize": "500Gi"}))
    claim = await wait_for(lambda: cluster.emulator.stored(PVCS, NAMESPACE, "g2rpo-checkpoints"), what="the claim")
    assert claim["spec"]["storageClassName"] == "standard-rwx" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "ownerReferences" not in claim["metadata"]
    await children_before_trainer(cluster)


async def test_network_policies_are_owned_children(cluster, start_operator):
    await cluster.create_claim()
    job = await start_operator(operator_namespace="g2rpo-system") and await cluster.apply(job_manifest())
    await children_before_trainer(cluster)
    policies = cluster.emulator.named(NETWORK_POLICIES, NAMESPACE)
    assert set(policies) == {"demo-controller", "demo-rollout", "demo-trainer"}
    for policy in policies.values():
        assert owner_uids(policy) == [job["metadata"]["uid"]]
    rollout_from = policies["demo-rollout"]["spec"]["ingress"][0]["from"]
    assert rollout_from == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "g2rpo",
                    "app.kubernetes.io/instance": "demo",
                    "app.kubernetes.io/component": "trainer",
                }
            }
        }
    ]


async def test_suspend_scales_to_zero_and_resume_brings_the_trainer_back(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest())
    await all_children(cluster)
    await make_available(cluster, "demo-controller", "demo-rollout")
    await start_trainer(cluster)
    await wait_for(phase_is(cluster, "Running"), what="phase Running")
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"suspend": True}})
    await wait_for(phase_is(cluster, "Suspended"), what="phase Suspended")
    await wait_for(
        lambda: cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer") is None, what="trainer deleted"
    )
    # The rollout goes once the trainer is gone (it served the trainer's last step), on the next pass.
    for name in ("demo-controller", "demo-rollout"):
        await wait_for(
            lambda n=name: cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, n)["spec"]["replicas"] == 0,
            what=f"{name} scaled to zero",
        )
    assert "startTime" not in cluster.status() and condition(cluster, "Suspended")["status"] == "True"
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"suspend": False}})
    await wait_for(
        lambda: cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["replicas"] == 1,
        what="scaled up",
    )
    await make_available(cluster, "demo-controller", "demo-rollout")
    await wait_for(lambda: cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer"), what="trainer recreated")
    await start_trainer(cluster)
    await wait_for(phase_is(cluster, "Running"), what="phase Running again")


class LateAnswers(KubeApi):
    """The API server's answers to the operator's writes reach it only after the watch events of later
    changes, as on a busy node: CI once saw the answer to the trainer Job's creation (no status) land in
    the cache after the watch event of the Job's pods becoming ready, and the job never became Running.
    Here every write's answer is held back long enough for the test's next status change to overtake it."""

    def create(self, manifest: dict, dry_run: bool = False) -> dict:
        answer = super().create(manifest, dry_run)
        time.sleep(LATE_ANSWER_SECONDS)
        return answer

    def patch(self, res, namespace, name, body, subresource=None):  # type: ignore[no-untyped-def]
        answer = super().patch(res, namespace, name, body, subresource)
        time.sleep(LATE_ANSWER_SECONDS)
        return answer


LATE_ANSWER_SECONDS = 0.3


async def test_answers_that_arrive_after_later_events_do_not_roll_the_job_back(cluster, start_operator):
    await cluster.create_claim()
    await start_operator(api=LateAnswers.for_url(cluster.url))
    await cluster.apply(job_manifest())
    await all_children(cluster)
    await start_trainer(cluster)  # at once: before the answer to the Job's creation reaches the operator
    await wait_for(phase_is(cluster, "Running"), what="phase Running")
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"suspend": True}})
    await wait_for(phase_is(cluster, "Suspended"), what="phase Suspended")
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"suspend": False}})
    for name in ("demo-controller", "demo-rollout"):
        # Ready as soon as scaled up: before the answer to the operator's scale-up patch arrives.
        await wait_for(lambda n=name: cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, n)["spec"]["replicas"] == 1)
        await make_available(cluster, name)
    await wait_for(lambda: cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer"), what="trainer recreated")
    await start_trainer(cluster)
    await wait_for(phase_is(cluster, "Running"), what="phase Running again")


def _kueue_admits(cluster: Cluster, admitted: bool = True) -> dict:
    """The Workload status Kueue's scheduler writes when it reserves quota on flavor `a100-spot`."""
    assignment = {"nvidia.com/gpu": "a100-spot"}
    return {
        "status": {
            "admission": {
                "clusterQueue": "gpu-cq",
                "podSetAssignments": [
                    {"name": "rollout", "flavors": assignment, "count": 1},
                    {"name": "trainer", "flavors": assignment, "count": 2},
                ],
            },
            "conditions": [
                {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "reserved"},
                {"type": "Admitted", "status": "True" if admitted else "False", "reason": "Admitted", "message": ""},
                {"type": "Evicted", "status": "False", "reason": "QuotaReserved", "message": ""},
            ],
        }
    }


def _workload(cluster: Cluster, version: str = "v1beta2") -> dict | None:
    return cluster.emulator.stored(kueue_workloads(version), NAMESPACE, "demo-gang")


def _pods_ready(cluster: Cluster, version: str) -> tuple[str, str] | None:
    conditions = ((_workload(cluster, version) or {}).get("status") or {}).get("conditions") or []
    return next(((c["status"], c["reason"]) for c in conditions if c["type"] == "PodsReady"), None)


@pytest.mark.parametrize("version", ["v1beta2", "v1beta1"])
async def test_kueue_admits_the_gang_as_one_workload_and_evicts_it_as_a_disruption(cluster, start_operator, version):
    """The operator as Kueue's integration for G2RPOJobs, in either API version (KMock plays Kueue's
    scheduler: it writes the admission and the eviction into the Workload's status, as Kueue does)."""
    workloads = kueue_workloads(version)
    await cluster.create_claim()
    priority = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "research"}}
    async with cluster.emulator.post(
        "/apis/scheduling.k8s.io/v1/priorityclasses", json={**priority, "value": 1000}
    ) as response:
        assert response.status < 300
    async with cluster.emulator.post(
        f"/apis/kueue.x-k8s.io/{version}/resourceflavors",
        json={
            "apiVersion": f"kueue.x-k8s.io/{version}",
            "kind": "ResourceFlavor",
            "metadata": {"name": "a100-spot"},
            "spec": {
                "nodeLabels": {"cloud.example.com/pool": "a100-spot"},
                "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    ) as response:
        assert response.status < 300
    await start_operator(kueue_enabled=True, kueue_api_version=version)
    policy = {"gangScheduler": "kueue", "queue": "team-a", "priorityClassName": "research"}
    await cluster.apply(job_manifest(runPolicy=policy))
    workload = await wait_for(lambda: _workload(cluster, version), what="the Workload")
    assert {p["name"]: p["count"] for p in workload["spec"]["podSets"]} == {"rollout": 1, "trainer": 2}
    assert workload["spec"]["queueName"] == "team-a" and owner_uids(workload) == [cluster.job()["metadata"]["uid"]]
    assert workload["spec"]["priority"] == 1000  # Kueue orders and preempts by the class's value
    await wait_for(lambda: ("deployments", "demo-controller") in children(cluster), what="the controller")
    await make_available(cluster, "demo-controller")
    await wait_for(
        lambda: "Workload demo-gang is queued in LocalQueue 'team-a'" in condition(cluster, "Ready").get("message", ""),
        what="Ready=False Queued, naming the Workload and its queue",
    )
    assert condition(cluster, "Ready")["reason"] == "Queued" and cluster.status()["phase"] == "Pending"
    # Quota reserved but admission checks pending: still nothing of the gang.
    await cluster.emulator.patch_object(workloads, NAMESPACE, "demo-gang", _kueue_admits(cluster, False), status=True)
    await wait_for(
        lambda: "waiting for its admission checks" in condition(cluster, "Ready").get("message", ""),
        what="waiting for admission checks",
    )
    await asyncio.sleep(0.5)
    assert ("deployments", "demo-rollout") not in children(cluster) and trainer_uid(cluster) is None

    await cluster.emulator.patch_object(workloads, NAMESPACE, "demo-gang", _kueue_admits(cluster), status=True)
    await wait_for(lambda: ("deployments", "demo-rollout") in children(cluster), what="the rollout once admitted")
    rollout_pod = cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["template"]["spec"]
    assert rollout_pod["nodeSelector"]["cloud.example.com/pool"] == "a100-spot"
    assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in rollout_pod["tolerations"]
    assert (
        "kueue.x-k8s.io/queue-name"
        not in cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["metadata"]["labels"]
    )
    # The trainer comes with the rollout (waitForPodsReady times the whole gang) and waits for vLLM in process.
    first = await wait_for(lambda: trainer_uid(cluster), what="the trainer Job, with the rollout")
    trainer = cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")
    assert trainer["spec"]["template"]["spec"]["nodeSelector"]["cloud.example.com/pool"] == "a100-spot"
    assert "suspend" not in trainer["spec"]
    await start_trainer(cluster)
    await wait_for(
        lambda: _pods_ready(cluster, version) == ("False", "WaitForStart"), what="PodsReady False while vLLM loads"
    )
    await asyncio.sleep(0.5)  # trainer pods ready, vLLM still loading: not Running
    assert cluster.status()["phase"] == "Pending" and condition(cluster, "Ready")["reason"] == "WaitingForRollout"
    await make_available(cluster, "demo-rollout")
    await wait_for(phase_is(cluster, "Running"), what="phase Running")
    # Kueue's waitForPodsReady reads this; without it such a cluster would evict the job at its timeout.
    await wait_for(lambda: _pods_ready(cluster, version) == ("True", "Started"), what="the Workload's PodsReady")

    # Preempted: Kueue marks the Workload Evicted and waits for the integration to stop the gang.
    evicted = _kueue_admits(cluster)
    evicted["status"]["conditions"][2] = {
        "type": "Evicted",
        "status": "True",
        "reason": "Preempted",
        "message": "Preempted to accommodate a higher priority Workload",
    }
    await cluster.emulator.patch_object(workloads, NAMESPACE, "demo-gang", evicted, status=True)
    await wait_for(lambda: cluster.status().get("disruptions") == 1, what="the eviction counted as a disruption")
    await wait_for(
        lambda: trainer_uid(cluster) is None and ("deployments", "demo-rollout") not in children(cluster),
        what="the trainer and the rollout stopped",
    )
    released = await wait_for(
        lambda: (w := _workload(cluster, version)) and not w["status"].get("admission") and w,
        what="the quota handed back",
    )
    reserved = next(c for c in released["status"]["conditions"] if c["type"] == "QuotaReserved")
    assert reserved["status"] == "False" and "higher priority" in reserved["message"]
    requeued = next(c for c in released["status"]["conditions"] if c["type"] == "Requeued")
    assert (requeued["status"], requeued["reason"]) == ("True", "Preempted")  # as Kueue's jobframework sets it
    await wait_for(lambda: condition(cluster, "Ready").get("reason") == "Queued", what="queued again")
    assert cluster.status()["phase"] == "Pending" and cluster.status()["restarts"] == 0

    # Admitted again: the gang comes back (a new rollout pod, of the next gang epoch) and resumes.
    await cluster.emulator.patch_object(workloads, NAMESPACE, "demo-gang", _kueue_admits(cluster), status=True)
    await wait_for(lambda: rollout_epoch(cluster) == "1", what="the rollout recreated for epoch 1")
    await wait_for(lambda: trainer_uid(cluster) not in (None, first), what="a new trainer Job")
    await make_available(cluster, "demo-rollout")
    await start_trainer(cluster)
    await wait_for(phase_is(cluster, "Running"), what="Running again")
    assert cluster.status()["restarts"] == 0 and cluster.status()["disruptions"] == 1

    # Suspended: the Workload goes (its quota with it), and so does the gang.
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"suspend": True}})
    await wait_for(lambda: _workload(cluster, version) is None, what="the Workload deleted")
    await wait_for(lambda: trainer_uid(cluster) is None, what="the trainer deleted")
    await wait_for(lambda: ("deployments", "demo-rollout") not in children(cluster), what="the rollout deleted")
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"suspend": False}})
    await wait_for(lambda: _workload(cluster, version), what="a new Workload on resume")

    rbac = ROOT / "charts" / "g2rpo" / "files" / "rbac"
    granted = _granted(
        [
            *yaml.safe_load((ROOT / "manifests" / "rbac" / "cluster-role.yaml").read_text())["rules"],
            *TOKEN_KEY_RULES,
            *yaml.safe_load((rbac / "kueue-rules.yaml").read_text()),
            *yaml.safe_load((rbac / "kueue-cluster.yaml").read_text()),
        ]
    )
    kueue_requests = cluster.emulator[
        lambda r: (
            r.resource is not None and r.resource.plural and not r.headers.get("User-Agent", "").startswith("kmock")
        )
    ]
    used = {
        (r.resource.group, r.resource.plural + (f"/{r.subresource}" if r.subresource else ""), _verb(r))
        for r in kueue_requests
    } | _admission_needs(kueue_requests)
    kueue_used = {u for u in used if u[0] in ("kueue.x-k8s.io", "scheduling.k8s.io")}
    assert used <= granted, f"not granted: {sorted(used - granted)}"
    assert kueue_used == {
        ("kueue.x-k8s.io", "workloads", verb) for verb in ("get", "list", "watch", "create", "delete")
    } | {
        ("kueue.x-k8s.io", "workloads/status", "patch"),
        ("kueue.x-k8s.io", "resourceflavors", "get"),
        ("scheduling.k8s.io", "priorityclasses", "get"),
    }
    # Every object the operator read or wrote in Kueue's group, in the version it speaks (kopf's
    # discovery reads each version's list of kinds).
    assert {
        r.resource.version
        for r in cluster.emulator[lambda r: r.resource is not None and r.resource.group == "kueue.x-k8s.io"]
        if r.resource.plural
    } == {version}
    assert ("apps", "deployments", "delete") in used  # granted by kueue-rules.yaml only


async def test_a_kueue_job_waits_for_its_priority_class(cluster, start_operator):
    """Kueue's CRD refuses a Workload that names a priority class without its value: until the class
    exists the job says so and creates no Workload (its pods could not be created either)."""
    await cluster.create_claim()
    await start_operator(kueue_enabled=True)
    policy = {"gangScheduler": "kueue", "queue": "team-a", "priorityClassName": "urgent"}
    await cluster.apply(job_manifest(runPolicy=policy))
    await wait_for(
        lambda: (
            "PriorityClass 'urgent' (spec.runPolicy.priorityClassName) not found"
            in condition(cluster, "ReferencesResolved").get("message", "")
        ),
        what="the missing PriorityClass reported",
    )
    assert _workload(cluster) is None
    urgent = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "urgent"}}
    async with cluster.emulator.post(
        "/apis/scheduling.k8s.io/v1/priorityclasses", json={**urgent, "value": 7}
    ) as response:
        assert response.status < 300
    workload = await wait_for(lambda: _workload(cluster), what="the Workload once the class exists")
    assert workload["spec"]["priority"] == 7 and workload["spec"]["priorityClassRef"]["name"] == "urgent"
    await wait_for(lambda: condition(cluster, "ReferencesResolved")["status"] == "True", what="references resolved")


async def test_workload_status_is_written_only_over_the_version_read(cluster):
    """Kueue writes the Workload's conditions too: the operator's whole-list write must not erase one it
    has not seen (a merge patch naming the resourceVersion it read; the API server answers 409 otherwise)."""
    workload = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload", "metadata": {"name": "w"}, "spec": {}}
    read = await cluster.emulator.create_object(WORKLOADS, NAMESPACE, workload)
    evicted = {"status": {"conditions": [{"type": "Evicted", "status": "True", "reason": "Preempted", "message": ""}]}}
    await cluster.emulator.patch_object(WORKLOADS, NAMESPACE, "w", evicted, status=True)  # Kueue, after our read
    api = KubeApi.for_url(cluster.url)
    view, reconciler = View(api, ObjectCache(), fresh=True), Reconciler(api, OperatorSettings())
    stale_write = {"status": {"conditions": [{"type": "PodsReady", "status": "True", "reason": "PodsReady"}]}}
    refusals: list[str] = []
    await asyncio.to_thread(reconciler._patch_workload_status, view, read, stale_write, refusals)
    assert _workload_conditions(cluster, "w") == {"Evicted": "True"}  # refused, nothing lost
    fresh = cluster.emulator.stored(WORKLOADS, NAMESPACE, "w")
    await asyncio.to_thread(reconciler._patch_workload_status, view, fresh, stale_write, refusals)
    assert _workload_conditions(cluster, "w") == {"PodsReady": "True"}
    assert refusals == []  # a 409 is a stale read, not a refusal


def _workload_conditions(cluster: Cluster, name: str) -> dict[str, str]:
    stored = cluster.emulator.stored(WORKLOADS, NAMESPACE, name)
    return {c["type"]: c["status"] for c in stored["status"]["conditions"]}


async def test_kueue_jobs_are_refused_without_the_integration(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(runPolicy={"gangScheduler": "kueue", "queue": "team-a"}))
    await wait_for(lambda: condition(cluster, "SpecValid").get("status") == "False", what="SpecValid=False")
    assert "kueue.enabled=true" in condition(cluster, "SpecValid")["message"]
    assert _workload(cluster) is None and not children(cluster)


async def test_delete_removes_everything_the_job_owns(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest())
    await all_children(cluster)
    await cluster.emulator.delete_object(JOBS, NAMESPACE, "demo")
    await wait_for(lambda: cluster.job() is None, what="the job's finalizer released")
    await wait_for(lambda: not children(cluster), what="children garbage-collected")


async def test_invalid_spec_sets_a_condition_and_creates_nothing(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    # Schema-valid (every value in range), but 4 tensor-parallel workers do not fit 2 GPUs.
    await cluster.apply(job_manifest(rollout={"gpus": 2, "tensorParallelSize": 4}))
    await wait_for(phase_is(cluster, "Failed"), what="phase Failed")
    valid = condition(cluster, "SpecValid")
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec") and valid["message"].startswith(
        "spec.rollout:"
    )
    await asyncio.sleep(0.5)
    assert not children(cluster)
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"rollout": {"gpus": 4}}})
    await all_children(cluster)
    await wait_for(phase_is(cluster, "Pending"), what="phase Pending once fixed")


async def test_missing_references_are_reported_and_retried(cluster, start_operator):
    await start_operator()
    checkpoint = {"uri": "s3://ckpts/demo", "credentialsSecret": "s3-keys"}
    await cluster.apply(job_manifest(envFromSecret="hf-token", checkpoint=checkpoint))
    await wait_for(lambda: condition(cluster, "ReferencesResolved").get("status") == "False", what="MissingReference")
    message = condition(cluster, "ReferencesResolved")["message"]
    assert (
        "'g2rpo-checkpoints' (spec.checkpoint.volumeClaim)" in message and "'hf-token' (spec.envFromSecret)" in message
    )
    assert "'s3-keys' (spec.checkpoint.credentialsSecret)" in message
    keys = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-keys"},
        "data": {"AWS_ACCESS_KEY_ID": "eA=="},
    }
    await cluster.emulator.create_object(SECRETS, NAMESPACE, keys)
    await cluster.create_claim()
    await wait_for(lambda: "volumeClaim" not in condition(cluster, "ReferencesResolved")["message"], what="claim found")
    assert not children(cluster) and condition(cluster, "Ready")["reason"] == "MissingReference"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "data": {"HF_TOKEN": "eA=="}}
    await cluster.emulator.create_object(SECRETS, NAMESPACE, secret)
    found = await all_children(cluster)
    await wait_for(lambda: condition(cluster, "ReferencesResolved").get("status") == "True", what="resolved")
    container = found[("jobs", "demo-trainer")]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}, {"secretRef": {"name": "s3-keys"}}]


async def test_immutable_edits_are_refused_whole_and_mutable_ones_applied(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest())
    await all_children(cluster)

    def accepted():
        return yaml.safe_load(cluster.emulator.stored(CONFIGMAPS, NAMESPACE, "demo-config")["data"]["job.yaml"])["spec"]

    edit = {"spec": {"model": {"name": "Qwen/Qwen3-8B"}, "runPolicy": {"backoffLimit": 7}}}
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", edit)
    await wait_for(lambda: condition(cluster, "SpecApplied").get("reason") == "ImmutableFieldChanged", what="refused")
    assert "spec.model.name" in condition(cluster, "SpecApplied")["message"]
    assert accepted()["model"]["name"] == "Qwen/Qwen3-1.7B-Base" and accepted()["runPolicy"]["backoffLimit"] == 3
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"model": {"name": "Qwen/Qwen3-1.7B-Base"}}})
    await wait_for(lambda: accepted()["runPolicy"]["backoffLimit"] == 7, what="the mutable edit applied")
    await wait_for(lambda: condition(cluster, "SpecApplied").get("status") == "True", what="SpecApplied")


async def test_operator_killed_mid_reconcile_converges_without_duplicates_or_orphans(cluster, start_operator):
    """The API server creates the controller Deployment but the answer is lost (503), and the operator
    dies right then. A fresh operator must finish the job: no second object, nothing unowned, the
    same token (the controller and trainer already mounted it)."""
    await cluster.create_claim()
    broken = {"on": True}
    deployments = kmock.resource("apps/v1/deployments")
    lost = lambda request: broken["on"] and request.method == "POST" and request.resource == deployments  # noqa: E731
    cluster.emulator[lost] << kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="injected")
    first = await start_operator()
    job = await cluster.apply(job_manifest())
    await wait_for(
        lambda: first.operator.metrics.errors.labels("api_retryable")._value.get() >= 1, what="a lost create"
    )
    await first.stop()
    created = children(cluster)
    assert ("deployments", "demo-controller") in created and ("jobs", "demo-trainer") not in created
    secret = token(cluster)
    broken["on"] = False
    await start_operator()
    found = await all_children(cluster)
    await wait_for(phase_is(cluster, "Pending"), what="status written")
    assert token(cluster) == secret
    assert all(owner_uids(obj) == [job["metadata"]["uid"]] for obj in found.values())
    creates = Counter(
        (request.resource.plural, request.data["metadata"]["name"])
        for request in cluster.emulator[lambda request: request.method == "POST" and request.resource != JOBS]
    )
    assert creates.pop(("persistentvolumeclaims", "g2rpo-checkpoints")) == 1
    assert creates.pop(("secrets", "g2rpo-operator-token-key")) == 1  # the signing key, in the operator's namespace
    # The token Secret is never read back (tokens.py): each operator's first pass creates it, 409 once it exists.
    assert creates.pop(("secrets", "demo-token")) >= 1
    assert creates == dict.fromkeys(EXPECTED - {("secrets", "demo-token")}, 1)  # the lost create recognised


def _admission_needs(requests) -> set[tuple[str, str, str]]:
    """What the OwnerReferencesPermissionEnforcement plugin (tests/rbac_support.py) authorizes for the
    operator's writes: each create with ownerReferences, and each patch that names ownerReferences (taken
    as a change: KMock cannot say what the object held before)."""
    owners = {("g2rpo.dev", "G2RPOJob"): "g2rpojobs"}
    needs = set()
    for r in requests:
        body = r.data if isinstance(r.data, dict) else {}
        refs = (body.get("metadata") or {}).get("ownerReferences")
        if r.method not in ("POST", "PATCH", "PUT") or refs is None:
            continue
        obj = {**body, "metadata": {"name": r.name or body["metadata"].get("name"), **body["metadata"]}}
        old = None if r.method == "POST" else {"metadata": {"ownerReferences": []}}
        for check in owner_reference_checks(obj, r.resource.group, r.resource.plural, owners, old=old):
            needs.add((check.group, check.qualified, check.verb))
    return needs


def _verb(request) -> str:
    if request.method == "GET":
        return "get" if request.name else ("watch" if request.params.get("watch") == "true" else "list")
    return {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[request.method]


TOKEN_KEY_RULES = yaml.safe_load((ROOT / "manifests" / "rbac" / "token-key-role.yaml").read_text())["rules"]
"""The Role in the operator's namespace: get of the token signing key's Secret, by name, and create."""


def _granted(rules: list[dict] | None = None) -> set[tuple[str, str, str]]:
    """What the installed roles grant: the cluster-wide ClusterRole (manifests/, the chart's default) with
    the token key's Role, or `rules`."""
    if rules is None:
        rules = [
            *yaml.safe_load((ROOT / "manifests" / "rbac" / "cluster-role.yaml").read_text())["rules"],
            *TOKEN_KEY_RULES,
        ]
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _granted_in_namespaced_mode() -> set[tuple[str, str, str]]:
    """The chart's Role in each of `watchNamespaces`: the operator's rules plus namespaced peering."""
    rbac = ROOT / "charts" / "g2rpo" / "files" / "rbac"
    rules = [*yaml.safe_load((rbac / "operator-rules.yaml").read_text())]
    return _granted([*rules, *yaml.safe_load((rbac / "peering-namespaced.yaml").read_text())])


# Granted but not exercised against KMock: kopf's Events (off: KMock lacks generateName), peering
# (test_two_replicas_do_not_fight), and a PodGroup patched back, which only a full pass does
# (test_edits_no_watch_reports_are_undone_by_the_next_full_pass).
NOT_EXERCISED = {
    ("", "events", "create"),
    ("scheduling.volcano.sh", "podgroups", "patch"),
    ("", "events", "list"),  # only for a pod stuck in ContainerCreating: tests/test_operator_node_and_storage.py
    *(
        ("kopf.dev", kind, verb)
        for kind in ("clusterkopfpeerings", "kopfpeerings")
        for verb in ("get", "list", "watch", "patch", "create")
    ),
}


async def test_the_operator_uses_exactly_the_rbac_it_is_granted(cluster, start_operator):
    """Every request the operator makes over a whole lifecycle (volcano gang, restart, edit, suspend),
    and what the OwnerReferencesPermissionEnforcement admission plugin checks of each (the finalizers of
    the owning job), is allowed by manifests/rbac/cluster-role.yaml, and the role grants nothing else."""
    await start_operator()  # no claim: the operator creates it from checkpoint.volumeSize
    await cluster.apply(
        job_manifest(runPolicy={"backoffLimit": 2, "gangScheduler": "volcano"}, checkpoint={"volumeSize": "1Ti"})
    )
    await all_children(cluster)
    await wait_for(lambda: cluster.emulator.named(PODGROUPS, NAMESPACE), what="the PodGroup")
    # Edited by hand, patched back.
    await cluster.emulator.patch_object(SERVICES, NAMESPACE, "demo-rollout", {"spec": {"selector": {"a": "b"}}})
    await cluster.emulator.patch_object(NETWORK_POLICIES, NAMESPACE, "demo-rollout", {"spec": {"podSelector": None}})
    await wait_for(
        lambda: (
            cluster.emulator.stored(SERVICES, NAMESPACE, "demo-rollout")["spec"]["selector"].get("a") is None
            and cluster.emulator.stored(NETWORK_POLICIES, NAMESPACE, "demo-rollout")["spec"].get("podSelector")
        ),
        what="the edits undone",
    )
    await start_trainer(cluster)
    first = await fail_trainer(cluster)
    await wait_for(lambda: rollout_epoch(cluster) == "1", what="the gang epoch raised")
    await make_available(cluster, "demo-rollout")
    await wait_for(lambda: trainer_uid(cluster) not in (None, first), what="restart")
    await cluster.emulator.patch_object(
        JOBS, NAMESPACE, "demo", {"spec": {"runPolicy": {"backoffLimit": 3}, "suspend": True}}
    )
    await wait_for(phase_is(cluster, "Suspended"), what="suspended")
    await wait_for(
        lambda: cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["replicas"] == 0,
        what="scaled down",
    )
    operator_requests = cluster.emulator[
        lambda r: (
            r.resource is not None and r.resource.plural and not r.headers.get("User-Agent", "").startswith("kmock")
        )
    ]
    used = {
        (r.resource.group, r.resource.plural + (f"/{r.subresource}" if r.subresource else ""), _verb(r))
        for r in operator_requests
    } | _admission_needs(operator_requests)
    granted = _granted()
    assert used <= granted, f"not granted: {sorted(used - granted)}"
    assert granted - NOT_EXERCISED <= used, f"granted but never used: {sorted(granted - NOT_EXERCISED - used)}"
    # The one Secret read: the signing key, by the name its Role allows, in the operator's namespace.
    (key_rule,) = [rule for rule in TOKEN_KEY_RULES if rule.get("resourceNames")]
    secret_reads = {
        (r.namespace, r.name) for r in operator_requests if r.resource.plural == "secrets" and r.method != "POST"
    }
    assert secret_reads == {("g2rpo-system", name) for name in key_rule["resourceNames"]}


async def test_two_replicas_do_not_fight(cluster, start_operator):
    """kopf peering: the replica with the higher priority acts, the other stays paused."""
    await cluster.create_claim()
    leader = await start_operator(standalone=False, peering_priority=200)
    await wait_for(
        lambda: (cluster.emulator.stored(PEERINGS, None, "g2rpo-operator") or {}).get("status"),
        what="the leader's peering record",
    )
    follower = await start_operator(standalone=False, peering_priority=100)
    await asyncio.sleep(0.5)  # let the follower see the leader
    await cluster.apply(job_manifest())
    await all_children(cluster)
    await wait_for(phase_is(cluster, "Pending"), what="status")
    await asyncio.sleep(0.5)

    def count(op):
        return sum(
            sample.value
            for sample in op.operator.metrics.reconciles.collect()[0].samples
            if sample.name.endswith("_total")
        )

    assert count(leader) > 0 and count(follower) == 0


async def test_namespaced_mode_with_peering_reconciles_a_job(cluster, start_operator):
    """G2RPO_NAMESPACES with peering on: kopf keeps a KopfPeering in each watched namespace (the operator
    creates it at startup), leads through it, and reconciles the jobs of that namespace."""
    await cluster.create_claim()
    running = await start_operator(standalone=False, namespaces=(NAMESPACE,), peering_priority=100)
    await wait_for(
        lambda: (cluster.emulator.stored(NAMESPACED_PEERINGS, NAMESPACE, "g2rpo-operator") or {}).get("status"),
        what="the operator's namespaced peering record",
    )
    assert cluster.emulator.stored(PEERINGS, None, "g2rpo-operator") is None  # no cluster-wide object
    await cluster.apply(job_manifest())
    await all_children(cluster)
    await wait_for(lambda: cluster.status().get("phase") == "Pending", what="the job reconciled")
    requests = cluster.emulator[lambda r: r.resource is not None and r.resource.plural == "kopfpeerings"]
    used = {_verb(r) for r in requests if not r.headers.get("User-Agent", "").startswith("kmock")}
    granted = {verb for group, resource, verb in _granted_in_namespaced_mode() if resource == "kopfpeerings"}
    assert used and used <= granted, (used, granted)
    assert running.operator.metrics.tracked_jobs() == 1


async def test_the_kueue_integration_speaks_the_newest_version_kueue_serves(cluster, monkeypatch):
    """At startup (`python -m g2rpo_operator`) the operator picks the newest Kueue API version served:
    kopf resolves the kinds it watches once, so without Kueue it stops (and its pod restarts) until
    Kueue serves Workloads, instead of running blind to them."""
    import g2rpo_operator.__main__ as entry_point
    from g2rpo_operator.kueue import served_version

    api = KubeApi.for_url(cluster.url)
    spoken: list[str] = []

    def build(api, settings, registry):  # type: ignore[no-untyped-def]
        spoken.append(settings.kueue_api_version)
        raise SystemExit(0)

    monkeypatch.setenv("G2RPO_KUEUE_ENABLED", "true")
    monkeypatch.setattr(KubeApi, "from_environment", classmethod(lambda cls: api))
    monkeypatch.setattr(entry_point, "build", build)
    for gone in (None, "v1beta2", "v1beta1"):
        if gone:  # Kueue's CRDs stop serving a version (Workloads first: the group without the kind)
            for resource in (kueue_workloads(gone), kueue_flavors(gone)):
                del cluster.emulator.resources[resource]
        if gone != "v1beta1":
            with pytest.raises(SystemExit):
                await asyncio.to_thread(entry_point.main)
    assert spoken == ["v1beta2", "v1beta1"]
    with pytest.raises(
        SystemExit,
        match=r"serves no Kueue Workloads \(kueue\.x-k8s\.io/v1beta2, kueue\.x-k8s\.io/v1beta1\): install Kueue",
    ):
        await asyncio.to_thread(served_version, api)
    with pytest.raises(SystemExit, match="install Kueue"):
        await asyncio.to_thread(entry_point.main)
    assert len(spoken) == 2


def _posts(name: str, res: kmock.resource):
    return lambda request: (
        request.method == "POST"
        and request.resource == res
        and isinstance(request.data, dict)
        and request.data.get("metadata", {}).get("name") == name
    )


REFUSALS = [
    pytest.param(
        SERVICES,
        "demo-rollout",
        422,
        "Invalid",
        'admission webhook "services.policy.example.com" denied the request: a Service needs the label team',
        "Service 'demo-rollout' (HTTP 422)",
        id="422-webhook",
    ),
    pytest.param(
        NETWORK_POLICIES,
        "demo-controller",
        403,
        "Forbidden",
        'networkpolicies.networking.k8s.io is forbidden: User "system:serviceaccount:g2rpo-system:g2rpo" cannot '
        'create resource "networkpolicies" in API group "networking.k8s.io" in the namespace "default"',
        "NetworkPolicy 'demo-controller' (HTTP 403)",
        id="403-rbac",
    ),
]


@pytest.mark.parametrize("res, name, status, reason, message, names", REFUSALS)
async def test_a_refused_child_is_a_condition_retried_with_a_growing_delay(
    cluster, start_operator, monkeypatch, res, name, status, reason, message, names
):
    """The API server refuses one child: the status names it and the server's message (ChildrenSynced and
    Ready), nothing that comes after it in creation order is created (it would mount, guard or join
    it), the pass is retried with a doubling delay, not in a loop, and goes on once the cause is fixed."""
    from g2rpo_operator import handlers

    monkeypatch.setattr(handlers, "REFUSED_FIRST_DELAY", 0.25)
    monkeypatch.setattr(handlers, "REFUSED_MAX_DELAY", 2.0)
    await cluster.create_claim()
    refused = cluster.emulator.refuse(_posts(name, res), status, reason, message)
    await start_operator()
    await cluster.apply(job_manifest())
    await wait_for(lambda: condition(cluster, "ChildrenSynced").get("status") == "False", what="ChildrenSynced False")
    synced, ready = condition(cluster, "ChildrenSynced"), condition(cluster, "Ready")
    assert synced["reason"] == ready["reason"] == "APIRefused"
    assert f"the API server refused to create {names}: {message}" in synced["message"], synced["message"]
    assert ready["message"] == synced["message"]
    await asyncio.sleep(6.0)
    created = children(cluster)
    assert (res.plural, name) not in created and ("deployments", "demo-rollout") not in created
    gaps = [later - earlier for earlier, later in itertools.pairwise(refused)]
    # Delays 0.25, 0.5, 1, 2, 2 s (a watch event may bring a pass earlier): retried, but no loop, which
    # would try again at every 0.2 s poll, and no fixed slow retry, which would try once or twice.
    assert 3 <= len(refused) <= 10 and gaps[-1] >= 1.0, gaps
    cluster.emulator.refusals.clear()
    await wait_for(lambda: condition(cluster, "ChildrenSynced").get("status") == "True", timeout=10, what="synced")
    await all_children(cluster)
    assert condition(cluster, "ChildrenSynced")["reason"] == "Synced"


async def test_manual_edits_of_watched_children_are_undone_at_once(cluster, start_operator):
    """A Service and a NetworkPolicy edited by hand (a selector, a widened peer) are brought back by the
    pass their watch event wakes (no resync here)."""
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest())
    rendered = await children_before_trainer(cluster)
    service = rendered[("services", "demo-controller")]
    policy = rendered[("networkpolicies", "demo-rollout")]
    widened = copy.deepcopy(policy["spec"]["ingress"])
    widened[0]["from"][0]["namespaceSelector"] = {}  # the trainer pods of every namespace
    edits = [
        (SERVICES, "demo-controller", {"spec": {"selector": {"app.kubernetes.io/component": "rollout"}}}),
        (NETWORK_POLICIES, "demo-rollout", {"spec": {"ingress": widened}}),
    ]
    for res, name, patch in edits:
        await cluster.emulator.patch_object(res, NAMESPACE, name, patch)
    stored = lambda res, name: cluster.emulator.stored(res, NAMESPACE, name)  # noqa: E731
    await wait_for(
        lambda: stored(SERVICES, "demo-controller")["spec"]["selector"] == service["spec"]["selector"],
        what="the Service's selector back",
    )
    await wait_for(
        lambda: stored(NETWORK_POLICIES, "demo-rollout")["spec"] == policy["spec"], what="the policy narrowed again"
    )
    patches = cluster.emulator[lambda r: r.method == "PATCH" and r.resource in (SERVICES, NETWORK_POLICIES)]
    await asyncio.sleep(0.5)
    assert len(cluster.emulator[lambda r: r.method == "PATCH" and r.resource in (SERVICES, NETWORK_POLICIES)]) == len(
        patches
    ), "patched again once back in its desired state"


async def test_edits_no_watch_reports_are_undone_by_the_next_full_pass(cluster, start_operator):
    """PodGroups are not watched (Volcano may not be installed), and a child that lost the managed-by
    label drops out of the label-filtered watches: a full pass (settings.resync_seconds, and the first
    pass after a restart) brings the gang size and the label back."""
    await cluster.create_claim()
    await start_operator(resync_seconds=0.5)
    await cluster.apply(job_manifest(runPolicy={"gangScheduler": "volcano"}))
    await wait_for(lambda: cluster.emulator.named(PODGROUPS, NAMESPACE), what="the PodGroup")
    await children_before_trainer(cluster)
    await cluster.emulator.patch_object(PODGROUPS, NAMESPACE, "demo-gang", {"spec": {"minMember": 1}})
    unlabelled = {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}}
    await cluster.emulator.patch_object(SERVICES, NAMESPACE, "demo-trainer", unlabelled)
    await wait_for(
        lambda: cluster.emulator.stored(PODGROUPS, NAMESPACE, "demo-gang")["spec"]["minMember"] == 3,
        what="minMember = trainer.replicas + 1 again",
    )
    await wait_for(
        lambda: (
            cluster.emulator.stored(SERVICES, NAMESPACE, "demo-trainer")["metadata"]["labels"].get(
                "app.kubernetes.io/managed-by"
            )
            == "g2rpo-operator"
        ),
        what="the managed-by label back",
    )


async def test_a_settings_change_reaches_the_policies_and_the_queued_workload(cluster, start_operator):
    """An operator restarted with other settings brings the children to them on its first pass (a full
    one); a Workload's spec only until Kueue reserves quota (its webhook refuses pod-set edits then)."""
    await cluster.create_claim()
    first = await start_operator(kueue_enabled=True, kueue_queue="gpu", operator_namespace="g2rpo-system")
    await cluster.apply(job_manifest(runPolicy={"gangScheduler": "kueue"}))
    workload = await wait_for(lambda: _workload(cluster), what="the Workload")
    assert workload["spec"]["queueName"] == "gpu"
    counts = lambda: [p["count"] for p in _workload(cluster)["spec"]["podSets"]]  # noqa: E731
    await cluster.emulator.patch_object(WORKLOADS, NAMESPACE, "demo-gang", {"spec": {"podSets": []}})
    await wait_for(lambda: counts() == [1, 2], what="the pod sets back (a watched kind)")
    await first.stop()

    await start_operator(kueue_enabled=True, kueue_queue="gpu-2", operator_namespace="ops", resync_seconds=0.5)
    await wait_for(lambda: _workload(cluster)["spec"]["queueName"] == "gpu-2", what="the new default queue")
    policy = lambda: cluster.emulator.stored(NETWORK_POLICIES, NAMESPACE, "demo-controller")  # noqa: E731
    await wait_for(
        lambda: (
            {"kubernetes.io/metadata.name": "ops"}
            in [peer.get("namespaceSelector", {}).get("matchLabels") for peer in policy()["spec"]["ingress"][0]["from"]]
        ),
        what="the controller's policy admitting the operator's new namespace",
    )
    await cluster.emulator.patch_object(WORKLOADS, NAMESPACE, "demo-gang", _kueue_admits(cluster), status=True)
    await cluster.emulator.patch_object(
        WORKLOADS, NAMESPACE, "demo-gang", {"spec": {"podSets": _workload(cluster)["spec"]["podSets"][:1]}}
    )
    await asyncio.sleep(1.5)  # three full passes
    assert counts() == [1], "a reserved Workload's pod sets are immutable: never patched"
