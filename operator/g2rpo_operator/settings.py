"""Operator-wide defaults, read once from the environment (the operator Deployment / Helm values set them).

A job's placement fields override these per job; these override the built-in defaults, which target
A100 nodes as labelled by NVIDIA's GPU feature discovery (`nvidia.com/gpu.product`) and tolerate the
`nvidia.com/gpu` taint that GPU node pools usually carry. JSON is used for the structured values
(node selectors, tolerations) so that one env var holds one value, as in a Deployment's env list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator needs that is not in a job's spec."""

    controller_image: str = "ghcr.io/g2rpo/g2rpo-operator:0.1.0"
    """Image of the controller pods: the slim operator image, which also holds the controller."""
    trainer_image: str = "ghcr.io/g2rpo/g2rpo-trainer:0.1.0"
    rollout_image: str = "ghcr.io/g2rpo/g2rpo-trainer:0.1.0"
    """The trainer image ships vLLM and TRL, so `trl vllm-serve` runs from it by default."""
    gpu_node_selector: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_GPU_NODE_SELECTOR))
    gpu_tolerations: tuple[Mapping[str, Any], ...] = tuple(DEFAULT_GPU_TOLERATIONS)
    controller_node_selector: Mapping[str, str] = field(default_factory=dict)
    controller_tolerations: tuple[Mapping[str, Any], ...] = ()
    trainer_cpu: str = "32"
    trainer_memory: str = "256Gi"
    rollout_cpu: str = "8"
    rollout_memory: str = "64Gi"
    controller_cpu: str = "100m"
    controller_memory: str = "256Mi"
    image_pull_policy: str = "IfNotPresent"
    controller_url_template: str = "http://{name}-controller.{namespace}.svc:8080"
    """Where the operator reaches a job's controller; tests point it at loopback."""
    resync_seconds: float = 15.0
    """How often each job is reconciled even without events (status from children and controller)."""
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


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_ENV: dict[str, Any] = {
    "controller_image": str,
    "trainer_image": str,
    "rollout_image": str,
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
    "image_pull_policy": str,
    "controller_url_template": str,
    "resync_seconds": float,
    "http_timeout_seconds": float,
    "metrics_port": int,
    "health_port": int,
    "namespaces": _csv,
    "standalone": lambda raw: raw.strip().lower() in ("1", "true", "yes"),
    "peering_priority": int,
}
