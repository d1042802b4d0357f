"""The GPU gang: the rollout pod and every trainer pod, admitted together by a gang scheduler.

Volcano: one PodGroup `<job>-gang` with minMember = trainer.replicas + 1; the rollout's and the
trainer's pods both name it (annotation scheduling.k8s.io/group-name) and use the volcano scheduler,
so no GPU is bound until all of them fit. Because Volcano waits for minMember pods to exist, the
operator creates the trainer Job together with the rollout under volcano; the trainer then waits
for the server in process (TRL's vllm_server_timeout = rollout.startupTimeoutSeconds).

Kueue: one Workload `<job>-gang` with two pod sets, `rollout` (1 pod) and `trainer` (trainer.replicas
pods), their templates copied from the Deployment's and the Job's, so Kueue reserves quota for the
whole gang or none of it. The operator acts as Kueue's integration for G2RPOJobs (kueue.py): it
creates the rollout Deployment and the trainer Job only once the Workload is admitted, with the
placement Kueue granted (`place`), and neither carries a queue label of its own. (Kueue's plain-pod
groups cannot join a Deployment's pod and a Job's pods: Kueue leaves pods whose owner is a kind it
integrates to that integration.) As under Volcano, the trainer Job is created together with the
rollout and waits for the server in process: Kueue's waitForPodsReady evicts a Workload whose pods
are not all ready within its timeout, and creating the trainer only after vLLM is up would spend that
timeout on vLLM's load and then on the trainer's image pull and start, one after the other.
Without a gang scheduler the operator creates the trainer Job only once the rollout is Available
(see reconcile.py).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from g2rpo_operator.builders.common import JobContext, Manifest, metadata

if TYPE_CHECKING:
    from g2rpo_operator.kueue import Placement

VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COMPONENT = "gang"


ROLLOUT_POD_SET = "rollout"
TRAINER_POD_SET = "trainer"


def kueue_queue(ctx: JobContext) -> str:
    """The job's Kueue LocalQueue: its own, else the operator's default (validate() requires one of them)."""
    return ctx.spec.run_policy.queue or ctx.settings.kueue_queue or ""


def kueue_workload(ctx: JobContext, rollout_deployment: Manifest, trainer_job: Manifest) -> Manifest:
    """Kueue's unit of admission for the whole gang: quota for the rollout pod and every trainer pod at once.

    The pod sets copy the children's pod templates (Kueue sums their containers' requests); the
    gang-epoch annotation is left out, so the Workload stays the same across gang restarts."""

    def pod_set(name: str, count: int, owner: Manifest) -> Manifest:
        template = copy.deepcopy(owner["spec"]["template"])
        template["metadata"].pop("annotations", None)
        return {"name": name, "count": count, "template": template}

    policy = ctx.spec.run_policy
    spec: Manifest = {
        "queueName": kueue_queue(ctx),
        "podSets": [
            pod_set(ROLLOUT_POD_SET, 1, rollout_deployment),
            pod_set(TRAINER_POD_SET, ctx.spec.trainer.replicas, trainer_job),
        ],
    }
    version = ctx.settings.kueue_api_version
    if policy.priority_class_name and ctx.workload_priority is not None:
        # Kueue's CRD refuses a priority class without its value (Kueue's own integrations copy it too).
        spec["priority"] = ctx.workload_priority
        if version == "v1beta1":
            spec["priorityClassName"] = policy.priority_class_name
            spec["priorityClassSource"] = "scheduling.k8s.io/priorityclass"
        else:
            spec["priorityClassRef"] = {
                "group": "scheduling.k8s.io",
                "kind": "PriorityClass",
                "name": policy.priority_class_name,
            }
    return {
        "apiVersion": f"kueue.x-k8s.io/{version}",
        "kind": "Workload",
        "metadata": metadata(ctx, COMPONENT),
        "spec": spec,
    }


def place(manifest: Manifest, placement: Placement | None) -> Manifest:
    """`manifest` (a Deployment or a Job) with the placement Kueue granted its pod set merged into the
    pod template: node selector and labels/annotations added (Kueue's win), tolerations appended."""
    if placement is None:
        return manifest
    template = manifest["spec"]["template"]
    pod = template["spec"]
    if placement.node_selector:
        pod["nodeSelector"] = {**(pod.get("nodeSelector") or {}), **placement.node_selector}
    tolerations = pod.get("tolerations") or []
    tolerations += [t for t in placement.tolerations if t not in tolerations]
    if tolerations:
        pod["tolerations"] = tolerations
    if placement.labels:
        template["metadata"]["labels"] = {**template["metadata"].get("labels", {}), **placement.labels}
    if placement.annotations:
        template["metadata"]["annotations"] = {
            **(template["metadata"].get("annotations") or {}),
            **placement.annotations,
        }
    return manifest


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
    """Whether the trainer Job is created with the rollout: volcano (the gang must exist whole) and kueue
    (the whole gang must be ready within waitForPodsReady's timeout)."""
    return ctx.spec.run_policy.gang_scheduler in ("volcano", "kueue")
