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

Failures that are not the trainer's: the Job's podFailurePolicy ignores pods that fail with the
DisruptionTarget condition (preemption, node drain, API-initiated eviction), so they never fail the
Job; the operator sees the disrupted pod and restarts the whole gang without spending the retry
budget (lifecycle.py). A pod that exits with one of FAILURE_REASONS' codes (the `check-spec` init
container: the job cannot run as configured, the node's NVIDIA driver is too old for the image's CUDA,
or the checkpoint folder on the claim is not writable by uid 1000) fails the Job at once (FailJob),
and the operator fails the job without retrying: another attempt would fail the same way. That is
why check-spec mounts the checkpoint claim: it creates the job's folder there before any GPU work.
"""

from __future__ import annotations

from g2rpo.api.names import (
    ACCELERATE_FILE,
    CHECKPOINT_CREDENTIALS_DIR,
    CHECKPOINT_MOUNT,
    CONFIG_DIR,
    CONTROLLER_TOKEN_FILE_ENV,
    CONTROLLER_URL_ENV,
    JOB_FILE,
    JOB_NAME_ENV,
    RENDEZVOUS_PORT,
    ROLLOUT_GROUP_PORT,
    ROLLOUT_GROUP_PORT_ENV,
    ROLLOUT_URL_ENV,
    TOKEN_FILE,
    TRAINER_CHECK_FLAG,
    TRAINER_JOB_FLAG,
    TRAINER_MODULE,
)
from g2rpo.api.spec import FAILURE_REASONS
from g2rpo_operator.builders.common import (
    CACHE_MOUNT,
    NO_GPU,
    RUN_AS_USER,
    JobContext,
    Manifest,
    cache_env,
    cache_size,
    config_mounts,
    config_volume,
    container_security_context,
    gpu_placement,
    labels,
    metadata,
    placement_env,
    pod_identity,
    pod_security_context,
    requests_cache_storage,
    resources,
    scratch_volume,
    secret_env,
    selector_labels,
    shm_volume,
    token_volume,
)
from g2rpo_operator.builders.gang import volcano_pod_fields

COMPONENT = "trainer"
CHECK_CONTAINER = "check-spec"
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
        TRAINER_MODULE,
        TRAINER_JOB_FLAG,
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
        {"name": JOB_NAME_ENV, "value": ctx.name},
        {"name": CONTROLLER_URL_ENV, "value": ctx.controller_url},
        {"name": CONTROLLER_TOKEN_FILE_ENV, "value": TOKEN_FILE},
        {"name": ROLLOUT_URL_ENV, "value": ctx.rollout_url},
        {"name": ROLLOUT_GROUP_PORT_ENV, "value": str(ROLLOUT_GROUP_PORT)},
        *tracking_secret_env(ctx),
        *cache_env(),
        *placement_env(trainer),
    ]


def tracking_secret_env(ctx: JobContext) -> list[Manifest]:
    """The tracking clients' credentials (spec.tracking), read from Secrets by the kubelet: the ConfigMap holds
    only the job spec, which names the Secrets. The rest of the tracking settings the trainer sets itself
    from the spec (g2rpo.train.tracking), the same way locally and here."""
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        for env, ref in ctx.spec.tracking.secret_references().items()
    ]


def check_command() -> list[str]:
    """Exits with a FAILURE_REASONS code when the mounted job cannot run with this world size, on this node's
    driver or with this checkpoint folder (before any GPU work)."""
    return ["python", "-m", TRAINER_MODULE, TRAINER_JOB_FLAG, JOB_FILE, TRAINER_CHECK_FLAG]


def trainer_security_context(ctx: JobContext) -> Manifest:
    """The trainer container's: spec.trainer.capabilities added to an otherwise empty set. A process that is
    not root keeps added capabilities only in its bounding set: Kubernetes sets no ambient capabilities
    (kubernetes/kubernetes#56374; KEP kubernetes/enhancements#2763 open, containerd#5668 and cri-o#5043
    closed). So with any capability the container runs as root, its group still RUN_AS_USER (checkpoint
    files stay the group's)."""
    added = ctx.spec.trainer.capabilities
    out = container_security_context(read_only_root=False)
    if added:
        out["capabilities"] = {"drop": ["ALL"], "add": list(added)}
        out |= {"runAsUser": 0, "runAsNonRoot": False, "runAsGroup": RUN_AS_USER}
    return out


def _pod_spec(ctx: JobContext) -> Manifest:
    spec = ctx.spec
    placement = spec.trainer
    settings = ctx.settings
    cache = cache_size(placement, ctx)
    requested = requests_cache_storage(placement, ctx)
    check_requests = {"cpu": "100m", "memory": "512Mi"} | ({"ephemeral-storage": "64Mi"} if requested else {})
    pod: Manifest = {
        "subdomain": ctx.child(COMPONENT),
        "restartPolicy": "Never",
        **pod_identity(ctx, with_service_account=True),
        # SIGTERM asks the trainer to finish its step and save (g2rpo.train.lifecycle); the kubelet, Kueue's
        # preemption and `kubectl drain` wait this long before SIGKILL (30 s by default: too short for a save).
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        "securityContext": pod_security_context(),
        **gpu_placement(placement, ctx),
        "initContainers": [
            {
                "name": CHECK_CONTAINER,
                "image": placement.image or settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": check_command(),
                "env": [{"name": "WORLD_SIZE", "value": str(placement.replicas * placement.gpus_per_replica)}, NO_GPU],
                "resources": {"requests": check_requests, "limits": {"memory": "512Mi"}},
                "securityContext": container_security_context(read_only_root=True),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
                ],
            }
        ],
        "containers": [
            {
                "name": COMPONENT,
                "image": placement.image or settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": launch_command(),
                "env": trainer_env(ctx),
                **_env_from(ctx),
                "ports": [
                    {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
                    {"name": "weight-sync", "containerPort": ROLLOUT_GROUP_PORT, "protocol": "TCP"},
                ],
                "resources": resources(
                    placement,
                    settings.trainer_cpu,
                    settings.trainer_memory,
                    cache if requested else None,
                    placement.gpus_per_replica,
                ),
                # DeepSpeed builds its ops at run time into HOME (a volume here); see rollout.py on the root fs.
                "securityContext": trainer_security_context(ctx),
                "volumeMounts": [
                    *config_mounts(),
                    {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "cache", "mountPath": CACHE_MOUNT},
                    *_credentials_mounts(ctx),
                ],
            }
        ],
        "volumes": [
            config_volume(ctx),
            token_volume(ctx),
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.checkpoint.volume_claim}},
            shm_volume(placement.shared_memory),
            scratch_volume("cache", cache),
            *_credentials_volumes(ctx),
        ],
    }
    if spec.run_policy.priority_class_name:
        pod["priorityClassName"] = spec.run_policy.priority_class_name
    if spec.run_policy.gang_scheduler == "volcano":
        pod["schedulerName"] = "volcano"
    return pod


def _env_from(ctx: JobContext) -> Manifest:
    """spec.envFromSecret, then checkpoint.credentialsSecret (the object store's keys, trainer pods only)."""
    sources = secret_env(ctx).get("envFrom", [])
    if ctx.spec.checkpoint.credentials_secret:
        sources = [*sources, {"secretRef": {"name": ctx.spec.checkpoint.credentials_secret}}]
    return {"envFrom": sources} if sources else {}


def _credentials_mounts(ctx: JobContext) -> list[Manifest]:
    if not ctx.spec.checkpoint.credentials_secret:
        return []
    return [{"name": "checkpoint-credentials", "mountPath": CHECKPOINT_CREDENTIALS_DIR, "readOnly": True}]


def _credentials_volumes(ctx: JobContext) -> list[Manifest]:
    name = ctx.spec.checkpoint.credentials_secret
    if not name:
        return []
    return [{"name": "checkpoint-credentials", "secret": {"secretName": name, "defaultMode": 0o440}}]


def pod_failure_policy() -> Manifest:
    """Disruptions never count (the operator restarts the gang for free); a problem no retry fixes (a
    FAILURE_REASONS exit code: bad configuration, a too-old driver, an unwritable checkpoint folder) fails at once.

    Needs restartPolicy Never (set in the pod template). The Job's own activeDeadlineSeconds is left unset:
    it would count from the Job's creation, queueing included; the operator enforces
    runPolicy.activeDeadlineSeconds from the first time every rank was ready (status.startTime).
    """
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": sorted(FAILURE_REASONS)}},
        ]
    }


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
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": pod_meta, "spec": _pod_spec(ctx)},
    }
    if policy.gang_scheduler == "volcano":
        pod_meta["annotations"] = volcano_pod_fields(ctx)
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
