"""The GPU gang: the rollout pod and every trainer pod, admitted together by a gang scheduler.

Volcano: one PodGroup `<job>-gang` with minMember = trainer.replicas + 1; the rollout's and the
trainer's pods both name it (annotation scheduling.k8s.io/group-name) and use the volcano scheduler,
so no GPU is bound until all of them fit. Because Volcano waits for minMember pods to exist, the
operator creates the trainer Job together with the rollout under volcano; the trainer then waits
for the server in process (TRL's vllm_server_timeout = rollout.startupTimeoutSeconds).

Kueue: the trainer Job is one workload (Kueue admits all its ranks or none, and unsuspends it); the
rollout Deployment carries the same queue label, which Kueue's Deployment integration admits as a
workload of its own. Kueue's plain-pod groups (kueue.x-k8s.io/pod-group-name) cannot join them into
one: Kueue leaves pods whose owner is a kind it integrates (batch/Job) to that integration, so the
trainer's pods never enter a pod group. Without a gang scheduler, and under Kueue, the operator
creates the trainer Job only once the rollout is Available (see reconcile.py).
"""

from __future__ import annotations

from g2rpo_operator.builders.common import JobContext, Manifest, metadata

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COMPONENT = "gang"


def kueue_queue(ctx: JobContext) -> str:
    """The job's Kueue LocalQueue: its own, else the operator's default (validate() requires one of them)."""
    return ctx.spec.run_policy.queue or ctx.settings.kueue_queue or ""


def volcano_pod_fields(ctx: JobContext) -> dict[str, str]:
    """The pod-template annotations that put a pod into the job's Volcano gang."""
    return {VOLCANO_GROUP_ANNOTATION: ctx.child(COMPONENT)}


def volcano_pod_group(ctx: JobContext) -> Manifest:
    """Volcano's gang: no pod of it is bound until the rollout pod and all trainer pods fit."""
    policy = ctx.spec.run_policy
    group_spec: Manifest = {"minMember": ctx.spec.trainer.replicas + 1, "queue": policy.queue or "default"}
    if policy.priority_class_name:
        group_spec["priorityClassName"] = policy.priority_class_name
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": metadata(ctx, COMPONENT),
        "spec": group_spec,
    }


def trainer_waits_in_process(ctx: JobContext) -> bool:
    """Whether the trainer Job is created with the rollout (volcano: the gang must exist whole)."""
    return ctx.spec.run_policy.gang_scheduler == "volcano"
