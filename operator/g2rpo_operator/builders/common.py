"""Names, labels and pod fragments shared by every child of a G2RPOJob.

Everything here is a pure function of (job name, namespace, spec, operator settings): the
builders must give the same manifests for the same inputs, so that a re-run after a crash
creates exactly what the first run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from g2rpo.spec import G2RPOJobSpec, PodPlacementSpec

from g2rpo_operator.settings import OperatorSettings

Manifest = dict[str, Any]

MANAGED_BY = "g2rpo-operator"
APP_NAME = "g2rpo"

CONFIG_DIR = "/etc/g2rpo/config"
TOKEN_DIR = "/etc/g2rpo/token"
TOKEN_KEY = "token"
JOB_FILE = f"{CONFIG_DIR}/job.yaml"
ACCELERATE_FILE = f"{CONFIG_DIR}/accelerate.yaml"
CHECKPOINT_MOUNT = "/checkpoints"
CACHE_MOUNT = "/var/cache/g2rpo"
"""HOME and the Hugging Face cache of GPU pods: model downloads go to a volume, not the image layer."""

CONTROLLER_PORT = 8080
ROLLOUT_PORT = 8000
ROLLOUT_GROUP_PORT = 51216
"""TRL's NCCL weight-transfer port (vllm_group_port): vLLM workers connect to trainer rank 0 on it."""
RENDEZVOUS_PORT = 29500
RUN_AS_USER = 1000


def child_name(job: str, component: str) -> str:
    return f"{job}-{component}"


@dataclass(frozen=True)
class JobContext:
    """What every builder reads: the job's identity, its accepted spec and the operator's defaults."""

    name: str
    namespace: str
    spec: G2RPOJobSpec
    settings: OperatorSettings

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


def selector_labels(ctx: JobContext, component: str) -> dict[str, str]:
    """The immutable subset used in Deployment/Service selectors."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": ctx.name,
        "app.kubernetes.io/component": component,
    }


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


def resources(placement: PodPlacementSpec, cpu: str, memory: str, gpus: int = 0) -> Manifest:
    """CPU and memory requests; memory is also the limit (no overcommit), GPUs are limits (extended resource)."""
    mem = placement.memory or memory
    out: Manifest = {"requests": {"cpu": placement.cpu or cpu, "memory": mem}, "limits": {"memory": mem}}
    if gpus:
        out["limits"]["nvidia.com/gpu"] = gpus
    return out


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
