"""The DeepSpeed trainer: an Indexed Job (N pods x M GPUs) with a headless Service.

Why an Indexed Job and not a JobSet: the Indexed Job is core batch/v1 (GA since Kubernetes 1.24),
so the operator works on any cluster without another controller and CRD to install and keep in
version step; it gives exactly what a static DeepSpeed rendezvous needs — a stable rank per pod
(the completion index) and a stable DNS name per rank (`<job>-trainer-<i>.<job>-trainer`, through
`subdomain` + the headless Service) — and both Kueue and Volcano schedule it as a gang. What a
JobSet adds (several replicated jobs, its own failure/restart policy) the operator does itself,
because a restart must resume *all* ranks from the newest checkpoint: the Job has backoffLimit 0
and restartPolicy Never, so the first failed rank fails the Job (Kubernetes stops the other ranks),
and the operator deletes the Job and creates it again, counting the restart against the job's
retry budget (spec.runPolicy.backoffLimit). Restarting single ranks in place, as a Job's own
backoff would, leaves the survivors hanging in NCCL collectives.

Rendezvous: rank 0's pod is the master (MASTER_ADDR below); NODE_RANK comes from the pod's
completion-index annotation through the downward API; WORLD_SIZE counts processes (GPUs).
"""

from __future__ import annotations

from g2rpo_operator.builders.common import (
    ACCELERATE_FILE,
    CACHE_MOUNT,
    CHECKPOINT_MOUNT,
    JOB_FILE,
    RENDEZVOUS_PORT,
    ROLLOUT_GROUP_PORT,
    TOKEN_DIR,
    TOKEN_KEY,
    JobContext,
    Manifest,
    cache_env,
    config_mounts,
    config_volume,
    container_security_context,
    labels,
    metadata,
    node_selector,
    pod_security_context,
    resources,
    secret_env,
    selector_labels,
    shm_volume,
    token_volume,
    tolerations,
)

COMPONENT = "trainer"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def master_address(ctx: JobContext) -> str:
    return f"{ctx.child(COMPONENT)}-0.{ctx.service_host(COMPONENT)}"


def launch_command() -> list[str]:
    """accelerate launch with the per-pod values taken from the env (Kubernetes expands $(VAR))."""
    return [
        "accelerate",
        "launch",
        "--config_file",
        ACCELERATE_FILE,
        "--num_machines",
        "$(NNODES)",
        "--num_processes",
        "$(WORLD_SIZE)",
        "--machine_rank",
        "$(NODE_RANK)",
        "--main_process_ip",
        "$(MASTER_ADDR)",
        "--main_process_port",
        "$(MASTER_PORT)",
        "-m",
        "g2rpo.train",
        "--job",
        JOB_FILE,
    ]


def trainer_env(ctx: JobContext) -> list[Manifest]:
    trainer = ctx.spec.trainer
    return [
        {
            "name": "NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        {"name": "NNODES", "value": str(trainer.replicas)},
        {"name": "NPROC_PER_NODE", "value": str(trainer.gpus_per_replica)},
        {"name": "WORLD_SIZE", "value": str(trainer.replicas * trainer.gpus_per_replica)},
        {"name": "MASTER_ADDR", "value": master_address(ctx)},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "G2RPO_JOB_NAME", "value": ctx.name},
        {"name": "G2RPO_CONTROLLER_URL", "value": ctx.controller_url},
        {"name": "G2RPO_CONTROLLER_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_KEY}"},
        {"name": "G2RPO_ROLLOUT_URL", "value": ctx.rollout_url},
        {"name": "G2RPO_ROLLOUT_GROUP_PORT", "value": str(ROLLOUT_GROUP_PORT)},
        *cache_env(),
    ]


def _pod_spec(ctx: JobContext) -> Manifest:
    spec = ctx.spec
    placement = spec.trainer
    settings = ctx.settings
    pod: Manifest = {
        "subdomain": ctx.child(COMPONENT),
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "nodeSelector": node_selector(placement, settings.gpu_node_selector),
        "tolerations": tolerations(placement, settings.gpu_tolerations),
        "containers": [
            {
                "name": COMPONENT,
                "image": placement.image or settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": launch_command(),
                "env": trainer_env(ctx),
                **secret_env(ctx),
                "ports": [
                    {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
                    {"name": "weight-sync", "containerPort": ROLLOUT_GROUP_PORT, "protocol": "TCP"},
                ],
                "resources": resources(
                    placement, settings.trainer_cpu, settings.trainer_memory, placement.gpus_per_replica
                ),
                # DeepSpeed builds its ops at run time into HOME (a volume here); see rollout.py on the root fs.
                "securityContext": container_security_context(read_only_root=False),
                "volumeMounts": [
                    *config_mounts(),
                    {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "cache", "mountPath": CACHE_MOUNT},
                ],
            }
        ],
        "volumes": [
            config_volume(ctx),
            token_volume(ctx),
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.checkpoint.volume_claim}},
            shm_volume(placement.shared_memory),
            {"name": "cache", "emptyDir": {}},
        ],
    }
    if spec.run_policy.priority_class_name:
        pod["priorityClassName"] = spec.run_policy.priority_class_name
    if spec.run_policy.gang_scheduler == "volcano":
        pod["schedulerName"] = "volcano"
    return pod


def job(ctx: JobContext) -> Manifest:
    policy = ctx.spec.run_policy
    replicas = ctx.spec.trainer.replicas
    meta = metadata(ctx, COMPONENT)
    pod_meta: Manifest = {"labels": labels(ctx, COMPONENT)}
    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": replicas,
        "parallelism": replicas,
        "backoffLimit": 0,
        "template": {"metadata": pod_meta, "spec": _pod_spec(ctx)},
    }
    if policy.gang_scheduler == "kueue":
        meta["labels"][KUEUE_QUEUE_LABEL] = policy.queue
        job_spec["suspend"] = True  # Kueue unsuspends the Job when it admits the whole gang.
    if policy.gang_scheduler == "volcano":
        pod_meta["annotations"] = {VOLCANO_GROUP_ANNOTATION: ctx.child(COMPONENT)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def headless_service(ctx: JobContext) -> Manifest:
    """Gives rank i the DNS name <job>-trainer-i.<job>-trainer; published before the pods are ready,
    because the ranks must find each other to become ready at all."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, COMPONENT),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(ctx, COMPONENT),
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"},
                {
                    "name": "weight-sync",
                    "port": ROLLOUT_GROUP_PORT,
                    "targetPort": ROLLOUT_GROUP_PORT,
                    "protocol": "TCP",
                },
            ],
        },
    }


def volcano_pod_group(ctx: JobContext) -> Manifest:
    """Volcano's gang: no trainer pod is bound until all `replicas` of them fit."""
    policy = ctx.spec.run_policy
    group_spec: Manifest = {"minMember": ctx.spec.trainer.replicas, "queue": policy.queue or "default"}
    if policy.priority_class_name:
        group_spec["priorityClassName"] = policy.priority_class_name
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": metadata(ctx, COMPONENT),
        "spec": group_spec,
    }
