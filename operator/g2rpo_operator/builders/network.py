"""The job's NetworkPolicies: who may open connections to its pods (ingress; egress stays open for
model and dataset downloads).

`trl vllm-serve` runs vLLM with its development endpoints (weight pushes, resets) and the
controller's API changes the guidance state, so neither may be reachable from the whole cluster:

- rollout (`<job>-rollout`): only the job's own trainer pods, on every port. Port 8000 is the HTTP
  API; the weight sync then forms an NCCL communicator between trainer rank 0 and the vLLM workers,
  and NCCL listens on ephemeral ports on both sides, so no narrower port list can work. With rollout
  scraping on (settings scrape_rollout), the monitoring namespace may reach port 8000 too: vLLM serves
  /metrics there, beside its development endpoints, and has no separate metrics port.
- trainer (`<job>-trainer`): the job's other trainer pods (DeepSpeed rendezvous on 29500, then
  NCCL on ephemeral ports) and the job's rollout pod (TRL's weight-sync rendezvous on rank 0's port
  51216, then NCCL as above).
- controller (`<job>-controller`): port 8080 from the job's own pods and from the operator's pods
  (their labels in the operator's namespace, settings operator_pod_labels / operator_namespace);
  the same port serves /metrics, open to the monitoring namespace (settings monitoring_namespace,
  default "monitoring"). The API also requires the job's bearer token.

Kubelet probes come from the node and are not subject to these policies on common CNIs.
"""

from __future__ import annotations

from g2rpo.api.names import CONTROLLER_PORT, ROLLOUT_PORT
from g2rpo_operator.builders.common import JobContext, Manifest, job_labels, metadata, selector_labels

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _job_pods(ctx: JobContext, component: str | None = None) -> Manifest:
    """A peer: the job's pods (of one component); a bare podSelector means the policy's own namespace."""
    labels = selector_labels(ctx, component) if component else job_labels(ctx.name)
    return {"podSelector": {"matchLabels": labels}}


def _policy(ctx: JobContext, component: str, rules: list[Manifest]) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(ctx, component),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ctx, component)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


def _namespace(name: str) -> Manifest:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: name}}}


GUARDED = ("controller", "rollout", "trainer")
"""The components whose pods get a NetworkPolicy, named after the component, in creation order."""


def policies(ctx: JobContext) -> list[Manifest]:
    return [policy(ctx, component) for component in GUARDED]


def policy(ctx: JobContext, component: str) -> Manifest:
    return _policy(ctx, component, _ingress(ctx)[component])


def _ingress(ctx: JobContext) -> dict[str, list[Manifest]]:
    settings = ctx.settings
    api_port = [{"protocol": "TCP", "port": CONTROLLER_PORT}]
    rollout_port = [{"protocol": "TCP", "port": ROLLOUT_PORT}]
    operator = {
        **_namespace(settings.operator_namespace),
        "podSelector": {"matchLabels": dict(settings.operator_pod_labels)},
    }
    return {
        "controller": [
            {"from": [_job_pods(ctx), operator], "ports": api_port},
            {"from": [_namespace(settings.monitoring_namespace)], "ports": api_port},
        ],
        "rollout": [
            {"from": [_job_pods(ctx, "trainer")]},
            *(
                [{"from": [_namespace(settings.monitoring_namespace)], "ports": rollout_port}]
                if settings.scrape_rollout
                else []
            ),
        ],
        "trainer": [{"from": [_job_pods(ctx, "trainer"), _job_pods(ctx, "rollout")]}],
    }
