"""Names, labels and pod fragments shared by every child of a G2RPOJob.

Everything here is a pure function of (job name, namespace, spec, operator settings): the
builders must give the same manifests for the same inputs, so that a re-run after a crash
creates exactly what the first run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from g2rpo.api.names import CHECKPOINT_MOUNT, CONFIG_DIR, CONTROLLER_PORT, ROLLOUT_PORT, TOKEN_DIR
from g2rpo.api.spec import G2RPOJobSpec, GpuPlacementSpec, PodPlacementSpec
from g2rpo_operator.settings import OperatorSettings

Manifest = dict[str, Any]

MANAGED_BY = "g2rpo-operator"
APP_NAME = "g2rpo"

CACHE_MOUNT = "/var/cache/g2rpo"
"""HOME and the Hugging Face cache of GPU pods: model downloads go to a volume, not the image layer."""

RUN_AS_USER = 1000
GPU_NODE_LABELS = (
    "nvidia.com/gpu.product",
    "cloud.google.com/gke-accelerator",
    "node.kubernetes.io/instance-type",
)
"""The node labels that say which GPU a node has, one nodeSelectorTerm each (the terms are ORed): GPU
feature discovery's (NVIDIA's GPU operator; absent under GKE's managed driver and EKS's bare device
plugin), GKE's (every GPU node pool), and the cloud node controller's machine type (EKS, AKS, GCE: AKS's
kubernetes.azure.com/accelerator is only `nvidia`)."""
NO_GPU = {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}
"""For a container of a GPU image that asks for no GPU: the image sets NVIDIA_VISIBLE_DEVICES=all, which on a
node whose NVIDIA runtime reads the variable hands the container every GPU of the node; `void` exposes
none (NVIDIA container toolkit, internal/config/image/cuda_image.go: void, like unset, means no GPU)."""
GANG_EPOCH_ANNOTATION = "g2rpo.dev/gang-epoch"
"""On the rollout's pod template: the number of gang restarts so far. Raising it makes the Deployment
replace the vLLM pod, so that a restarted trainer meets a fresh server (no stale NCCL group)."""


def child_name(job: str, component: str) -> str:
    return f"{job}-{component}"


@dataclass(frozen=True)
class JobContext:
    """What every builder reads: the job's identity, its accepted spec and the operator's defaults."""

    name: str
    namespace: str
    spec: G2RPOJobSpec
    settings: OperatorSettings
    workload_priority: int | None = None
    """The value of runPolicy.priorityClassName's PriorityClass, read from the cluster: Kueue orders and
    preempts Workloads by it (None: not read, as in `g2rpo render`)."""

    def child(self, component: str) -> str:
        return child_name(self.name, component)

    @property
    def config_name(self) -> str:
        return self.child("config")

    @property
    def token_name(self) -> str:
        return self.child("token")

    def service_host(self, component: str) -> str:
        return f"{self.child(component)}.{self.namespace}.svc"

    @property
    def controller_url(self) -> str:
        return f"http://{self.service_host('controller')}:{CONTROLLER_PORT}"

    @property
    def rollout_url(self) -> str:
        return f"http://{self.service_host('rollout')}:{ROLLOUT_PORT}"

    @property
    def checkpoint_dir(self) -> str:
        return self.spec.checkpoint.dir or f"{CHECKPOINT_MOUNT}/{self.name}"

    @classmethod
    def resolve(cls, name: str, namespace: str, spec: G2RPOJobSpec, settings: OperatorSettings) -> JobContext:
        """The context with the spec as it runs on the cluster: checkpoint.dir defaults to a folder per job
        on the claim, so that two jobs sharing a claim never resume from each other's checkpoints."""
        checkpoint = spec.checkpoint.model_copy(update={"dir": spec.checkpoint.dir or f"{CHECKPOINT_MOUNT}/{name}"})
        return cls(name, namespace, spec.model_copy(update={"checkpoint": checkpoint}), settings)


INSTANCE_LABEL = "app.kubernetes.io/instance"
"""Names the job on each of its objects and pods (the watches wake the job it names)."""
COMPONENT_LABEL = "app.kubernetes.io/component"


def job_labels(name: str) -> dict[str, str]:
    """What every object and pod of job `name` carries, whatever its component."""
    return {"app.kubernetes.io/name": APP_NAME, INSTANCE_LABEL: name}


COMPONENT_LABEL = "app.kubernetes.io/component"


def selector_labels(ctx: JobContext, component: str) -> dict[str, str]:
    """The immutable subset used in Deployment/Service selectors."""
    return {**job_labels(ctx.name), COMPONENT_LABEL: component}


def labels(ctx: JobContext, component: str) -> dict[str, str]:
    """The recommended app.kubernetes.io/* labels of every child object and pod."""
    return {
        **selector_labels(ctx, component),
        "app.kubernetes.io/part-of": APP_NAME,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def recreate_deployment(
    ctx: JobContext, component: str, replicas: int, pod_spec: Manifest, annotations: dict[str, str] | None = None
) -> Manifest:
    """A Deployment that replaces its pod rather than rolling: never two pods of `component` at once."""
    pod_metadata: Manifest = {"labels": labels(ctx, component)}
    if annotations:
        pod_metadata["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(ctx, component),
        "spec": {
            "replicas": replicas,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(ctx, component)},
            "template": {"metadata": pod_metadata, "spec": pod_spec},
        },
    }


def metadata(ctx: JobContext, component: str, name: str | None = None, **extra: Any) -> Manifest:
    return {"name": name or ctx.child(component), "namespace": ctx.namespace, "labels": labels(ctx, component), **extra}


def pod_security_context() -> Manifest:
    """Non-root with a fixed uid/gid, so that files on the checkpoint claim are writable (fsGroup)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        # Without it the kubelet re-chowns every checkpoint file at each pod start: minutes on a big claim.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(read_only_root: bool) -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


def node_selector(placement: PodPlacementSpec, default: Any) -> dict[str, str]:
    return dict(default if placement.node_selector is None else placement.node_selector)


def tolerations(placement: PodPlacementSpec, default: Any) -> list[Manifest]:
    if placement.tolerations is None:
        return [dict(t) for t in default]
    return [t.model_dump(by_alias=True, exclude_none=True) for t in placement.tolerations]


def gpu_values(placement: GpuPlacementSpec, default_products: Any) -> list[str]:
    """The GPU names the pods accept under each of GPU_NODE_LABELS; empty: no GPU constraint."""
    return list(default_products if placement.gpu_products is None else placement.gpu_products)


def gpu_affinity(placement: GpuPlacementSpec, default_products: Any) -> Manifest | None:
    """A required node affinity on the GPU node labels (None: no GPU constraint). One term per label, so a
    node matches through whichever label its cloud or operator sets; the labels' namespaces of names do not
    overlap, so a value of one never matches a node through another."""
    products = gpu_values(placement, default_products)
    if not products:
        return None
    terms = [{"matchExpressions": [{"key": key, "operator": "In", "values": products}]} for key in GPU_NODE_LABELS]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def gpu_placement(placement: GpuPlacementSpec, ctx: JobContext) -> Manifest:
    """The pod-spec fields that put a GPU pod on a GPU node: selector, GPU affinity, tolerations."""
    settings = ctx.settings
    out: Manifest = {
        "nodeSelector": node_selector(placement, settings.gpu_node_selector),
        "tolerations": tolerations(placement, settings.gpu_tolerations),
    }
    affinity = gpu_affinity(placement, settings.gpu_products)
    if affinity:
        out["affinity"] = affinity
    return out


def placement_hint(placement: GpuPlacementSpec, ctx: JobContext, component: str) -> str:
    """What to tell the user when no node matches a GPU pod's selector or affinity: what was required, and
    the fields that change it."""
    selector = node_selector(placement, ctx.settings.gpu_node_selector)
    products = gpu_values(placement, ctx.settings.gpu_products)
    wanted = []
    if products:
        wanted.append(f"one of the labels {', '.join(GPU_NODE_LABELS)} with a value in [{', '.join(products)}]")
    if selector:
        wanted.append("the labels " + ", ".join(f"{k}={v}" for k, v in selector.items()))
    return (
        f"the {component} pods need a node with {' and '.join(wanted) or 'no particular label'}; if your GPU "
        f"nodes are labelled otherwise, set spec.{component}.gpuProducts to their values (chart "
        f"jobDefaults.gpuProducts for every job), or gpuProducts: [] and spec.{component}.nodeSelector (chart "
        "jobDefaults.gpuNodeSelector) to a label of your GPU nodes"
    )


def placement_hints(ctx: JobContext) -> dict[str, str]:
    """placement_hint of each GPU component, by its component label."""
    spec = ctx.spec
    return {
        "trainer": placement_hint(spec.trainer, ctx, "trainer"),
        "rollout": placement_hint(spec.rollout, ctx, "rollout"),
    }


def cache_size(placement: GpuPlacementSpec, ctx: JobContext) -> str:
    return placement.cache_size or ctx.settings.gpu_cache_size


def requests_cache_storage(placement: GpuPlacementSpec, ctx: JobContext) -> bool:
    """Whether a GPU pod's containers request ephemeral-storage (see settings.request_gpu_cache_storage)."""
    wanted = placement.request_cache_storage
    return ctx.settings.request_gpu_cache_storage if wanted is None else wanted


def pod_identity(ctx: JobContext, with_service_account: bool) -> Manifest:
    """imagePullSecrets and (GPU pods) serviceAccountName. The token stays unmounted: the pods never call the
    API, and the clouds' workload-identity webhooks project their own token volumes."""
    secrets = ctx.spec.image_pull_secrets
    names = list(ctx.settings.image_pull_secrets if secrets is None else secrets)
    out: Manifest = {"automountServiceAccountToken": False}
    account = ctx.spec.service_account_name or ctx.settings.service_account_name
    if with_service_account and account:
        out["serviceAccountName"] = account
    if names:
        out["imagePullSecrets"] = [{"name": name} for name in names]
    return out


def resources(placement: PodPlacementSpec, cpu: str, memory: str, scratch: str | None, gpus: int = 0) -> Manifest:
    """CPU, memory and ephemeral-storage (`scratch`: the pod's emptyDirs; None: not requested) requests; memory
    is also the limit (no overcommit); GPUs and the spec's extra resources (RDMA devices) are limits, as
    extended resources must be."""
    mem = placement.memory or memory
    requests: Manifest = {"cpu": placement.cpu or cpu, "memory": mem}
    if scratch:
        requests["ephemeral-storage"] = scratch
    out: Manifest = {"requests": requests, "limits": {"memory": mem}}
    if gpus:
        out["limits"]["nvidia.com/gpu"] = gpus
    for name, quantity in placement.extra_resources.items():
        out["requests"][name] = out["limits"][name] = quantity
    return out


def placement_env(placement: PodPlacementSpec) -> list[Manifest]:
    """spec.<component>.env, after the operator's own variables (a later duplicate wins in Kubernetes)."""
    return [{"name": var.name, "value": var.value} for var in placement.env]


def scratch_volume(name: str, size: str) -> Manifest:
    """A disk-backed emptyDir with a size limit: past it the kubelet evicts the pod rather than fill the node."""
    return {"name": name, "emptyDir": {"sizeLimit": size}}


def config_volume(ctx: JobContext) -> Manifest:
    return {"name": "config", "configMap": {"name": ctx.config_name}}


def token_volume(ctx: JobContext) -> Manifest:
    return {"name": "token", "secret": {"secretName": ctx.token_name, "defaultMode": 0o440}}


def shm_volume(size: str) -> Manifest:
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def config_mounts() -> list[Manifest]:
    return [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]


def secret_env(ctx: JobContext) -> dict[str, list[Manifest]]:
    """The container fields for spec.envFromSecret (none when unset)."""
    name = ctx.spec.env_from_secret
    return {"envFrom": [{"secretRef": {"name": name}}]} if name else {}


def cache_env() -> list[Manifest]:
    return [{"name": "HOME", "value": CACHE_MOUNT}, {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"}]
