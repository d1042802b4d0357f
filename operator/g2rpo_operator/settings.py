"""Operator-wide defaults, read once from the environment (the operator Deployment / Helm values set them).

A job's placement fields override these per job; these override the built-in defaults, which target
A100 nodes however the cluster labels them (see builders/common.py `GPU_NODE_LABELS`: GPU feature
discovery's `nvidia.com/gpu.product`, GKE's `cloud.google.com/gke-accelerator`, the instance types of
EKS, AKS and GCE) and tolerate the `nvidia.com/gpu` taint that GPU node pools usually carry. Where
none of these labels tells an A100 node, set G2RPO_GPU_PRODUCTS to `[]` (no product constraint) and
G2RPO_GPU_NODE_SELECTOR to the pool's own label. JSON is used
for the structured values (node selectors, tolerations, products) so that one env var holds one
value, as in a Deployment's env list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KUEUE_VERSIONS = ("v1beta2", "v1beta1")
"""Kueue's API versions the operator speaks, newest first: v1beta2 from Kueue 0.15 on (its storage
version from 0.16), v1beta1 until Kueue stopped serving it. The fields the operator reads and
writes are the same in both, but for a Workload's priority class."""

A100_GFD_PRODUCTS = (
    "NVIDIA-A100-SXM4-80GB",
    "NVIDIA-A100-SXM4-40GB",
    "NVIDIA-A100-80GB-PCIe",
    "NVIDIA-A100-PCIE-40GB",
)
"""nvidia.com/gpu.product of A100 nodes as GPU feature discovery (the GPU operator) spells it: NVML's device
name with spaces as dashes (80/40 GB, SXM/PCIe). MIG and time-slicing add suffixes (`-MIG-1g.10gb`,
`-SHARED`) that these exact values do not match."""
A100_GKE_ACCELERATORS = ("nvidia-a100-80gb", "nvidia-tesla-a100")
"""cloud.google.com/gke-accelerator of GKE's A100 node pools (80 GB; 40 GB), set with or without GKE's
managed driver."""
A100_INSTANCE_TYPES = (
    # EKS (AWS): p4d 8x A100 40GB, p4de 8x A100 80GB.
    "p4d.24xlarge",
    "p4de.24xlarge",
    # AKS (Azure): ND A100 v4 (8x 40GB), NDm A100 v4 (8x 80GB), NC A100 v4 (1-4x 80GB PCIe). AKS's own
    # kubernetes.azure.com/accelerator label is `nvidia` on every GPU size, so it cannot tell an A100.
    "Standard_ND96asr_v4",
    "Standard_ND96amsr_A100_v4",
    "Standard_NC24ads_A100_v4",
    "Standard_NC48ads_A100_v4",
    "Standard_NC96ads_A100_v4",
    # GCE machine types (GKE nodes carry them too; they matter where gke-accelerator is absent).
    "a2-highgpu-1g",
    "a2-highgpu-2g",
    "a2-highgpu-4g",
    "a2-highgpu-8g",
    "a2-megagpu-16g",
    "a2-ultragpu-1g",
    "a2-ultragpu-2g",
    "a2-ultragpu-4g",
    "a2-ultragpu-8g",
)
"""node.kubernetes.io/instance-type (set by each cloud's node controller) of machines whose GPUs are all A100."""
DEFAULT_GPU_PRODUCTS = A100_GFD_PRODUCTS + A100_GKE_ACCELERATORS + A100_INSTANCE_TYPES
"""What an A100 node is called under each GPU node label (builders/common.py GPU_NODE_LABELS). The names
of the three labels do not overlap, so one list serves them all."""
DEFAULT_OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "g2rpo", "app.kubernetes.io/component": "operator"}
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator needs that is not in a job's spec."""

    controller_image: str = "ghcr.io/g2rpo/g2rpo-operator:0.1.0"
    """Image of the controller pods: the slim operator image, which also holds the controller."""
    trainer_image: str = "ghcr.io/g2rpo/g2rpo-trainer:0.1.0"
    rollout_image: str = "ghcr.io/g2rpo/g2rpo-trainer:0.1.0"
    """The trainer image ships vLLM and TRL, so `trl vllm-serve` runs from it by default."""
    gpu_products: tuple[str, ...] = DEFAULT_GPU_PRODUCTS
    """GPU pods run only on nodes where one of the GPU node labels (GPU feature discovery's product, GKE's
    accelerator, the instance type) has one of these values (a required node affinity); empty: any node."""
    gpu_node_selector: Mapping[str, str] = field(default_factory=dict)
    """An exact node selector for GPU pods, on top of the product affinity (e.g. a node pool label)."""
    gpu_tolerations: tuple[Mapping[str, Any], ...] = tuple(DEFAULT_GPU_TOLERATIONS)
    controller_node_selector: Mapping[str, str] = field(default_factory=dict)
    controller_tolerations: tuple[Mapping[str, Any], ...] = ()
    trainer_cpu: str = "32"
    trainer_memory: str = "256Gi"
    rollout_cpu: str = "8"
    rollout_memory: str = "64Gi"
    controller_cpu: str = "100m"
    controller_memory: str = "256Mi"
    gpu_cache_size: str = "24Gi"
    """sizeLimit of the GPU pods' cache volume (HOME, HF_HOME: the model download, DeepSpeed's op builds,
    Triton's and vLLM's compile caches): the bf16 weights of a 7B model (7.6e9 parameters x 2 bytes =
    15.2 GB for Qwen2.5-7B) and a few GB of compiled kernels. A limit only: requested as well only with
    request_gpu_cache_storage, so that the default fits a GKE node's ~44 GiB allocatable disk, an EKS
    node group's 20 GiB root volume and a Kueue ClusterQueue without ephemeral-storage quota."""
    request_gpu_cache_storage: bool = False
    """Also request the cache's size as the GPU pods' ephemeral-storage (the scheduler then places them only
    on nodes with that much allocatable disk); with Kueue, the ClusterQueue must then cover ephemeral-storage."""
    image_pull_secrets: tuple[str, ...] = ()
    """Secrets (in each job's namespace) for pulling the images of every job's pods."""
    service_account_name: str | None = None
    """ServiceAccount of the trainer and rollout pods (e.g. one bound to a cloud IAM role for object storage);
    None: the namespace's default."""
    controller_scratch_size: str = "1Gi"
    """sizeLimit of the controller's /tmp, also its ephemeral-storage request."""
    image_pull_policy: str = "IfNotPresent"
    kueue_enabled: bool = False
    """The Kueue integration: jobs with runPolicy.gangScheduler kueue get a Workload, which the operator
    watches (Kueue must serve kueue.x-k8s.io v1beta2 or v1beta1). Off, such jobs are refused."""
    kueue_api_version: str = "v1beta2"
    """The Kueue API version spoken: the operator sets it at startup to the newest one Kueue serves;
    `g2rpo render` prints the Workload in this one."""
    kueue_queue: str | None = None
    """The Kueue LocalQueue of jobs with runPolicy.gangScheduler kueue that name no queue."""
    storage_class_name: str | None = None
    """StorageClass of checkpoint claims the operator creates (checkpoint.volumeSize) that name none;
    None leaves it to the cluster's default class."""
    operator_namespace: str = "g2rpo-system"
    """Where the operator's pods run: the jobs' NetworkPolicies admit its pods to the controllers' API,
    and its token signing key (token_key_secret) is kept there."""
    token_key_secret: str = "g2rpo-operator-token-key"
    """The Secret in operator_namespace holding the key the jobs' controller tokens are derived from
    (tokens.py); the operator reads only this Secret, by name, and creates it if absent."""
    operator_pod_labels: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_OPERATOR_POD_LABELS))
    """Labels selecting the operator's pods (in operator_namespace) in the jobs' NetworkPolicies."""
    monitoring_namespace: str = "monitoring"
    """The namespace whose pods (Prometheus) may scrape the controllers' /metrics through the NetworkPolicy."""
    scrape_rollout: bool = False
    """Admit monitoring_namespace to the rollout's port too, where vLLM serves /metrics. The same port
    serves vLLM's development endpoints (weight pushes), so it opens only when a Pod/ServiceMonitor scrapes it."""
    controller_url_template: str | None = None
    """Where the operator reaches a job's controller ({name} and {namespace} filled in); unset: the
    job's controller Service, as the trainer reaches it. Tests point it at loopback."""
    resync_seconds: float = 1800.0
    """How often each job gets a full pass that reads every child from the API, even without events.
    Changes reach the operator through watches; this only repairs what a lost watch event missed."""
    poll_seconds: float = 30.0
    """How often a running job's pass runs from the watch cache (no API reads): the controller's progress
    (step, reward) for the status and the deadline; also a job missing an unwatched reference (a Secret)."""
    http_timeout_seconds: float = 3.0
    metrics_port: int = 9090
    health_port: int = 8081
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty means cluster-wide."""
    standalone: bool = False
    """Skip kopf peering (one replica, or a development run without the peering CRDs)."""
    peering_priority: int | None = None
    """kopf peering priority; None derives it from the start time, so the newest replica leads."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read `G2RPO_*` variables; unset ones keep the defaults above."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, kind in _ENV.items():
            raw = env.get(f"G2RPO_{name.upper()}")
            if raw is None:
                continue
            try:
                values[name] = kind(raw)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"G2RPO_{name.upper()}: cannot parse {raw!r}: {exc}") from None
        return cls(**values)


def _json_mapping(raw: str) -> dict[str, str]:
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("expected a JSON object of strings")
    return value


def _json_list(raw: str) -> tuple[dict[str, Any], ...]:
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError("expected a JSON list of objects")
    return tuple(value)


def _json_strings(raw: str) -> tuple[str, ...]:
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a JSON list of strings")
    return tuple(value)


def _kueue_version(raw: str) -> str:
    if raw not in KUEUE_VERSIONS:
        raise ValueError(f"expected one of {', '.join(KUEUE_VERSIONS)}")
    return raw


def _flag(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes")


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_ENV: dict[str, Any] = {
    "controller_image": str,
    "trainer_image": str,
    "rollout_image": str,
    "gpu_products": _json_strings,
    "gpu_node_selector": _json_mapping,
    "gpu_tolerations": _json_list,
    "controller_node_selector": _json_mapping,
    "controller_tolerations": _json_list,
    "trainer_cpu": str,
    "trainer_memory": str,
    "rollout_cpu": str,
    "rollout_memory": str,
    "controller_cpu": str,
    "controller_memory": str,
    "gpu_cache_size": str,
    "request_gpu_cache_storage": _flag,
    "image_pull_secrets": _json_strings,
    "service_account_name": str,
    "controller_scratch_size": str,
    "image_pull_policy": str,
    "kueue_enabled": _flag,
    "kueue_api_version": _kueue_version,
    "kueue_queue": str,
    "storage_class_name": str,
    "operator_namespace": str,
    "token_key_secret": str,
    "operator_pod_labels": _json_mapping,
    "monitoring_namespace": str,
    "scrape_rollout": _flag,
    "controller_url_template": str,
    "resync_seconds": float,
    "poll_seconds": float,
    "http_timeout_seconds": float,
    "metrics_port": int,
    "health_port": int,
    "namespaces": _csv,
    "standalone": _flag,
    "peering_priority": int,
}
