"""Pure functions from a job's spec to the manifests of its children (dicts, no API calls).

One module per group of children: `config` (ConfigMap, Secret), `network` (NetworkPolicies),
`controller`, `rollout`, `trainer`, `gang` (Volcano PodGroup, Kueue labels). `children` lists them
in creation order: what a pod mounts, the policies that guard it and its gang exist before the pod.
Ownership (ownerReferences) is added by the reconciler, which knows the owner's uid.
"""

from __future__ import annotations

from g2rpo_operator.builders import config, controller, gang, network, rollout, trainer
from g2rpo_operator.builders.common import JobContext, Manifest


def children(
    ctx: JobContext, token: str, active: bool, gang_epoch: int = 0, with_trainer: bool = True
) -> list[Manifest]:
    """Every child of the job. `active` False (suspended or finished): workloads at zero, no trainer Job.
    `gang_epoch` counts gang restarts (the rollout pod is replaced when it rises); `with_trainer` False
    leaves the trainer Job out (it waits for the rollout, see reconcile.py)."""
    replicas = 1 if active else 0
    objs = [
        config.configmap(ctx),
        config.token_secret(ctx, token),
        *network.policies(ctx),
    ]
    if ctx.spec.run_policy.gang_scheduler == "volcano":
        objs.append(gang.volcano_pod_group(ctx))
    objs += [
        controller.service(ctx),
        controller.deployment(ctx, replicas),
        rollout.service(ctx),
        rollout.deployment(ctx, replicas, gang_epoch),
        trainer.headless_service(ctx),
    ]
    if active and with_trainer:
        objs.append(trainer.job(ctx))
    return objs


__all__ = ["JobContext", "Manifest", "children", "config", "controller", "gang", "network", "rollout", "trainer"]
