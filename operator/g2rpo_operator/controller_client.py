"""What the operator reads from a job's guidance controller (g2rpo.controller.service).

GET /v1/guidance (bearer token) gives the step and the next guidance length; the accuracy reward
is not part of that answer, so it comes from the controller's public /metrics, where it is a
documented series (`g2rpo_accuracy_reward{rollouts="all"}`, else the schedule's driving reward
`g2rpo_schedule_reward`, which is the accuracy reward unless the job says otherwise), as do the
code sandbox's layers (`g2rpo_sandbox_layer_active{layer}`) of jobs with a code reward.
A controller that does not answer yields None: the status keeps its last known values.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class ControllerReport:
    step: int
    length: int
    reward: float | None
    sandbox_layers: dict[str, bool] | None = None
    """Jobs with a code reward, once a step was reported: which of the sandbox's layers hold."""


# The controller is in-cluster (or on loopback): never route it through an http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float, token: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with _OPENER.open(request, timeout=timeout) as response:
        return response.read()


def _from_metrics(metrics_text: str) -> tuple[float | None, dict[str, bool] | None]:
    """The reward, and the sandbox layers (`g2rpo_sandbox_layer_active`) when the job reports them."""
    found: dict[str, float] = {}
    layers: dict[str, bool] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "g2rpo_accuracy_reward" and sample.labels.get("rollouts") == "all":
                found["accuracy"] = sample.value
            elif sample.name == "g2rpo_schedule_reward":
                found["schedule"] = sample.value
            elif sample.name == "g2rpo_sandbox_layer_active":
                layers[sample.labels["layer"]] = sample.value >= 1
    return found.get("accuracy", found.get("schedule")), layers or None


def read_controller(base_url: str, token: str, timeout: float) -> ControllerReport | None:
    try:
        guidance = json.loads(_get(f"{base_url}/v1/guidance", timeout, token))
        metrics = _get(f"{base_url}/metrics", timeout).decode()
        reward, layers = _from_metrics(metrics)
        return ControllerReport(
            step=int(guidance["step"]), length=int(guidance["length"]), reward=reward, sandbox_layers=layers
        )
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError):
        return None
