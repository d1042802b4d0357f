"""Pure functions from a job's spec to the manifests of its children (dicts, no API calls).

One module per group of children: `config` (ConfigMap, Secret), `network` (NetworkPolicies),
`controller`, `rollout`, `trainer`, `gang` (Volcano PodGroup, Kueue Workload), and `storage` (the
checkpoint claim, created only on request and never owned). `children` renders them
in creation order; `child_keys` names them (kind, name) without rendering, for the reconciler to read
them back. Ownership (ownerReferences) is added by the reconciler, which knows the owner's uid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
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
    return [child.render() for child in _plan(ctx, token, active, gang_epoch, with_trainer, admitted)]


def child_keys(
    ctx: JobContext,
    active: bool,
    with_trainer: bool = True,
    admitted: Mapping[str, Placement] | None = ADMITTED_ANYWHERE,
) -> list[tuple[str, str]]:
    """(kind, name) of each child that `children` gives for the same arguments, in the same order, without
    rendering any (neither the token nor the gang epoch changes a key)."""
    return [(child.kind, child.name) for child in _plan(ctx, "", active, 0, with_trainer, admitted)]


@dataclass(frozen=True)
class _Child:
    kind: str
    name: str
    render: Callable[[], Manifest]


def _plan(
    ctx: JobContext,
    token: str,
    active: bool,
    gang_epoch: int,
    with_trainer: bool,
    admitted: Mapping[str, Placement] | None,
) -> list[_Child]:
    """The children in creation order: what a pod mounts, the policies that guard it and its gang exist
    before the pod."""
    replicas = 1 if active else 0
    kueue = ctx.spec.run_policy.gang_scheduler == "kueue"

    def placed(pod_set: str) -> Placement | None:
        return admitted.get(pod_set) if kueue and admitted else None

    plan = [
        _Child("ConfigMap", ctx.config_name, lambda: config.configmap(ctx)),
        _Child("Secret", ctx.token_name, lambda: config.token_secret(ctx, token)),
        *(
            _Child("NetworkPolicy", ctx.child(component), partial(network.policy, ctx, component))
            for component in network.GUARDED
        ),
    ]
    if ctx.spec.run_policy.gang_scheduler == "volcano":
        plan.append(_Child("PodGroup", ctx.child(gang.COMPONENT), lambda: gang.volcano_pod_group(ctx)))
    if kueue and active:
        plan.append(
            _Child(
                "Workload",
                ctx.child(gang.COMPONENT),
                lambda: gang.kueue_workload(ctx, rollout.deployment(ctx, replicas, gang_epoch), trainer.job(ctx)),
            )
        )
    plan += [
        _Child("Service", ctx.child(controller.COMPONENT), lambda: controller.service(ctx)),
        _Child("Deployment", ctx.child(controller.COMPONENT), lambda: controller.deployment(ctx, replicas)),
        _Child("Service", ctx.child(rollout.COMPONENT), lambda: rollout.service(ctx)),
    ]
    gang_allowed = not kueue or (active and admitted is not None)
    if gang_allowed:
        plan.append(
            _Child(
                "Deployment",
                ctx.child(rollout.COMPONENT),
                lambda: gang.place(rollout.deployment(ctx, replicas, gang_epoch), placed(gang.ROLLOUT_POD_SET)),
            )
        )
    plan.append(_Child("Service", ctx.child(trainer.COMPONENT), lambda: trainer.headless_service(ctx)))
    if active and with_trainer and gang_allowed:
        plan.append(
            _Child(
                "Job",
                ctx.child(trainer.COMPONENT),
                lambda: gang.place(trainer.job(ctx), placed(gang.TRAINER_POD_SET)),
            )
        )
    return plan


__all__ = [
    "JobContext",
    "Manifest",
    "child_keys",
    "children",
    "config",
    "controller",
    "gang",
    "network",
    "rollout",
    "trainer",
]
