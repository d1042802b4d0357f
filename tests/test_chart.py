"""charts/g2rpo with a real Helm engine (helm 4 CLI from `make tools`, in .tools/bin).

`helm lint --strict`; `helm template` with the default values, cluster-wide and namespaced, with
monitoring on and off, gives documents that pass `kubernetes-validate --strict` (which has no
schema for the Prometheus Operator's kinds: those are validated against that operator's CRD
schemas, packaged by the npm `@kubernetes-models/prometheus-operator`); the values schema
refuses bad values; the chart's CRD is exactly `g2rpo crd`; manifests/ is the chart's rendering.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from g2rpo.api.crd import render_crd, render_crd_yaml
from g2rpo_operator.settings import DEFAULT_GPU_PRODUCTS, OperatorSettings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "g2rpo"
KUBE_VERSION = "1.30"
HELM = shutil.which("helm", path=f"{ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
MONITORING_ON = [
    "--set",
    "monitoring.serviceMonitor.enabled=true",
    "--set",
    "monitoring.prometheusRule.enabled=true",
    "--set",
    "monitoring.grafanaDashboard.enabled=true",
    "--set",
    "monitoring.labels.release=kube-prometheus-stack",
]
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
NODE_CHECKS = ROOT / "tools" / "node"

pytestmark = pytest.mark.skipif(HELM is None, reason="helm not found: `make tools` installs it into .tools/bin")


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


def template(*args: str, namespace: str = "g2rpo-system") -> list[dict]:
    done = helm("template", "g2rpo", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def refusal(*args: str) -> str:
    done = helm("template", "g2rpo", str(CHART), *args)
    assert done.returncode != 0, f"accepted: {args}"
    return done.stderr


def by_kind(documents: list[dict], kind: str) -> list[dict]:
    return [d for d in documents if d["kind"] == kind]


def operator_env(documents: list[dict]) -> dict[str, str]:
    """The operator container's environment as the kubelet resolves it (the downward API included)."""
    deployment = by_kind(documents, "Deployment")[0]
    fields = {"metadata.namespace": deployment["metadata"]["namespace"]}
    return {
        e["name"]: e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def settings_namespace(documents: list[dict]) -> str:
    return OperatorSettings.from_env(operator_env(documents)).operator_namespace


def rule_triples(role: dict) -> set[tuple[str, str, str]]:
    return {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }


def job_roles(documents: list[dict], kind: str = "Role") -> list[dict]:
    """The Roles (or RoleBindings) of the watched namespaces: all but the token signing key's."""
    return [d for d in by_kind(documents, kind) if not d["metadata"]["name"].endswith("-token-key")]


def test_lint_strict():
    for values in ([], ["--set", "watchNamespaces={team-a,team-b}", *MONITORING_ON]):
        done = helm("lint", "--strict", str(CHART), *values)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([], id="defaults"),
        pytest.param(MONITORING_ON, id="cluster-wide+monitoring"),
        pytest.param(["--set", "watchNamespaces={team-a,team-b}"], id="namespaced"),
        pytest.param(["--set", "watchNamespaces={team-a}", "--set", "kueue.enabled=true"], id="namespaced-kueue"),
        pytest.param(
            ["--set", "watchNamespaces={team-a}", "--set", "monitoring.podMonitor.enabled=true", *MONITORING_ON[2:]],
            id="namespaced+podmonitor",
        ),
        pytest.param(
            [
                "--set",
                "replicaCount=1",
                "--set",
                "crds.install=false",
                "--set",
                "rbac.create=false",
                "--set",
                "serviceAccount.create=false",
                "--set",
                "serviceAccount.name=mine",
            ],
            id="minimal",
        ),
    ],
)
def test_rendered_documents_are_schema_valid(values):
    documents = template(*values)
    for document in documents:
        if document["kind"] in PROMETHEUS_OPERATOR_KINDS:
            assert document["apiVersion"] == "monitoring.coreos.com/v1" and document["spec"], document
            continue
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
    assert len(by_kind(documents, "Deployment")) == 1


def test_defaults_install_the_crds_the_operator_and_cluster_wide_rbac():
    documents = template()
    kinds = [d["kind"] for d in documents]
    assert {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",  # the token signing key's, in the release namespace
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } == set(kinds)
    assert not PROMETHEUS_OPERATOR_KINDS & set(kinds) and "ConfigMap" not in kinds
    deployment = by_kind(documents, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "ghcr.io/g2rpo/g2rpo-operator:0.1.0"
    assert {
        probe: container[probe]["httpGet"]["port"] for probe in ("livenessProbe", "readinessProbe", "startupProbe")
    } == {"livenessProbe": "health", "readinessProbe": "health", "startupProbe": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9090, "health": 8081}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    selector = deployment["spec"]["selector"]["matchLabels"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert anti["labelSelector"]["matchLabels"] == selector and anti["topologyKey"] == "kubernetes.io/hostname"
    budget = by_kind(documents, "PodDisruptionBudget")[0]
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    env = operator_env(documents)
    assert "G2RPO_NAMESPACES" not in env  # cluster-wide
    # Unset job defaults leave the operator's built-in ones in force.
    assert (
        not {"G2RPO_GPU_NODE_SELECTOR", "G2RPO_GPU_TOLERATIONS", "G2RPO_STORAGE_CLASS_NAME", "G2RPO_KUEUE_QUEUE"}
        & env.keys()
    )
    settings = OperatorSettings.from_env(env)  # the operator reads every value the chart sets
    assert settings.trainer_image == settings.rollout_image == "ghcr.io/g2rpo/g2rpo-trainer:0.1.0"
    assert (settings.metrics_port, settings.health_port, settings.namespaces) == (9090, 8081, ())
    role = by_kind(documents, "ClusterRole")[0]
    assert ("kopf.dev", "clusterkopfpeerings", "create") in rule_triples(role)
    (key_role,) = by_kind(documents, "Role")  # the one Secret the operator reads is the one it is told to
    assert key_role["metadata"]["namespace"] == "g2rpo-system" == settings_namespace(documents)
    assert [r["resourceNames"] for r in key_role["rules"] if r.get("resourceNames")] == [[settings.token_key_secret]]
    binding = by_kind(documents, "ClusterRoleBinding")[0]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "g2rpo-system"}
    ]
    crds = {d["metadata"]["name"]: d for d in by_kind(documents, "CustomResourceDefinition")}
    assert set(crds) == {"g2rpojobs.g2rpo.dev"}
    assert crds["g2rpojobs.g2rpo.dev"]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


PEERING_CRDS = {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def test_kopf_peering_crds_are_created_only_if_absent():
    """kopf's peering CRDs belong to every kopf operator of the cluster: in crds/, Helm creates them
    before the release and skips one that exists (helm/helm pkg/action/install.go installCRDs), and they
    are no part of the release's manifest, so another operator's copy fails no ownership check and
    `helm uninstall` never deletes them. The G2RPOJob CRD stays a template (upgraded with the chart)."""
    release = {d["metadata"]["name"] for d in by_kind(template(), "CustomResourceDefinition")}
    assert release == {"g2rpojobs.g2rpo.dev"} and not release & PEERING_CRDS
    shipped = helm("show", "crds", str(CHART))
    assert shipped.returncode == 0, shipped.stderr
    crds = [d for d in yaml.safe_load_all(shipped.stdout) if d]
    assert {d["metadata"]["name"] for d in crds} == PEERING_CRDS
    assert all("annotations" not in d["metadata"] for d in crds)  # no Helm ownership or resource policy
    with_crds = {d["metadata"]["name"] for d in by_kind(template("--include-crds"), "CustomResourceDefinition")}
    assert with_crds == release | PEERING_CRDS  # what tools/render_manifests.py puts into manifests/crd/


def test_one_replica_gets_no_disruption_budget_that_would_block_drains():
    assert not by_kind(template("--set", "replicaCount=1"), "PodDisruptionBudget")


def test_watch_namespaces_gives_a_role_per_namespace_with_namespaced_peering():
    documents = template("--set", "watchNamespaces={team-a,team-b}")
    assert not by_kind(documents, "ClusterRole") and not by_kind(documents, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in job_roles(documents)}
    bindings = {b["metadata"]["namespace"]: b for b in job_roles(documents, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    cluster_role = by_kind(template(), "ClusterRole")[0]
    peering = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch", "create")}
    for namespace, role in roles.items():
        granted = rule_triples(role)
        assert peering <= granted
        assert not any(r == "clusterkopfpeerings" for _, r, _ in granted)
        # The same job permissions as cluster-wide, confined to the namespace.
        assert {t for t in granted if t[0] != "kopf.dev"} == {
            t for t in rule_triples(cluster_role) if t[0] != "kopf.dev"
        }
        assert bindings[namespace]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert bindings[namespace]["subjects"][0]["namespace"] == "g2rpo-system"
    env = operator_env(documents)
    assert env["G2RPO_NAMESPACES"] == "team-a,team-b"
    assert OperatorSettings.from_env(env).namespaces == ("team-a", "team-b")


def test_job_defaults_and_images_reach_the_operator_settings():
    documents = template(
        "--set",
        "image.repository=registry.example/g2rpo-operator",
        "--set",
        "image.tag=1.2.3",
        "--set",
        "image.pullPolicy=Always",
        "--set",
        "trainerImage.repository=registry.example/g2rpo-trainer",
        "--set",
        "trainerImage.tag=1.2.3-cu13",
        "--set-json",
        'jobDefaults.gpuNodeSelector={"nvidia.com/gpu.product":"NVIDIA-H100-80GB-HBM3"}',
        "--set-json",
        'jobDefaults.gpuTolerations=[{"key":"gpu","operator":"Exists","effect":"NoSchedule"}]',
        "--set",
        "jobDefaults.storageClassName=filestore-rwx",
        "--set",
        "jobDefaults.kueueQueue=gpu-queue",
    )
    env = operator_env(documents)
    settings = OperatorSettings.from_env(env)
    assert settings.controller_image == "registry.example/g2rpo-operator:1.2.3"
    assert settings.trainer_image == settings.rollout_image == "registry.example/g2rpo-trainer:1.2.3-cu13"
    assert settings.image_pull_policy == "Always"
    assert settings.gpu_node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert settings.gpu_tolerations == ({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},)
    # Read by the operator once wired (issue 8); the chart's contract is the variable's name.
    assert (env["G2RPO_STORAGE_CLASS_NAME"], env["G2RPO_KUEUE_QUEUE"]) == ("filestore-rwx", "gpu-queue")
    empty = OperatorSettings.from_env(operator_env(template("--set-json", "jobDefaults.gpuNodeSelector={}")))
    assert empty.gpu_node_selector == {}  # {} means "no selector", unlike null
    assert empty.gpu_products == DEFAULT_GPU_PRODUCTS  # null: the operator's A100 variants
    anywhere = OperatorSettings.from_env(operator_env(template("--set-json", "jobDefaults.gpuProducts=[]")))
    assert anywhere.gpu_products == ()


def test_job_pod_defaults_reach_the_operator_settings():
    """Cache, pull secrets and service account of the jobs' pods (issue 16, items 2 and 10)."""
    defaults, built_in = OperatorSettings.from_env(operator_env(template())), OperatorSettings()
    for field in ("gpu_cache_size", "request_gpu_cache_storage", "image_pull_secrets", "service_account_name"):
        assert getattr(defaults, field) == getattr(built_in, field), field  # the chart's defaults are the operator's
    settings = OperatorSettings.from_env(
        operator_env(
            template(
                "--set",
                "jobDefaults.gpuCacheSize=60Gi",
                "--set",
                "jobDefaults.requestGpuCacheStorage=true",
                "--set-json",
                'jobDefaults.imagePullSecrets=["registry","mirror"]',
                "--set",
                "jobDefaults.serviceAccountName=trainer-sa",
            )
        )
    )
    assert (settings.gpu_cache_size, settings.request_gpu_cache_storage) == ("60Gi", True)
    assert settings.image_pull_secrets == ("registry", "mirror") and settings.service_account_name == "trainer-sa"
    with pytest.raises(AssertionError, match="gpuCacheSize"):
        template("--set", "jobDefaults.gpuCacheSize=lots")  # the schema refuses it at install


def test_kueue_integration_turns_on_the_workload_watch_and_its_rbac():
    """kueue.enabled reaches the operator (it then watches Workloads) with the rules its KMock test
    exercises (tests/test_operator_kmock.py); its cluster-scoped reads (ResourceFlavors, PriorityClasses)
    need a ClusterRole even when the operator is namespaced."""
    kueue_rules = {
        ("kueue.x-k8s.io", r, v) for r in ["workloads"] for v in ("get", "list", "watch", "create", "delete")
    } | {("kueue.x-k8s.io", "workloads/status", "patch"), ("apps", "deployments", "delete")}
    cluster_reads = {("kueue.x-k8s.io", "resourceflavors", "get"), ("scheduling.k8s.io", "priorityclasses", "get")}
    off = template()
    assert not OperatorSettings.from_env(operator_env(off)).kueue_enabled
    assert not (kueue_rules | cluster_reads) & rule_triples(by_kind(off, "ClusterRole")[0])
    on = template("--set", "kueue.enabled=true")
    assert OperatorSettings.from_env(operator_env(on)).kueue_enabled
    (cluster_role,) = by_kind(on, "ClusterRole")
    assert (kueue_rules | cluster_reads) <= rule_triples(cluster_role)
    namespaced = template("--set", "kueue.enabled=true", "--set", "watchNamespaces={team-a}")
    (role,) = job_roles(namespaced)
    assert kueue_rules <= rule_triples(role) and not cluster_reads & rule_triples(role)
    (reads_role,) = by_kind(namespaced, "ClusterRole")
    assert rule_triples(reads_role) == cluster_reads
    (binding,) = by_kind(namespaced, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == reads_role["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == "g2rpo-system"


def test_jobs_network_policies_admit_the_installed_operator_and_prometheus():
    """The operator finds its own pods (namespace, labels) and the monitoring namespace from the chart:
    the jobs' NetworkPolicies are built from exactly these settings."""
    documents = template("--set", "jobDefaults.monitoringNamespace=observability", namespace="ml-infra")
    settings = OperatorSettings.from_env(operator_env(documents))
    pod_labels = by_kind(documents, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert settings.operator_namespace == "ml-infra"
    assert settings.operator_pod_labels.items() <= pod_labels.items()
    assert settings.monitoring_namespace == "observability"


def test_monitoring_objects_select_the_controllers_and_the_operator():
    documents = template(*MONITORING_ON)
    monitors = {m["metadata"]["name"]: m for m in by_kind(documents, "ServiceMonitor")}
    assert set(monitors) == {"g2rpo-operator", "g2rpo-operator-controllers", "g2rpo-operator-rollouts"}
    controllers = monitors["g2rpo-operator-controllers"]["spec"]
    assert controllers["namespaceSelector"] == {"any": True}
    assert controllers["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "g2rpo",
        "app.kubernetes.io/component": "controller",
    }
    assert controllers["endpoints"][0]["port"] == "metrics"
    operator_service = by_kind(documents, "Service")[0]
    assert (
        monitors["g2rpo-operator"]["spec"]["selector"]["matchLabels"].items()
        <= operator_service["metadata"]["labels"].items()
    )
    assert {p["name"] for p in operator_service["spec"]["ports"]} == {"metrics"}
    for document in [*monitors.values(), *by_kind(documents, "PrometheusRule"), *by_kind(documents, "ConfigMap")]:
        assert document["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rule = by_kind(documents, "PrometheusRule")[0]
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus" / "g2rpo-alerts.rules.yaml").read_text())
    dashboard = by_kind(documents, "ConfigMap")[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["g2rpo.json"]) == json.loads((CHART / "dashboards" / "g2rpo.json").read_text())
    namespaced = template("--set", "watchNamespaces={team-a}", "--set", "monitoring.podMonitor.enabled=true")
    pod_monitors = {m["metadata"]["name"]: m for m in by_kind(namespaced, "PodMonitor")}
    assert pod_monitors["g2rpo-operator-controllers"]["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert not by_kind(namespaced, "ServiceMonitor")


@pytest.mark.skipif(
    not (NODE_CHECKS / "node_modules" / "@kubernetes-models").exists(), reason="`make tools` installs it"
)
def test_monitoring_objects_are_valid_for_the_prometheus_operator(tmp_path):
    documents = [
        d
        for d in template(*MONITORING_ON)
        + template("--set", "watchNamespaces={team-a}", "--set", "monitoring.podMonitor.enabled=true")
        if d["kind"] in PROMETHEUS_OPERATOR_KINDS
    ]
    assert {d["kind"] for d in documents} == PROMETHEUS_OPERATOR_KINDS

    def validate(objects: list[dict]) -> subprocess.CompletedProcess:
        (tmp_path / "objects.json").write_text(json.dumps(objects))
        return subprocess.run(
            ["node", str(NODE_CHECKS / "validate-monitoring.mjs"), str(tmp_path / "objects.json")],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = validate(documents)
    assert done.returncode == 0 and done.stdout.count("ok ") == len(documents), done.stdout + done.stderr
    broken = json.loads(json.dumps(documents))
    next(d for d in broken if d["kind"] == "PrometheusRule")["spec"]["groups"][0]["rules"][0]["for"] = 5
    done = validate(broken)
    assert done.returncode == 1 and "rules/0/for must be string" in done.stdout, done.stdout


@pytest.mark.parametrize("monitor", ["serviceMonitor", "podMonitor"])
def test_rollout_monitors_scrape_the_builders_vllm_pod_and_the_network_policy_admits_them(monitor):
    """With monitoring on, a ServiceMonitor or PodMonitor scrapes every rollout's vLLM /metrics on the port the
    builders name, copies the job name (the pod's instance label) into g2rpo_job for the dashboard, and the
    operator, configured by the same chart, opens the rollout's NetworkPolicy to the monitoring namespace on
    exactly vLLM's port. Off (no monitor, or monitoring.rollout.enabled=false), that port stays closed."""
    from g2rpo.api.names import ROLLOUT_PORT
    from g2rpo.api.spec import parse_spec
    from g2rpo_operator.builders import network, rollout
    from g2rpo_operator.builders.common import INSTANCE_LABEL, JobContext

    spec = parse_spec({"model": {"name": "m"}, "dataset": {"name": "builtin:arithmetic"}})
    kind = monitor[0].upper() + monitor[1:]
    documents = template("--set", f"monitoring.{monitor}.enabled=true", "--set", "jobDefaults.monitoringNamespace=obs")
    (scraper,) = [m for m in by_kind(documents, kind) if m["metadata"]["name"] == "g2rpo-operator-rollouts"]
    ctx = JobContext.resolve("demo", "team-a", spec, OperatorSettings.from_env(operator_env(documents)))
    service, deployment = rollout.service(ctx), rollout.deployment(ctx)
    pod = deployment["spec"]["template"]
    assert scraper["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert scraper["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = scraper["spec"]["endpoints" if monitor == "serviceMonitor" else "podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "g2rpo_job"
    source = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", INSTANCE_LABEL)
    assert relabel["sourceLabels"] == [source] and pod["metadata"]["labels"][INSTANCE_LABEL] == "demo"

    def monitoring_ingress(settings: OperatorSettings) -> list[dict]:
        ctx = JobContext.resolve("demo", "team-a", spec, settings)
        rules = network.policy(ctx, "rollout")["spec"]["ingress"]
        return [
            r
            for r in rules
            if {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}} in r["from"]
        ]

    assert monitoring_ingress(ctx.settings) == [
        {
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}],
            "ports": [{"protocol": "TCP", "port": ROLLOUT_PORT}],
        }
    ]
    for off in (
        template("--set", "jobDefaults.monitoringNamespace=obs"),
        template(
            *["--set", f"monitoring.{monitor}.enabled=true", "--set", "monitoring.rollout.enabled=false"],
            "--set",
            "jobDefaults.monitoringNamespace=obs",
        ),
    ):
        assert not [m for m in by_kind(off, kind) if m["metadata"]["name"].endswith("-rollouts")]
        assert monitoring_ingress(OperatorSettings.from_env(operator_env(off))) == []


def test_the_controller_labels_the_monitors_select_are_the_builders_labels():
    """The ServiceMonitor/PodMonitor selectors match what the operator puts on a controller's Service and pod."""
    from g2rpo.api.spec import parse_spec
    from g2rpo_operator.builders import controller
    from g2rpo_operator.builders.common import JobContext

    spec = parse_spec({"model": {"name": "m"}, "dataset": {"name": "builtin:arithmetic"}})
    ctx = JobContext.resolve("demo", "team-a", spec, OperatorSettings())
    service, deployment = controller.service(ctx), controller.deployment(ctx)
    documents = template(*MONITORING_ON)
    selector = next(m for m in by_kind(documents, "ServiceMonitor") if m["metadata"]["name"].endswith("-controllers"))
    assert selector["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert selector["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert "metrics" in container_ports


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.podMonitor.enabled=true"],
            "serviceMonitor.enabled and podMonitor.enabled are mutually exclusive",
        ),
        (["--set", "replicaCount=two"], "at '/replicaCount': got string, want integer"),
        (["--set", "replicaCount=0"], "at '/replicaCount': minimum"),
        (["--set", "image.tga=x"], "at '/image': additional properties 'tga' not allowed"),
        (["--set", "monitoring.grafanaDashbord.enabled=true"], "additional properties 'grafanaDashbord' not allowed"),
        (["--set", "watchNamespaces=team-a"], "at '/watchNamespaces': got string, want array"),
        (["--set", "watchNamespaces={Team_A}"], "at '/watchNamespaces/0'"),
        (["--set", "crds.keep=maybe"], "at '/crds/keep': got string, want boolean"),
        (["--set", "image.pullPolicy=Sometimes"], "at '/image/pullPolicy'"),
        (
            ["--set-json", 'jobDefaults.gpuTolerations=[{"key":"a","operater":"Exists"}]'],
            "at '/jobDefaults/gpuTolerations/0': additional properties 'operater' not allowed",
        ),
        (["--set-json", 'jobDefaults.gpuNodeSelector={"zone":1}'], "at '/jobDefaults/gpuNodeSelector/zone'"),
        (["--set", "monitoring.serviceMonitor.interval=soon"], "at '/monitoring/serviceMonitor/interval'"),
        (["--set", "resources.limits.memory=lots"], "at '/resources/limits/memory'"),
        (["--set", "serviceAccount.create=false"], "serviceAccount.name is required"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(args, message):
    stderr = refusal(*args)
    assert message in stderr, stderr


def test_every_value_is_commented_and_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict, props: dict, path: str) -> None:
        assert props.get("additionalProperties") is False, f"{path or 'values'}: the schema must refuse unknown keys"
        assert set(node) <= set(props["properties"]), (
            f"{path}: {set(node) - set(props['properties'])} not in the schema"
        )
        for key, value in node.items():
            child = props["properties"][key]
            if isinstance(value, dict) and child.get("additionalProperties") is False:
                walk(value, child, f"{path}.{key}".lstrip("."))

    walk(values, schema, "")
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z]\w*:", line):
            above = lines[number - 1].strip()
            parent_of_commented = line.rstrip().endswith(":") and lines[number + 1].strip().startswith("# --")
            assert above.startswith("#") or parent_of_commented, (
                f"values.yaml:{number + 1} `{line.strip()}` has no comment"
            )


def test_chart_crd_is_exactly_g2rpo_crd_and_rendered_unchanged():
    committed = (CHART / "files" / "crds" / "g2rpojobs.g2rpo.dev.yaml").read_text()
    assert committed == render_crd_yaml(), "the chart's CRD is stale: run `.venv/bin/python tools/render_manifests.py`"
    rendered = next(d for d in template() if d["metadata"]["name"] == "g2rpojobs.g2rpo.dev")
    rendered["metadata"].pop("annotations")
    assert rendered == render_crd()
    assert not any(d["kind"] == "CustomResourceDefinition" for d in template("--set", "crds.install=false"))
    kept = next(d for d in template("--set", "crds.keep=false") if d["metadata"]["name"] == "g2rpojobs.g2rpo.dev")
    assert "annotations" not in kept["metadata"]


def test_manifests_are_the_charts_rendering():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "render_manifests.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    kustomization = yaml.safe_load((ROOT / "manifests" / "kustomization.yaml").read_text())
    generated = {
        str(p.relative_to(ROOT / "manifests"))
        for p in (ROOT / "manifests").rglob("*.yaml")
        if p.read_text().startswith("# Generated by tools/render_manifests.py")
    }
    assert generated <= set(kustomization["resources"])


def requirements_table() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Cluster requirements")
    return readme[start : min(i for i in (readme.find("\n### ", start), readme.find("\n## ", start)) if i != -1)]


def test_the_requirements_in_readme_and_notes_are_the_codes():
    """The README's requirements table and the chart's NOTES state the facts the code and the chart
    depend on: a change to one of them (the minimum Kubernetes, the GPU products, the uid, vLLM's
    startup timeout, the Kueue framework name) fails here until both texts follow."""
    from g2rpo.api.spec import API_GROUP, API_VERSION, KIND, RolloutPlacementSpec
    from g2rpo_operator.builders.common import RUN_AS_USER

    table = requirements_table()
    done = helm("install", "--dry-run=client", "g2rpo", str(CHART), "-n", "g2rpo-system")
    assert done.returncode == 0, done.stderr
    notes = done.stdout[done.stdout.index("NOTES:") :]
    minimum = re.fullmatch(r">=(\d+\.\d+)\.0-0", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
    assert minimum, "Chart.yaml kubeVersion is not of the form >=X.Y.0-0"
    framework = f"{KIND}.{API_VERSION}.{API_GROUP}"
    startup = RolloutPlacementSpec.model_fields["startup_timeout_seconds"].default
    for text in (table, notes):
        assert f"{minimum[1]}" in text and "R580" in text and framework in text and "restricted" in text
        assert f"{RUN_AS_USER}" in text and "ReadWriteMany" in text
        for label in ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator", "node.kubernetes.io/instance-type"):
            assert label in text, label
    assert f"{startup} s" in table and f"default {startup // 60}m" in notes
    assert all(product in table for product in DEFAULT_GPU_PRODUCTS)
    assert all(t in table for t in ("p4d.24xlarge", "p4de.24xlarge", "nvidia-tesla-a100", "nvidia-a100-80gb"))
