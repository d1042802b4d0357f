"""Pure functions from a job's spec to the manifests of its children (dicts, no API calls).

One module per group of children: `config` (ConfigMap, Secret), `network` (NetworkPolicies),
`controller`, `rollout`, `trainer`, `gang` (Volcano PodGroup, Kueue Workload). `children` lists them
in creation order: what a pod mounts, the policies that guard it and its gang exist before the pod.
Ownership (ownerReferences) is added by the reconciler, which knows the owner's uid.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from g2rpo_operator.builders import config, controller, gang, network, rollout, trainer
from g2rpo_operator.builders.common import JobContext, Manifest

if TYPE_CHECKING:
    from g2rpo_operator.kueue import Placement

ADMITTED_ANYWHERE: Mapping[str, Placement] = MappingProxyType({})
"""Kueue's admission with nothing added to the pod templates (what `g2rpo render` shows)."""


def children(
    ctx: JobContext,
    token: str,
    active: bool,
    gang_epoch: int = 0,
    with_trainer: bool = True,
    admitted: Mapping[str, Placement] | None = ADMITTED_ANYWHERE,
) -> list[Manifest]:
    """Every child of the job. `active` False (suspended or finished): workloads at zero, no trainer Job.
    `gang_epoch` counts gang restarts (the rollout pod is replaced when it rises); `with_trainer` False
    leaves the trainer Job out (it waits for the rollout, see reconcile.py).

    Under Kueue the Workload stands for the GPU gang while the job is active; `admitted` is the
    placement Kueue granted each pod set, or None while it has not admitted the Workload: then the
    rollout Deployment and the trainer Job are left out. Without Kueue it is ignored."""
    replicas = 1 if active else 0
    kueue = ctx.spec.run_policy.gang_scheduler == "kueue"
    rollout_deployment = rollout.deployment(ctx, replicas, gang_epoch)
    trainer_job = trainer.job(ctx)
    objs = [
        config.configmap(ctx),
        config.token_secret(ctx, token),
        *network.policies(ctx),
    ]
    if ctx.spec.run_policy.gang_scheduler == "volcano":
        objs.append(gang.volcano_pod_group(ctx))
    if kueue and active:
        objs.append(gang.kueue_workload(ctx, rollout_deployment, trainer_job))
    objs += [
        controller.service(ctx),
        controller.deployment(ctx, replicas),
        rollout.service(ctx),
    ]
    gang_allowed = not kueue or (active and admitted is not None)
    if gang_allowed:
        objs.append(gang.place(rollout_deployment, admitted.get(gang.ROLLOUT_POD_SET) if kueue and admitted else None))
    objs.append(trainer.headless_service(ctx))
    if active and with_trainer and gang_allowed:
        objs.append(gang.place(trainer_job, admitted.get(gang.TRAINER_POD_SET) if kueue and admitted else None))
    return objs


__all__ = ["JobContext", "Manifest", "children", "config", "controller", "gang", "network", "rollout", "trainer"]
