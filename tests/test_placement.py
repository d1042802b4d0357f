"""Where the GPU pods may land and what they ask of a node and of Kueue (issue 16, items 1, 2 and 10).

Pure tests of the rendered pods, each written against every GPU pod the operator renders (Deployments,
Jobs and Kueue's pod sets), so that a new pod or a new default breaks them as the old ones would:

- placement: a node labelled as GKE (managed driver), EKS (device plugin only), AKS or the GPU operator
  label their A100 nodes is admitted; a node with another GPU is refused;
- ephemeral storage: every pod fits the smallest common node disk (EKS's 20 GiB root volume) and every
  Kueue pod set asks only for what a ClusterQueue covering cpu, memory and nvidia.com/gpu covers;
- pods: pull secrets, service account, NVIDIA_VISIBLE_DEVICES=void on non-GPU containers of GPU images.

`node_admits` re-implements the scheduler's required node affinity (a fake of kube-scheduler: the
scheduler cannot run here). It follows k8s.io/component-helpers/scheduling/corev1/nodeaffinity
(nodeaffinity.go: nodeSelector AND, nodeSelectorTerms OR, a term's expressions AND, an empty term
matches nothing) for the operators the builders can emit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.utils import parse_quantity
from test_pod_security import BASELINE_CAPABILITIES, RESTRICTED_VOLUMES

from g2rpo.api.spec import EXIT_INVALID_SPEC, parse_spec
from g2rpo_operator.builders import JobContext, children, config, controller, rollout, trainer
from g2rpo_operator.builders.common import GPU_NODE_LABELS, placement_hints
from g2rpo_operator.conditions import pod_problems
from g2rpo_operator.render import render_children
from g2rpo_operator.settings import OperatorSettings

from operator_fixtures import job_manifest

GIB = 2**30

# Stock A100 nodes, labelled as each platform labels them (only the labels that matter here, plus a
# few the platform always sets, so that a rule keyed on them would be caught admitting the wrong node).
A100_NODES = {
    # GKE with GKE's managed driver: no GPU feature discovery. cloud.google.com/gke-accelerator is set on
    # every GPU node pool (GKE docs, "Run GPUs in GKE Standard node pools").
    "gke-a100-80gb": {
        "cloud.google.com/gke-accelerator": "nvidia-a100-80gb",
        "cloud.google.com/gke-nodepool": "a100",
        "node.kubernetes.io/instance-type": "a2-ultragpu-8g",
    },
    "gke-a100-40gb": {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-a100",
        "node.kubernetes.io/instance-type": "a2-highgpu-8g",
    },
    # EKS with only NVIDIA's device plugin: just the well-known labels.
    "eks-p4d": {"node.kubernetes.io/instance-type": "p4d.24xlarge", "eks.amazonaws.com/nodegroup": "gpu"},
    "eks-p4de": {"node.kubernetes.io/instance-type": "p4de.24xlarge"},
    # AKS: kubernetes.azure.com/accelerator is `nvidia` on every GPU size (AKS docs, "Use labels").
    "aks-nd96amsr": {
        "node.kubernetes.io/instance-type": "Standard_ND96amsr_A100_v4",
        "kubernetes.azure.com/accelerator": "nvidia",
    },
    "aks-nd96asr": {
        "node.kubernetes.io/instance-type": "Standard_ND96asr_v4",
        "kubernetes.azure.com/accelerator": "nvidia",
    },
    "aks-nc24ads": {
        "node.kubernetes.io/instance-type": "Standard_NC24ads_A100_v4",
        "kubernetes.azure.com/accelerator": "nvidia",
    },
    # NVIDIA's GPU operator (GPU feature discovery) on premises: no instance type.
    "gpu-operator-sxm4-80gb": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.count": "8"},
    "gpu-operator-pcie-40gb": {"nvidia.com/gpu.product": "NVIDIA-A100-PCIE-40GB"},
}
OTHER_GPU_NODES = {
    "gke-h100": {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
        "node.kubernetes.io/instance-type": "a3-highgpu-8g",
    },
    "gke-l4": {"cloud.google.com/gke-accelerator": "nvidia-l4", "node.kubernetes.io/instance-type": "g2-standard-48"},
    "gke-t4": {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
        "node.kubernetes.io/instance-type": "n1-standard-8",
    },
    "eks-p5": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
    "eks-g5": {"node.kubernetes.io/instance-type": "g5.48xlarge"},
    "aks-h100": {
        "node.kubernetes.io/instance-type": "Standard_ND96isr_H100_v5",
        "kubernetes.azure.com/accelerator": "nvidia",
    },
    "aks-a10": {
        "node.kubernetes.io/instance-type": "Standard_NV36ads_A10_v5",
        "kubernetes.azure.com/accelerator": "nvidia",
    },
    "gpu-operator-h100": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "gpu-operator-a100-mig": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb"},
    "cpu": {"node.kubernetes.io/instance-type": "m5.2xlarge"},
}

EKS_DEFAULT_NODE_ALLOCATABLE = 20 * GIB - 1 * GIB - 2 * GIB
"""An EKS managed node group's default root volume (20 GiB) less the EKS AMI's kube-reserved ephemeral-storage
(1Gi) and the kubelet's eviction threshold nodefs.available<10% (2 GiB): what the scheduler can hand out."""
GKE_DEFAULT_NODE_ALLOCATABLE = 47060071478
"""ephemeral-storage allocatable of a GKE node with the default 100 GB boot disk (GKE's "Plan GKE Standard node
sizes" page): about 43.8 GiB."""
GKE_GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
"""The taint GKE puts on every GPU node (its managed driver's node pools)."""
KUEUE_MINIMAL_QUEUE = {"cpu", "memory", "nvidia.com/gpu"}
"""The resources of the smallest ClusterQueue that can run GPU jobs. Kueue's flavor assigner refuses a pod set
asking for any resource no resource group covers (kubernetes-sigs/kueue, pkg/scheduler/flavorassigner/
flavorassigner.go, findFlavorForPodSetResource: `resource %s unavailable in ClusterQueue`); only zero
quantities are skipped."""


def ctx(settings: OperatorSettings | None = None, **spec: Any) -> JobContext:
    raw = job_manifest("qwen", **spec)["spec"]
    return JobContext.resolve("qwen", "ml", parse_spec(raw), settings or OperatorSettings())


def _requirement_matches(requirement: dict, labels: dict[str, str]) -> bool:
    key, operator, values = requirement["key"], requirement["operator"], requirement.get("values") or []
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise AssertionError(f"operator {operator} is not modelled here")


def node_admits(pod: dict, labels: dict[str, str]) -> bool:
    """Whether the scheduler's NodeAffinity filter lets `pod` onto a node with `labels` (see the docstring)."""
    if any(labels.get(k) != v for k, v in (pod.get("nodeSelector") or {}).items()):
        return False
    required = ((pod.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if required is None:
        return True
    return any(
        term.get("matchExpressions") and all(_requirement_matches(r, labels) for r in term["matchExpressions"])
        for term in required["nodeSelectorTerms"]
    )


def pod_templates(objs: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod the objects would create, Kueue's pod sets included."""
    found = []
    for obj in objs:
        if obj["kind"] in ("Deployment", "Job"):
            found.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Workload":
            found += [(f"{obj['metadata']['name']}/{s['name']}", s["template"]["spec"]) for s in obj["spec"]["podSets"]]
    return found


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def wants_gpu(container: dict) -> bool:
    return int((container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0


def pod_request(pod: dict, resource: str) -> int:
    """What the scheduler and Kueue count for a pod: max(the largest init container, the sum of the others)
    (k8s.io/component-helpers/resource/helpers.go PodRequests; no pod overhead here)."""

    def of(container: dict) -> int:
        res = container.get("resources") or {}
        quantity = (res.get("requests") or {}).get(resource) or (res.get("limits") or {}).get(resource)
        return int(parse_quantity(quantity)) if quantity is not None else 0

    return max([sum(of(c) for c in pod["containers"]), *(of(c) for c in pod.get("initContainers", []))])


def requested_resources(pod: dict) -> set[str]:
    """Every resource a pod asks for with a non-zero quantity; the API server defaults a missing request
    to the limit, so limits count too."""
    names = set()
    for container in containers(pod):
        res = container.get("resources") or {}
        for quantities in (res.get("requests") or {}, res.get("limits") or {}):
            names |= {name for name, q in quantities.items() if parse_quantity(q) > 0}
    return names


SPECS = {
    "default": {},
    "kueue": {"runPolicy": {"gangScheduler": "kueue", "queue": "gpu"}},
    "volcano": {"runPolicy": {"gangScheduler": "volcano"}, "trainer": {"replicas": 2}},
}


def every_gpu_pod(spec: dict, settings: OperatorSettings | None = None) -> list[tuple[str, dict]]:
    pods = pod_templates(children(ctx(settings, **spec), "t0ken", True))
    gpu = [(name, pod) for name, pod in pods if any(wants_gpu(c) for c in containers(pod))]
    assert {name for name, _ in gpu} >= {"qwen-rollout", "qwen-trainer"}
    return gpu


# --- 1. placement -------------------------------------------------------------------------------


def tolerates(pod: dict, taint: dict) -> bool:
    """core/v1 Toleration.ToleratesTaint (k8s.io/api/core/v1/toleration.go): the effect (empty: any), then
    Exists with the key (empty: any key) or Equal with key and value."""
    for t in pod.get("tolerations") or []:
        if t.get("effect") not in (None, "", taint["effect"]):
            continue
        if t.get("operator") == "Exists" and t.get("key") in (None, "", taint["key"]):
            return True
        if t.get("operator") != "Exists" and (t.get("key"), t.get("value", "")) == (taint["key"], taint["value"]):
            return True
    return False


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_gpu_pod_lands_on_each_platforms_stock_a100_nodes_and_on_no_other_gpu(spec):
    for name, pod in every_gpu_pod(spec):
        assert tolerates(pod, GKE_GPU_TAINT), name
        for node, labels in A100_NODES.items():
            assert node_admits(pod, labels), f"{name} cannot run on a stock A100 node ({node}: {labels})"
        for node, labels in OTHER_GPU_NODES.items():
            assert not node_admits(pod, labels), f"{name} would run on {node} ({labels})"


def test_gpu_placement_is_one_term_per_label_and_overridable():
    pod = trainer.job(ctx())["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["key"] for t in terms] == list(GPU_NODE_LABELS)
    assert pod["nodeSelector"] == {}  # the affinity alone places GPU pods by default
    h100 = ["NVIDIA-H100-80GB-HBM3", "nvidia-h100-80gb", "p5.48xlarge"]
    for settings, spec in (
        (OperatorSettings(gpu_products=tuple(h100)), {}),
        (None, {"trainer": {"gpuProducts": h100}, "rollout": {"gpuProducts": h100}}),
    ):
        for name, pod in every_gpu_pod(spec, settings):
            assert node_admits(pod, OTHER_GPU_NODES["gke-h100"]) and node_admits(pod, OTHER_GPU_NODES["eks-p5"])
            assert not any(node_admits(pod, labels) for labels in A100_NODES.values()), name
    # gpuProducts: [] drops the constraint; a nodeSelector then picks the pool.
    own = {"gpuProducts": [], "nodeSelector": {"pool": "gpu"}}
    for name, pod in every_gpu_pod({"trainer": own, "rollout": own}):
        assert "affinity" not in pod and node_admits(pod, {"pool": "gpu"}) and not node_admits(pod, {}), name


def unschedulable_pod(name: str, component: str, message: str) -> dict:
    return {
        "metadata": {"name": name, "labels": {"app.kubernetes.io/component": component}},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
        },
    }


def test_a_job_no_node_takes_names_the_labels_tried_and_the_override():
    """The scheduler's message (PodScheduled's, as in the FailedScheduling event; kubernetes
    pkg/scheduler/framework/plugins/nodeaffinity/node_affinity.go ErrReasonPod) goes on with what the pod
    required and how to change it."""
    c = ctx()
    affinity = (
        "0/5 nodes are available: 2 Insufficient nvidia.com/gpu, 3 node(s) didn't match Pod's node "
        "affinity/selector. preemption: 0/5 nodes are available: 5 Preemption is not helpful for scheduling."
    )
    pods = [
        unschedulable_pod("qwen-trainer-0-abc", "trainer", affinity),
        unschedulable_pod("qwen-rollout-xyz", "rollout", "0/5 nodes are available: 5 Insufficient nvidia.com/gpu."),
    ]
    (reason, message), gpus = pod_problems(pods, placement_hints(c))
    assert reason == "Unschedulable" and message.startswith(f"pod qwen-trainer-0-abc: {affinity.rstrip('.')}; ")
    for label in GPU_NODE_LABELS:
        assert label in message
    assert "NVIDIA-A100-SXM4-80GB" in message and "p4d.24xlarge" in message and "nvidia-a100-80gb" in message
    assert "spec.trainer.gpuProducts" in message and "gpuProducts: []" in message
    assert "spec.trainer.nodeSelector" in message and "jobDefaults.gpuProducts" in message
    assert gpus == ("Unschedulable", "pod qwen-rollout-xyz: 0/5 nodes are available: 5 Insufficient nvidia.com/gpu.")
    # Kubernetes before 1.22 said "node(s) didn't match Pod's node affinity" (no "/selector").
    old = pod_problems(
        [unschedulable_pod("p", "rollout", "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity.")],
        placement_hints(c),
    )
    assert "spec.rollout.gpuProducts" in old[0][1]
    selected = ctx(rollout={"gpuProducts": [], "nodeSelector": {"pool": "gpu"}})
    hint = placement_hints(selected)["rollout"]
    assert "pool=gpu" in hint and "nvidia.com/gpu.product" not in hint


# --- 2. ephemeral storage -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_pod_fits_an_eks_default_node_disk(spec):
    for name, pod in pod_templates(children(ctx(**spec), "t0ken", True)):
        assert pod_request(pod, "ephemeral-storage") <= EKS_DEFAULT_NODE_ALLOCATABLE, name
        for volume in pod["volumes"]:
            if "emptyDir" in volume:  # bounded all the same: past its limit the kubelet evicts the pod
                assert volume["emptyDir"]["sizeLimit"], (name, volume)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_kueue_pod_set_fits_a_queue_covering_cpu_memory_and_gpus(spec):
    workload = ctx(
        runPolicy={"gangScheduler": "kueue", "queue": "gpu"}, **{k: v for k, v in spec.items() if k != "runPolicy"}
    )
    objs = children(workload, "t0ken", True)
    pod_sets = [pod for name, pod in pod_templates(objs) if "/" in name]
    assert len(pod_sets) == 2
    for pod in pod_sets:
        assert requested_resources(pod) <= KUEUE_MINIMAL_QUEUE, requested_resources(pod)


def test_the_cache_size_and_its_request_are_per_job_and_per_operator():
    cache = {"cacheSize": "60Gi", "requestCacheStorage": True}
    c = ctx(trainer=cache, rollout={"cacheSize": "40Gi"})
    job, deployment = trainer.job(c)["spec"]["template"]["spec"], rollout.deployment(c)["spec"]["template"]["spec"]
    assert next(v for v in job["volumes"] if v["name"] == "cache")["emptyDir"]["sizeLimit"] == "60Gi"
    assert pod_request(job, "ephemeral-storage") == 60 * GIB
    assert job["initContainers"][0]["resources"]["requests"]["ephemeral-storage"] == "64Mi"
    assert next(v for v in deployment["volumes"] if v["name"] == "cache")["emptyDir"]["sizeLimit"] == "40Gi"
    assert "ephemeral-storage" not in requested_resources(deployment)
    wide = OperatorSettings(gpu_cache_size="30Gi", request_gpu_cache_storage=True)
    for name, pod in every_gpu_pod({}, wide):
        assert pod_request(pod, "ephemeral-storage") == 30 * GIB <= GKE_DEFAULT_NODE_ALLOCATABLE, name
    # A job may still opt out of the install's request.
    off = ctx(wide, trainer={"requestCacheStorage": False})
    assert "ephemeral-storage" not in requested_resources(trainer.job(off)["spec"]["template"]["spec"])
    with pytest.raises(Exception, match="cacheSize"):
        ctx(trainer={"cacheSize": "lots"})


def test_the_default_cache_holds_a_7b_models_weights_and_fits_gke():
    size = parse_quantity(OperatorSettings().gpu_cache_size)
    assert 7.6e9 * 2 + 4 * GIB <= size <= GKE_DEFAULT_NODE_ALLOCATABLE  # Qwen2.5-7B in bf16 + compiled kernels


# --- 10. pods -----------------------------------------------------------------------------------


def test_pull_secrets_and_service_account_reach_the_pods_from_the_spec_or_the_install():
    wide = OperatorSettings(image_pull_secrets=("registry",), service_account_name="trainer-sa")
    objs = children(ctx(wide), "t0ken", True)
    for name, pod in pod_templates(objs):
        assert pod["imagePullSecrets"] == [{"name": "registry"}], name
        assert pod["automountServiceAccountToken"] is False
        if name.endswith("-controller"):
            assert "serviceAccountName" not in pod  # the controller needs no cloud identity
        else:
            assert pod["serviceAccountName"] == "trainer-sa", name
    own = ctx(wide, imagePullSecrets=["mine", "other"], serviceAccountName="job-sa")
    for name, pod in pod_templates(children(own, "t0ken", True)):
        assert pod["imagePullSecrets"] == [{"name": "mine"}, {"name": "other"}], name
        assert pod.get("serviceAccountName", "job-sa") == "job-sa"
    for name, pod in pod_templates(children(ctx(wide, imagePullSecrets=[]), "t0ken", True)):
        assert "imagePullSecrets" not in pod, name
    for name, pod in pod_templates(children(ctx(), "t0ken", True)):
        assert "imagePullSecrets" not in pod and "serviceAccountName" not in pod, name
    with pytest.raises(Exception, match="serviceAccountName"):
        ctx(serviceAccountName="Not_A_Name")
    with pytest.raises(Exception, match="imagePullSecrets"):
        ctx(imagePullSecrets=["bad name"])


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_containers_of_gpu_images_that_want_no_gpu_see_none(spec):
    settings = OperatorSettings()
    gpu_images = {settings.trainer_image, settings.rollout_image}
    checked = 0
    for name, pod in pod_templates(children(ctx(settings, **spec), "t0ken", True)):
        for container in containers(pod):
            if container["image"] in gpu_images and not wants_gpu(container):
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("NVIDIA_VISIBLE_DEVICES") == "void", (name, container["name"])
                checked += 1
    assert checked >= 1  # the check-spec init container at least
    assert settings.controller_image not in gpu_images


def test_capabilities_are_opt_in_and_make_the_trainer_root_with_only_them():
    default = trainer.job(ctx())["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert default["capabilities"] == {"drop": ["ALL"]} and "runAsUser" not in default
    pod = trainer.job(ctx(trainer={"capabilities": ["IPC_LOCK"]}))["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False and sc["runAsGroup"] == 1000
    assert sc["allowPrivilegeEscalation"] is False
    assert pod["initContainers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}  # only the trainer
    assert rollout.deployment(ctx(trainer={"capabilities": ["IPC_LOCK"]}))["spec"]["template"]["spec"]["containers"][0][
        "securityContext"
    ]["capabilities"] == {"drop": ["ALL"]}
    with pytest.raises(Exception, match="capabilities"):
        ctx(trainer={"capabilities": ["ALL"]})
    with pytest.raises(Exception, match="IPC_LOCK more than once"):
        ctx(trainer={"capabilities": ["IPC_LOCK", "IPC_LOCK"]})
    assert controller.deployment(ctx())["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "capabilities"
    ] == {"drop": ["ALL"]}


def test_render_shows_the_new_fields(tmp_path):
    """`g2rpo render` prints them: the GPU terms, the cache, pull secrets, service account, capabilities."""
    manifest = job_manifest(
        "qwen",
        imagePullSecrets=["registry"],
        serviceAccountName="trainer-sa",
        trainer={"capabilities": ["IPC_LOCK"], "cacheSize": "30Gi"},
    )
    from g2rpo.api.spec import parse_job

    text = render_children(parse_job(manifest), "ml", env={"G2RPO_REQUEST_GPU_CACHE_STORAGE": "true"})
    for expected in (
        "cloud.google.com/gke-accelerator",
        "node.kubernetes.io/instance-type",
        "p4d.24xlarge",
        "serviceAccountName: trainer-sa",
        "- name: registry",
        "- IPC_LOCK",
        "sizeLimit: 30Gi",
        "ephemeral-storage: 30Gi",
        "NVIDIA_VISIBLE_DEVICES",
    ):
        assert expected in text, expected


def test_the_rendered_check_spec_container_runs_as_rendered_and_refuses_a_bad_world_size(tmp_path):
    """The init container's command and env (NVIDIA_VISIBLE_DEVICES=void included) run the trainer's check,
    as the kubelet would run them: the mounted job.yaml is the ConfigMap's; exit 0, or EXIT_INVALID_SPEC
    (the podFailurePolicy's FailJob code) when the batch does not divide over WORLD_SIZE ranks."""
    for spec, expected in (({}, 0), ({"training": {"perDeviceBatchSize": 3, "numGenerations": 5}}, EXIT_INVALID_SPEC)):
        c = ctx(**spec)
        job_file = tmp_path / "job.yaml"
        job_file.write_text(config.configmap(c)["data"]["job.yaml"])
        check = trainer.job(c)["spec"]["template"]["spec"]["initContainers"][0]
        mount = next(m["mountPath"] for m in check["volumeMounts"] if m["name"] == "config")
        command = [
            sys.executable if part == "python" else part.replace(mount, str(tmp_path)) for part in check["command"]
        ]
        env = {e["name"]: e["value"] for e in check["env"]}
        done = subprocess.run(
            command,
            env={
                "PATH": os.environ["PATH"],
                "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                "HF_HUB_OFFLINE": "1",
                **env,
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == expected, done.stderr


def pod_security_level(pod: dict) -> str:
    """The most restrictive Pod Security level that admits `pod`, for the checks these pods can trip: a fake
    of kubernetes staging/src/k8s.io/pod-security-admission/policy (check_privileged.go,
    check_capabilities_baseline.go, check_hostPathVolumes.go; restricted: check_runAsNonRoot.go,
    check_runAsUser.go, check_allowPrivilegeEscalation.go, check_capabilities_restricted.go,
    check_seccompProfile_restricted.go, check_restrictedVolumes.go). Host namespaces, host ports, AppArmor,
    SELinux, /proc mount and sysctls are not modelled: the builders set none of them (asserted)."""
    pod_sc = pod.get("securityContext") or {}
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod) and "sysctls" not in pod_sc
    volume_types = {next(k for k in v if k != "name") for v in pod.get("volumes", [])}
    baseline = "hostPath" not in volume_types
    restricted = volume_types <= RESTRICTED_VOLUMES and pod_sc.get("runAsUser") != 0
    for container in containers(pod):
        sc = container.get("securityContext") or {}
        assert not container.get("ports") or all("hostPort" not in p for p in container["ports"])
        added = set((sc.get("capabilities") or {}).get("add") or [])
        baseline &= not sc.get("privileged") and added <= BASELINE_CAPABILITIES
        restricted &= (
            sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
            and sc.get("runAsUser") != 0
            and sc.get("allowPrivilegeEscalation") is False
            and "ALL" in (sc.get("capabilities") or {}).get("drop", [])
            and added <= {"NET_BIND_SERVICE"}
            and (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            in ("RuntimeDefault", "Localhost")
        )
    return "restricted" if baseline and restricted else "baseline" if baseline else "privileged"


@pytest.mark.parametrize(
    ("spec", "trainer_level"),
    [
        ({}, "restricted"),
        ({"trainer": {"capabilities": ["CHOWN"]}}, "baseline"),
        ({"trainer": {"capabilities": ["IPC_LOCK"]}}, "privileged"),
    ],
    ids=["default", "baseline-capability", "ipc-lock"],
)
def test_the_pod_security_level_each_pod_needs(spec, trainer_level):
    """The README's Pod Security row: every pod meets restricted, but a trainer with capabilities, which runs
    as root (baseline at best) and needs privileged for any capability outside baseline's list (IPC_LOCK)."""
    for name, pod in pod_templates(children(ctx(**spec), "t0ken", True)):
        expected = trainer_level if name == "qwen-trainer" else "restricted"
        assert pod_security_level(pod) == expected, name


def test_the_new_fields_render_schema_valid_pods():
    """With every field of these items set, the children still pass Kubernetes' own schemas (strict)."""
    c = ctx(
        OperatorSettings(request_gpu_cache_storage=True),
        imagePullSecrets=["registry"],
        serviceAccountName="trainer-sa",
        trainer={"capabilities": ["IPC_LOCK", "SYS_RESOURCE"], "cacheSize": "30Gi"},
        rollout={"cacheSize": "40Gi", "gpuProducts": ["NVIDIA-H100-80GB-HBM3"]},
        runPolicy={"gangScheduler": "kueue", "queue": "gpu"},
    )
    for obj in children(c, "t0ken", True):
        if obj["kind"] in ("Deployment", "Job"):
            kubernetes_validate.validate(obj, "1.30", strict=True)
        elif obj["kind"] == "Workload":
            for pod_set in obj["spec"]["podSets"]:
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
                kubernetes_validate.validate({**template, "template": pod_set["template"]}, "1.30", strict=True)
