"""The real operator (kopf + g2rpo_operator) against KMock, the sanctioned fake of the Kubernetes API
server (tests/kmock_support.py says what it emulates). Nothing else is faked: the guidance
controller is the real service, reached over HTTP with the token the operator generated, and the
trainer's reports go through the trainer's real client. Kubernetes' own controllers do not exist
here, so the tests play them: they set Deployment and Job status and create the trainer's pods.
"""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from pathlib import Path

import aiohttp
import kmock
import pytest
import yaml
from g2rpo.controller.http_client import HttpGuidanceClient
from g2rpo.controller.service import GuidanceService, ServiceConfig, start_server
from g2rpo.guidance.schedule import ScheduleParams
from g2rpo.spec import parse_spec
from kmock_support import (
    BATCH_JOBS,
    CHILD_RESOURCES,
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    PEERINGS,
    PODGROUPS,
    PODS,
    SECRETS,
    free_port,
    wait_for,
)
from operator_fixtures import NAMESPACE, Cluster, cluster, job_manifest, start_operator  # noqa: F401 (fixtures)

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    ("configmaps", "demo-config"),
    ("secrets", "demo-token"),
    ("services", "demo-controller"),
    ("services", "demo-rollout"),
    ("services", "demo-trainer"),
    ("deployments", "demo-controller"),
    ("deployments", "demo-rollout"),
    ("jobs", "demo-trainer"),
}


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


async def all_children(cluster: Cluster) -> dict[tuple[str, str], dict]:
    def complete() -> dict | None:
        found = children(cluster)
        return found if set(found) == EXPECTED else None

    return await wait_for(complete, what="all children")


async def make_available(cluster: Cluster, *deployments: str) -> None:
    for name in deployments:
        await cluster.emulator.patch_object(
            DEPLOYMENTS, NAMESPACE, name, {"status": {"availableReplicas": 1}}, status=True
        )


async def start_trainer(cluster: Cluster, replicas: int = 2) -> None:
    await cluster.emulator.patch_object(
        BATCH_JOBS, NAMESPACE, "demo-trainer", {"status": {"active": replicas}}, status=True
    )


async def fail_trainer(cluster: Cluster, exit_code: int = 137, reason: str = "OOMKilled") -> str:
    """What the Job controller and kubelet do when rank 0 dies: a Failed pod, then a Failed Job."""
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
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "reason": reason}}}
            ],
        },
    }
    await cluster.emulator.create_object(PODS, NAMESPACE, pod)
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
    await wait_for(phase_is(cluster, "Pending"), what="phase Pending")
    assert condition(cluster, "Ready")["reason"] == "Waiting"
    async with aiohttp.ClientSession() as http:
        async with http.get(running.health_url) as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            text = await response.text()
    assert 'g2rpo_operator_jobs{phase="Pending"} 1.0' in text
    assert 'g2rpo_operator_reconciles_total{result="ok",trigger="timer"}' in text


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


async def test_failed_trainer_restarts_from_checkpoint_then_fails_past_the_budget(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(runPolicy={"backoffLimit": 1}))
    await all_children(cluster)
    await start_trainer(cluster)
    first = await fail_trainer(cluster)
    await wait_for(lambda: cluster.status().get("restarts") == 1, what="one restart")
    assert condition(cluster, "Ready")["reason"] == "Restarting"
    replaced = lambda: (
        (j := cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")) and j["metadata"]["uid"] != first
    )  # noqa: E731
    await wait_for(replaced, what="a new trainer Job")
    assert not cluster.emulator.named(PODS, NAMESPACE), "the failed attempt's pods go with its Job"
    second = await fail_trainer(cluster, exit_code=1, reason="Error")
    await wait_for(phase_is(cluster, "Failed"), what="phase Failed")
    failed = condition(cluster, "Failed")
    assert failed["reason"] == "TrainerFailed" and "exited with code 1 (Error)" in failed["message"]
    assert cluster.status()["restarts"] == 1 and cluster.status()["completionTime"]
    await asyncio.sleep(0.5)  # several resyncs: a failed job is never restarted again
    assert cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")["metadata"]["uid"] == second
    assert cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["replicas"] == 0


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
    for name in ("demo-controller", "demo-rollout"):
        assert cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, name)["spec"]["replicas"] == 0
    assert "startTime" not in cluster.status() and condition(cluster, "Suspended")["status"] == "True"
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"suspend": False}})
    await wait_for(lambda: cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer"), what="trainer recreated")
    await wait_for(
        lambda: cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["replicas"] == 1,
        what="scaled up",
    )
    await start_trainer(cluster)
    await wait_for(phase_is(cluster, "Running"), what="phase Running again")


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
    await cluster.apply(job_manifest(envFromSecret="hf-token"))
    await wait_for(lambda: condition(cluster, "ReferencesResolved").get("status") == "False", what="MissingReference")
    message = condition(cluster, "ReferencesResolved")["message"]
    assert (
        "'g2rpo-checkpoints' (spec.checkpoint.volumeClaim)" in message and "'hf-token' (spec.envFromSecret)" in message
    )
    await cluster.create_claim()
    await wait_for(lambda: "volumeClaim" not in condition(cluster, "ReferencesResolved")["message"], what="claim found")
    assert not children(cluster) and condition(cluster, "Ready")["reason"] == "MissingReference"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "data": {"HF_TOKEN": "eA=="}}
    await cluster.emulator.create_object(SECRETS, NAMESPACE, secret)
    found = await all_children(cluster)
    await wait_for(lambda: condition(cluster, "ReferencesResolved").get("status") == "True", what="resolved")
    container = found[("jobs", "demo-trainer")]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]


async def test_immutable_edits_are_refused_whole_and_mutable_ones_applied(cluster, start_operator):
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest())
    await all_children(cluster)
    accepted = lambda: yaml.safe_load(
        cluster.emulator.stored(CONFIGMAPS, NAMESPACE, "demo-config")["data"]["job.yaml"]
    )["spec"]  # noqa: E731
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
    assert creates == {child: 1 for child in EXPECTED}  # the lost create was recognised, never repeated


def _verb(request) -> str:
    if request.method == "GET":
        return "get" if request.name else ("watch" if request.params.get("watch") == "true" else "list")
    return {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[request.method]


def _granted() -> set[tuple[str, str, str]]:
    role = yaml.safe_load((ROOT / "manifests" / "rbac" / "cluster-role.yaml").read_text())
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# Granted but not exercised against KMock: kopf's Events (off: KMock lacks generateName), peering
# (test_two_replicas_do_not_fight), and the finalizers permission an admission plugin checks.
NOT_EXERCISED = {
    ("", "events", "create"),
    ("g2rpo.dev", "g2rpojobs/finalizers", "update"),
    *(("kopf.dev", "clusterkopfpeerings", verb) for verb in ("get", "list", "watch", "patch", "create")),
}


async def test_the_operator_uses_exactly_the_rbac_it_is_granted(cluster, start_operator):
    """Every request the operator makes over a whole lifecycle (volcano gang, restart, edit, suspend)
    is allowed by manifests/rbac/cluster-role.yaml, and the role grants nothing it does not use."""
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(runPolicy={"backoffLimit": 2, "gangScheduler": "volcano"}))
    await all_children(cluster)
    await wait_for(lambda: cluster.emulator.named(PODGROUPS, NAMESPACE), what="the PodGroup")
    await make_available(cluster, "demo-controller", "demo-rollout")
    await start_trainer(cluster)
    first = await fail_trainer(cluster)
    await wait_for(
        lambda: (j := cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer")) and j["metadata"]["uid"] != first,
        what="restart",
    )
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
    }
    granted = _granted()
    assert used <= granted, f"not granted: {sorted(used - granted)}"
    assert granted - NOT_EXERCISED <= used, f"granted but never used: {sorted(granted - NOT_EXERCISED - used)}"


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
    count = lambda op: sum(
        sample.value for sample in op.operator.metrics.reconciles.collect()[0].samples if sample.name.endswith("_total")
    )  # noqa: E731
    assert count(leader) > 0 and count(follower) == 0
