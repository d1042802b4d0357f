"""Pure functions from a job's spec to the manifests of its children (dicts, no API calls).

One module per group of children: `config` (ConfigMap, Secret), `controller`, `rollout`, `trainer`.
`children` lists them in creation order: what a pod mounts exists before the pod is created.
Ownership (ownerReferences) is added by the reconciler, which knows the owner's uid.
"""

from __future__ import annotations

from g2rpo_operator.builders import config, controller, rollout, trainer
from g2rpo_operator.builders.common import JobContext, Manifest


def children(ctx: JobContext, token: str, active: bool) -> list[Manifest]:
    """Every child of the job. `active` False (suspended or finished): workloads at zero, no trainer Job."""
    replicas = 1 if active else 0
    objs = [
        config.configmap(ctx),
        config.token_secret(ctx, token),
        controller.service(ctx),
        controller.deployment(ctx, replicas),
        rollout.service(ctx),
        rollout.deployment(ctx, replicas),
        trainer.headless_service(ctx),
    ]
    if ctx.spec.run_policy.gang_scheduler == "volcano":
        objs.append(trainer.volcano_pod_group(ctx))
    if active:
        objs.append(trainer.job(ctx))
    return objs


__all__ = ["JobContext", "Manifest", "children", "config", "controller", "rollout", "trainer"]
