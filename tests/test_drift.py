"""drift.py: which fields of a live child a pass writes back, per kind (pure; tests/test_operator_kmock.py
runs it against KMock).

The live objects here carry what a real API server adds to what the operator sent: Service defaults
and an allocated clusterIP (kubernetes pkg/apis/core/v1/defaults.go SetDefaults_Service, the
ClusterIP allocator), a Workload's `active` default and Kueue's status; KMock stores what it is sent.
"""

from __future__ import annotations

import copy

import pytest

from g2rpo.api.spec import parse_spec
from g2rpo_operator.builders import JobContext, children
from g2rpo_operator.builders.common import GANG_EPOCH_ANNOTATION
from g2rpo_operator.drift import drift_patch, matches
from g2rpo_operator.settings import OperatorSettings

from operator_fixtures import job_manifest

SETTINGS = OperatorSettings(kueue_enabled=True, kueue_queue="gpu")


def rendered(gang: str | None = None, settings: OperatorSettings = SETTINGS) -> dict[tuple[str, str], dict]:
    spec = job_manifest()["spec"]
    if gang:
        spec["runPolicy"] = {"gangScheduler": gang}
    ctx = JobContext.resolve("demo", "default", parse_spec(spec), settings)
    return {(child["kind"], child["metadata"]["name"]): child for child in children(ctx, token="t", active=True)}


def as_stored(child: dict) -> dict:
    """The child as a real API server keeps it: its defaults and allocations added."""
    live = copy.deepcopy(child)
    live["metadata"].update({"uid": "u", "resourceVersion": "7", "ownerReferences": [{"uid": "job"}]})
    if child["kind"] == "Service":
        spec = live["spec"]
        if spec.get("clusterIP") != "None":
            spec["clusterIP"] = spec["clusterIPs"] = "10.96.0.12"
            spec["clusterIPs"] = ["10.96.0.12"]
        spec.update(
            type="ClusterIP",
            sessionAffinity="None",
            ipFamilies=["IPv4"],
            ipFamilyPolicy="SingleStack",
            internalTrafficPolicy="Cluster",
        )
    if child["kind"] == "Workload":  # through Kueue's webhooks: typed structs, empty fields omitted
        live = omit_empty(live)
        live["spec"]["active"] = True
    return live


def omit_empty(value):
    if isinstance(value, dict):
        return {key: omit_empty(item) for key, item in value.items() if item not in ({}, [], None)}
    if isinstance(value, list):
        return [omit_empty(item) for item in value]
    return value


def test_children_as_the_api_server_stores_them_need_no_patch():
    for gang in (None, "volcano", "kueue"):
        for key, child in rendered(gang).items():
            assert drift_patch(as_stored(child), child) is None, key


def test_a_service_gets_its_selector_and_ports_back_never_its_cluster_ip():
    desired = rendered()[("Service", "demo-rollout")]
    live = as_stored(desired)
    live["spec"]["selector"]["app.kubernetes.io/component"] = "trainer"
    live["spec"]["selector"]["extra"] = "x"
    live["spec"]["ports"][0]["port"] = 9000
    live["metadata"]["labels"].pop("app.kubernetes.io/managed-by")
    live["metadata"]["labels"]["team"] = "a"
    patch = drift_patch(live, desired)
    assert patch == {
        "metadata": {"labels": {"app.kubernetes.io/managed-by": "g2rpo-operator"}},
        "spec": {"selector": {**desired["spec"]["selector"], "extra": None}, "ports": desired["spec"]["ports"]},
    }
    headless = rendered()[("Service", "demo-trainer")]
    live = as_stored(headless)
    live["spec"]["clusterIP"] = "10.96.0.13"  # cannot happen (immutable); never written if it did
    assert drift_patch(live, headless) is None


def test_a_widened_network_policy_is_narrowed_again():
    desired = rendered()[("NetworkPolicy", "demo-rollout")]
    live = as_stored(desired)
    live["spec"]["ingress"][0]["from"][0]["namespaceSelector"] = {}  # the trainer pods of every namespace
    assert drift_patch(live, desired) == {"spec": desired["spec"]}
    live = as_stored(desired)
    live["spec"]["podSelector"]["matchLabels"]["extra"] = "x"  # guards none of the job's pods
    live["spec"]["egress"] = [{}]
    live["spec"]["policyTypes"] = ["Ingress", "Egress"]  # and no egress at all
    patch = drift_patch(live, desired)
    assert patch["spec"]["podSelector"]["matchLabels"]["extra"] is None and patch["spec"]["egress"] is None
    assert patch["spec"]["policyTypes"] == ["Ingress"]


def test_a_settings_change_reaches_the_network_policy_and_the_workload():
    before, after = (
        rendered("kueue"),
        rendered("kueue", OperatorSettings(kueue_enabled=True, kueue_queue="other", operator_namespace="ops")),
    )
    policy = ("NetworkPolicy", "demo-controller")
    assert drift_patch(as_stored(before[policy]), after[policy]) == {"spec": after[policy]["spec"]}
    workload = ("Workload", "demo-gang")
    assert drift_patch(as_stored(before[workload]), after[workload]) == {"spec": {"queueName": "other"}}


def test_a_workload_is_patched_only_while_kueue_holds_no_quota_for_it():
    desired = rendered("kueue")[("Workload", "demo-gang")]
    live = as_stored(desired)
    live["spec"]["podSets"][1]["count"] = 7
    assert drift_patch(live, desired) == {"spec": {"podSets": desired["spec"]["podSets"]}}
    live["status"] = {"conditions": [{"type": "QuotaReserved", "status": "True"}]}
    assert drift_patch(live, desired) is None  # Kueue's webhook refuses podSets changes now


def test_a_pod_group_gets_its_gang_size_back():
    desired = rendered("volcano")[("PodGroup", "demo-gang")]
    live = as_stored(desired)
    live["spec"]["minMember"] = 1
    assert drift_patch(live, desired) == {"spec": {"minMember": 3}}


def test_deployments_get_scale_and_gang_epoch_only():
    desired = rendered()[("Deployment", "demo-rollout")]
    live = as_stored(desired)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "edited"  # would restart vLLM: left alone
    assert drift_patch(live, desired) is None
    live["spec"]["replicas"] = 0
    desired["spec"]["template"]["metadata"]["annotations"] = {GANG_EPOCH_ANNOTATION: "2"}
    assert drift_patch(live, desired) == {
        "spec": {"replicas": 1, "template": {"metadata": {"annotations": {GANG_EPOCH_ANNOTATION: "2"}}}}
    }


def test_the_token_and_the_trainer_job_are_left_as_created():
    for key in (("Secret", "demo-token"), ("Job", "demo-trainer")):
        desired = rendered()[key]
        live = as_stored(desired)
        live["metadata"]["labels"].clear()
        assert drift_patch(live, desired) is None


@pytest.mark.parametrize(
    "rendered_value, live, expected",
    [
        ({"a": {"b": 1}}, {"a": {"b": 1, "default": 2}}, True),  # a default the API server added
        ({"a": "x"}, {"a": "x", "b": "y"}, False),  # a map of strings (a selector) must be equal
        ([{"a": 1}], [{"a": 1}, {"a": 2}], False),
        ([{"a": 1}], [{"a": 1, "b": 2}], True),
        ({"a": 1}, None, False),
        ({"tolerations": [], "nodeSelector": {}}, {}, True),  # empty ones are not stored
    ],
)
def test_matches(rendered_value, live, expected):
    assert matches(rendered_value, live) is expected
