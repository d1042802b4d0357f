"""The chart's RBAC, in both modes (cluster-wide ClusterRole; a Role per watched namespace), with and
without the Kueue integration, grants every request a real API server would authorize for the
children the operator creates: the create itself, and what the OwnerReferencesPermissionEnforcement
admission plugin checks of the ownerReference each child carries (tests/rbac_support.py ports the
plugin and RBAC's matching from kubernetes/kubernetes).

The children come from the operator's own builders for specs that reach every kind (the default job,
Volcano, Kueue admitted, suspended, envFromSecret, a claim created from volumeSize), owned exactly as
the reconciler owns them (kopf.append_owner_reference, Reconciler._create): a new child kind, or a
new owner, is checked without anyone listing it here. A test of the check itself shows it fails on
the rules the plugin would refuse.
"""

from __future__ import annotations

import ast
import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kopf import append_owner_reference
from rbac_support import Grants, Manifest, Request, owner_reference_checks

from g2rpo.api.crd import render_crd
from g2rpo.api.spec import API_GROUP, API_VERSION, KIND, parse_spec
from g2rpo_operator.builders import ADMITTED_ANYWHERE, JobContext, children
from g2rpo_operator.builders.storage import checkpoint_claim
from g2rpo_operator.kube import resource_of
from g2rpo_operator.settings import OperatorSettings

from operator_fixtures import job_manifest

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "g2rpo"
BUILDERS = ROOT / "operator" / "g2rpo_operator" / "builders" / "__init__.py"
HELM = shutil.which("helm", path=f"{ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
RELEASE_NAMESPACE = "g2rpo-system"
ACCOUNT = "g2rpo-operator"
CRD = render_crd()
OWNER_PLURALS = {(CRD["spec"]["group"], CRD["spec"]["names"]["kind"]): CRD["spec"]["names"]["plural"]}
"""The RESTMapper's answer for the one owner kind, read from the CRD the cluster serves."""

pytestmark = pytest.mark.skipif(HELM is None, reason="helm not found: `make tools` installs it into .tools/bin")

SPECS = {
    "default": {},
    "volcano": {"runPolicy": {"gangScheduler": "volcano"}},
    "kueue": {"runPolicy": {"gangScheduler": "kueue", "queue": "team-a"}},
    "suspended": {"suspend": True},
    "env-from-secret": {"envFromSecret": "hf-token"},
    "claim-from-size": {"checkpoint": {"volumeSize": "1Ti"}},
    "single-node": {"trainer": {"replicas": 1, "gpusPerReplica": 8}},
}


def owner(namespace: str) -> Manifest:
    """The G2RPOJob as the API server returns it (uid set), which the reconciler owns children by."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": "qwen", "namespace": namespace, "uid": "0b5e3c1e-6f8d-4a58-9a1c-2f7b1d2c3e4f"},
    }


def created(namespace: str, spec: dict, kueue: bool) -> list[Manifest]:
    """Every object the operator creates for the job: its children, owned as Reconciler._create owns
    them, and the checkpoint claim (created from volumeSize, deliberately unowned)."""
    raw = job_manifest("qwen", **spec)["spec"]
    ctx = JobContext.resolve("qwen", namespace, parse_spec(raw), OperatorSettings(kueue_enabled=kueue))
    job = owner(namespace)
    objects = []
    for manifest in children(ctx, "token", active=not ctx.spec.suspend, admitted=ADMITTED_ANYWHERE):
        append_owner_reference(manifest, owner=job)  # type: ignore[arg-type]  # as in Reconciler._create
        objects.append(manifest)
    if ctx.spec.checkpoint.volume_size:
        objects.append(checkpoint_claim(ctx))
    return objects


def needed(obj: Manifest) -> list[Request]:
    """What the API server authorizes to create `obj`: the create, then the admission plugin's checks."""
    res = resource_of(obj)
    namespace = obj["metadata"]["namespace"]
    return [
        Request("create", res.group, res.plural, namespace, why=f"create {obj['kind']} {obj['metadata']['name']}"),
        *owner_reference_checks(obj, res.group, res.plural, OWNER_PLURALS),
    ]


def grants(*values: str) -> Grants:
    done = subprocess.run(
        [HELM, "template", "g2rpo", str(CHART), "--namespace", RELEASE_NAMESPACE, *values],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return Grants.rendered([d for d in yaml.safe_load_all(done.stdout) if d], ACCOUNT, RELEASE_NAMESPACE)


MODES = {
    "cluster-wide": ([], "ml"),
    "cluster-wide+kueue": (["--set", "kueue.enabled=true"], "ml"),
    "namespaced": (["--set", "watchNamespaces={team-a,team-b}"], "team-b"),
    "namespaced+kueue": (["--set", "watchNamespaces={team-a}", "--set", "kueue.enabled=true"], "team-a"),
}


@pytest.mark.parametrize("mode", MODES)
def test_the_rbac_grants_what_creating_each_child_needs(mode):
    values, namespace = MODES[mode]
    granted = grants(*values)
    kueue = "kueue.enabled=true" in values
    refused = [
        f"{case}: {request}"
        for case, spec in SPECS.items()
        if kueue or spec.get("runPolicy", {}).get("gangScheduler") != "kueue"
        for obj in created(namespace, spec, kueue)
        for request in needed(obj)
        if not granted.allows(request)
    ]
    assert not refused, "the API server would refuse:\n" + "\n".join(refused)


def declared_child_kinds() -> set[str]:
    """The kinds builders._plan can create: the first argument of each `_Child(...)` in its source."""
    tree = ast.parse(BUILDERS.read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "_Child"
        and isinstance(node.args[0], ast.Constant)
    }


def test_the_specs_reach_every_kind_the_builders_create():
    """A new child kind that none of SPECS reaches fails here, rather than escaping the RBAC check."""
    reached = {obj["kind"] for spec in SPECS.values() for obj in created("ml", spec, kueue=True)}
    assert declared_child_kinds() <= reached, f"no spec creates {sorted(declared_child_kinds() - reached)}"
    assert "PersistentVolumeClaim" in reached


def test_every_owned_child_blocks_its_owners_deletion():
    """The reason for the finalizers permission: each owner reference the reconciler writes carries
    blockOwnerDeletion (foreground deletion of the job waits for its children)."""
    for obj in created("ml", SPECS["volcano"], kueue=False):
        if obj["kind"] == "PersistentVolumeClaim":
            assert "ownerReferences" not in obj["metadata"]  # the claim outlives the job
            continue
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["blockOwnerDeletion"] is True and ref["controller"] is True and ref["kind"] == KIND


def test_the_check_refuses_what_the_admission_plugin_refuses():
    """The check can fail: without g2rpojobs/finalizers the plugin refuses every owned child; an update
    that changes ownerReferences (an adoption) needs delete on the object, a create does not."""
    granted = grants()
    no_finalizers = Grants(
        tuple(r for r in granted.cluster if "g2rpojobs/finalizers" not in r["resources"]), granted.by_namespace
    )
    configmap = next(o for o in created("ml", {}, kueue=False) if o["kind"] == "ConfigMap")
    assert all(granted.allows(r) for r in needed(configmap))
    assert not all(no_finalizers.allows(r) for r in needed(configmap))

    unowned = copy.deepcopy(configmap)
    del unowned["metadata"]["ownerReferences"]
    adoption = owner_reference_checks(configmap, "", "configmaps", OWNER_PLURALS, old=unowned)
    assert [(r.verb, r.qualified) for r in adoption] == [("delete", "configmaps"), ("update", "g2rpojobs/finalizers")]
    assert not granted.allows(adoption[0])  # the operator never adopts: it needs no delete on ConfigMaps
    same = owner_reference_checks(configmap, "", "configmaps", OWNER_PLURALS, old=configmap)
    assert same == []  # a patch that leaves ownerReferences alone is not checked at all

    namespaced = grants("--set", "watchNamespaces={team-a}")
    elsewhere = next(o for o in created("team-b", {}, kueue=False) if o["kind"] == "ConfigMap")
    assert not any(namespaced.allows(r) for r in needed(elsewhere))  # a Role grants only in its namespace


@pytest.mark.parametrize("mode", MODES)
def test_the_operator_can_read_no_secret_but_its_signing_key(mode):
    """No rule lets the operator read a Secret's data (get, list, watch, and patch, update or delete,
    whose answers carry the object), in a job's namespace or its own, but the token signing key's, by
    name (g2rpo_operator/tokens.py); it may create Secrets (the job tokens, the key)."""
    values, namespace = MODES[mode]
    granted = grants(*values)
    key = "g2rpo-operator-token-key"  # the chart's G2RPO_TOKEN_KEY_SECRET (tests/test_chart.py)
    for where in (namespace, RELEASE_NAMESPACE):
        for verb in ("get", "list", "watch", "patch", "update", "delete"):
            assert not granted.allows(Request(verb, "", "secrets", where, "hf-token")), (verb, where)
        assert granted.allows(Request("create", "", "secrets", where))
    assert granted.allows(Request("get", "", "secrets", RELEASE_NAMESPACE, key))
    assert not granted.allows(Request("get", "", "secrets", namespace, key))  # only in its own namespace
