"""The operator's flows against a real Kubernetes cluster: skipped unless KUBECONFIG points at one.

The same flows as tests/test_operator_kmock.py where a cluster without GPUs allows them: apply ->
children with owners and labels, suspend/resume, an invalid spec, an operator killed mid-reconcile,
and delete -> children removed by the real garbage collector. (Rollout pods stay Pending without
A100 nodes, so the trainer Job, which waits for an Available rollout, is never created here; the
flows that need running pods are KMock-only.) The test claim asks for ReadWriteMany, as every job's claim
must (the operator creates nothing for a ReadWriteOnce one); a cluster without an RWX class leaves it
Pending, which is reported (StorageReady ClaimNotBound) but blocks nothing.
Everything happens in a fresh namespace, removed afterwards; the operator watches only it.
Needs kubectl and permission to install the CRD.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from g2rpo_operator.kube import KubeApi
from g2rpo_operator.settings import OperatorSettings

from operator_fixtures import CLAIM, RunningOperator, job_manifest, launch

ROOT = Path(__file__).resolve().parents[1]
KINDS = "configmaps,secrets,services,deployments,jobs.batch,networkpolicies.networking.k8s.io"
BEFORE_TRAINER = 10
"""ConfigMap, Secret, 3 NetworkPolicies, 3 Services, 2 Deployments."""


def _reachable() -> bool:
    if not os.environ.get("KUBECONFIG") or shutil.which("kubectl") is None:
        return False
    probe = subprocess.run(["kubectl", "version", "--request-timeout=5s"], capture_output=True)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not _reachable(), reason="no reachable cluster (set KUBECONFIG to run these)"),
]


def kubectl(*args: str, document: Any = None) -> str:
    stdin = yaml.safe_dump(document) if document is not None else None
    return subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, check=True).stdout


def wait_until(check, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while (value := check()) is None or value is False:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)
    return value


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    kubectl("apply", "-f", str(ROOT / "manifests" / "crd" / "g2rpojob.yaml"))
    kubectl("wait", "--for=condition=established", "--timeout=60s", "crd/g2rpojobs.g2rpo.dev")
    name = f"g2rpo-test-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM, "namespace": name},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    kubectl("apply", "-f", "-", document=claim)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def start(namespace: str) -> RunningOperator:
    settings = OperatorSettings(
        namespaces=(namespace,),
        operator_namespace=namespace,  # the token signing key goes there too
        standalone=True,
        resync_seconds=5.0,
        poll_seconds=1.0,
    )
    return launch(KubeApi.from_environment(), settings)


@pytest.fixture
def operator(namespace: str) -> Iterator[RunningOperator]:
    running = start(namespace)
    yield running
    asyncio.run(running.stop())


def apply(namespace: str, name: str, **spec: Any) -> dict:
    manifest = job_manifest(name, **{"trainer": {"replicas": 1, "gpusPerReplica": 8}, **spec})
    manifest["metadata"]["namespace"] = namespace
    kubectl("apply", "-f", "-", document=manifest)
    return json.loads(kubectl("get", "g2rpojob", name, "-n", namespace, "-o", "json"))


def children(namespace: str, name: str) -> dict[tuple[str, str], dict]:
    listed = json.loads(
        kubectl("get", KINDS, "-n", namespace, "-l", f"app.kubernetes.io/instance={name}", "-o", "json")
    )
    return {(item["kind"], item["metadata"]["name"]): item for item in listed["items"]}


def status(namespace: str, name: str) -> dict:
    return json.loads(kubectl("get", "g2rpojob", name, "-n", namespace, "-o", "json")).get("status") or {}


def all_children(namespace: str, name: str) -> dict:
    """Every child the job has while its rollout is not Available (no GPU here): all but the trainer Job."""

    def complete() -> dict | None:
        found = children(namespace, name)
        return found if len(found) == BEFORE_TRAINER else None

    found = wait_until(complete, what=f"{BEFORE_TRAINER} children")
    assert ("Job", f"{name}-trainer") not in found
    return found


def ready_reason(namespace: str, name: str) -> str | None:
    return next((c["reason"] for c in status(namespace, name).get("conditions", []) if c["type"] == "Ready"), None)


def test_apply_creates_owned_children_and_delete_removes_them(namespace, operator):
    job = apply(namespace, "apply")
    found = all_children(namespace, "apply")
    for obj in found.values():
        refs = obj["metadata"]["ownerReferences"]
        assert [r["uid"] for r in refs if r.get("controller")] == [job["metadata"]["uid"]]
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "g2rpo-operator"
    wait_until(lambda: status(namespace, "apply").get("phase") == "Pending", what="phase Pending")
    # No A100 here: the rollout pod is Unschedulable (the scheduler's message) or waits to become Available.
    wait_until(lambda: ready_reason(namespace, "apply") in ("Unschedulable", "WaitingForRollout"), what="why")
    kubectl("delete", "g2rpojob", "apply", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_until(lambda: not children(namespace, "apply"), what="garbage collection")


def test_suspend_and_resume(namespace, operator):
    apply(namespace, "pause")
    all_children(namespace, "pause")
    kubectl("patch", "g2rpojob", "pause", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    wait_until(lambda: status(namespace, "pause").get("phase") == "Suspended", what="Suspended")
    rollout = ("Deployment", "pause-rollout")
    wait_until(lambda: children(namespace, "pause")[rollout]["spec"]["replicas"] == 0, what="scaled to zero")
    kubectl("patch", "g2rpojob", "pause", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    wait_until(lambda: children(namespace, "pause")[rollout]["spec"]["replicas"] == 1, what="scaled back up")


def test_invalid_spec_creates_nothing(namespace, operator):
    apply(namespace, "bad", rollout={"gpus": 2, "tensorParallelSize": 4})
    wait_until(lambda: status(namespace, "bad").get("phase") == "Failed", what="Failed")
    valid = next(c for c in status(namespace, "bad")["conditions"] if c["type"] == "SpecValid")
    assert valid["reason"] == "InvalidSpec" and valid["message"].startswith("spec.rollout:")
    assert not children(namespace, "bad")


def test_restart_mid_reconcile_converges(namespace):
    first = start(namespace)
    job = apply(namespace, "crash")
    wait_until(lambda: children(namespace, "crash"), what="a first child")
    asyncio.run(first.stop())
    second = start(namespace)
    try:
        found = all_children(namespace, "crash")
        assert all(
            [r["uid"] for r in obj["metadata"]["ownerReferences"]] == [job["metadata"]["uid"]] for obj in found.values()
        )
    finally:
        asyncio.run(second.stop())
