"""manifests/: every document schema-valid for Kubernetes (kubernetes-validate --strict: unknown fields
fail), the example job valid against the CRD and runnable by the operator, RBAC without wildcards."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from g2rpo.api.spec import parse_job
from g2rpo_operator.admission import validate
from g2rpo_operator.builders import JobContext
from g2rpo_operator.builders.storage import checkpoint_claim
from g2rpo_operator.settings import OperatorSettings

from operator_fixtures import crd_json_schema

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
EXAMPLE = MANIFESTS / "examples" / "g2rpojob.yaml"
KUBE_VERSION = "1.30"


def kustomize_resources() -> list[dict]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return [
        doc for path in kustomization["resources"] for doc in yaml.safe_load_all((MANIFESTS / path).read_text()) if doc
    ]


def test_every_installed_document_is_schema_valid():
    documents = kustomize_resources()
    assert {d["kind"] for d in documents} >= {"CustomResourceDefinition", "ClusterRole", "Deployment", "ServiceAccount"}
    for document in documents:
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_same_documents():
    built = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)], check=True, capture_output=True, text=True).stdout
    names = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(built)}
    assert names == {(d["kind"], d["metadata"]["name"]) for d in kustomize_resources()}


def test_example_job_is_valid_for_the_crd_the_model_and_the_operator():
    lines = EXAMPLE.read_text().splitlines()
    assert lines[0] == "# kubectl apply -n default -f manifests/examples/g2rpojob.yaml"
    (job,) = list(yaml.safe_load_all(EXAMPLE.read_text()))
    jsonschema.Draft4Validator(crd_json_schema()).validate(job)
    spec = parse_job(job).spec
    assert validate(job["metadata"]["name"], job["spec"])[1] == []
    # The operator creates the claim: ReadWriteMany on a named RWX class (the clouds' defaults are RWO).
    claim = checkpoint_claim(JobContext.resolve(job["metadata"]["name"], "default", spec, OperatorSettings()))
    kubernetes_validate.validate(claim, KUBE_VERSION, strict=True)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "efs-sc"
    assert all(name in EXAMPLE.read_text() for name in ("efs-sc", "standard-rwx", "azurefile-csi", "cephfs"))
    assert spec.trainer.gpus_per_replica + spec.rollout.gpus == 8  # the paper's 8 A100s
    assert (spec.training.num_generations, spec.guidance.ratio, spec.guidance.initial_length) == (12, 0.25, 3072)


def test_rbac_has_no_wildcards_and_never_reads_secrets():
    """Secrets are only created (tokens.py); the one read is the signing key's get, by name."""
    roles = [d for d in kustomize_resources() if d["kind"] in ("ClusterRole", "Role")]
    for rule in (rule for role in roles for rule in role["rules"]):
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["create"] or (rule["verbs"] == ["get"] and rule["resourceNames"]), rule
    binding = next(d for d in kustomize_resources() if d["kind"] == "ClusterRoleBinding")
    deployment = next(d for d in kustomize_resources() if d["kind"] == "Deployment")
    assert binding["subjects"][0]["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]


def test_operator_deployment_is_locked_down_and_probed():
    deployment = next(d for d in kustomize_resources() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    ports = {p["name"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["port"] in ports and "metrics" in ports
    assert container["command"] == ["python", "-m", "g2rpo_operator"]
