"""The vLLM rollout server: a Deployment (1 pod) + Service running `trl vllm-serve`.

`trl vllm-serve` starts vLLM's OpenAI-compatible server with TRL's NCCL weight-transfer engine, so
that the trainer can push each step's weights into it (the trainer connects to port 8000 and opens
the NCCL group on port 51216 of trainer rank 0). One pod only: TRL's client syncs weights to a
single server, so generation scales inside the pod (tensor/data parallel over its GPUs).

The pod template carries the gang epoch (restarts + disruptions so far): the operator raises it when
the trainer restarts, so the Deployment replaces the vLLM pod and the new trainer meets a server
without the dead rank 0's NCCL weight-sync group. The startup probe allows
rollout.startupTimeoutSeconds, as long as the trainer waits for the server (vllm_server_timeout).

vLLM and its kernels (Triton, FlashInfer) write JIT caches under HOME and /tmp, which go to volumes
here; the root filesystem stays writable because the GPU image's libraries were not verified to
run read-only (no GPU on the machines that build this).

The rollout is the gang's first GPU pod (the trainer waits for it), so a node whose NVIDIA driver is
too old for the image's CUDA must show here: on such a driver vLLM crash-loops with CUDA's own
error. When the rollout runs the g2rpo image, whose CUDA the check knows, the `check-driver` init
container (g2rpo.train.preflight) exits EXIT_DRIVER_TOO_OLD with one line naming the found and the
needed driver, written to its termination message; the operator fails the job with reason
DriverTooOld (lifecycle.py). A custom rollout image brings its own CUDA: no check.
"""

from __future__ import annotations

from g2rpo.api.names import DRIVER_CHECK_MODULE, ROLLOUT_PORT
from g2rpo.api.spec import max_model_len
from g2rpo_operator.builders.common import (
    CACHE_MOUNT,
    GANG_EPOCH_ANNOTATION,
    JobContext,
    Manifest,
    cache_env,
    cache_size,
    container_security_context,
    gpu_placement,
    metadata,
    placement_env,
    pod_identity,
    pod_security_context,
    recreate_deployment,
    requests_cache_storage,
    resources,
    scratch_volume,
    secret_env,
    selector_labels,
    shm_volume,
)
from g2rpo_operator.builders.gang import volcano_pod_fields

COMPONENT = "rollout"
PORT_NAME = "http"
DRIVER_CHECK_CONTAINER = "check-driver"


def vllm_serve_command(ctx: JobContext) -> list[str]:
    spec = ctx.spec
    rollout = spec.rollout
    return [
        "trl",
        "vllm-serve",
        "--model",
        spec.model.name,
        "--revision",
        spec.model.revision,
        "--dtype",
        spec.model.dtype,
        "--tensor_parallel_size",
        str(rollout.tensor_parallel_size),
        "--data_parallel_size",
        str(rollout.data_parallel_size),
        "--gpu_memory_utilization",
        str(rollout.gpu_memory_utilization),
        "--max_model_len",
        str(max_model_len(spec)),
        "--host",
        "0.0.0.0",
        "--port",
        str(ROLLOUT_PORT),
    ]


PROBE_PERIOD_SECONDS = 10
PROBE_TIMEOUT_SECONDS = 10
"""vLLM's /health (vllm/entrypoints/serve/instrumentator/health.py: 200, or 503 once the engine is dead) is
answered by the same event loop as generation and weight updates: under load it can take seconds, and the
kubelet's 1 s default would count that as a failure."""
LIVENESS_PERIOD_SECONDS = 30
LIVENESS_FAILURE_THRESHOLD = 6
"""Restarting vLLM restarts the whole gang (the trainer loses its NCCL weight-sync group), so liveness only
acts on a server that has not answered for 3 minutes; a dead engine answers 503 at once and is restarted
after the same 3 minutes. A slower hang is the trainer's stall (runPolicy.stallTimeoutSeconds)."""


def startup_failure_threshold(ctx: JobContext) -> int:
    """Startup probes allowed to fail: rollout.startupTimeoutSeconds, the same time the trainer waits for the
    server (TRL's vllm_server_timeout, set from the same field in g2rpo.train.config)."""
    return -(-ctx.spec.rollout.startup_timeout_seconds // PROBE_PERIOD_SECONDS)


def driver_check_container(image: str, pull_policy: str, request_storage: bool = False) -> Manifest:
    """Reads the kernel module's /proc/driver/nvidia/version, which every container of the node sees: it needs
    no GPU, and NVIDIA_VISIBLE_DEVICES=void keeps the image's `all` from handing it every GPU of the node.
    Like the pod's other containers, it requests ephemeral-storage only where the job asks for it
    (requestCacheStorage): a Kueue queue need not cover that resource otherwise."""
    return {
        "name": DRIVER_CHECK_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["python", "-m", DRIVER_CHECK_MODULE],
        "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}],
        "resources": {
            "requests": {"cpu": "50m", "memory": "128Mi"} | ({"ephemeral-storage": "16Mi"} if request_storage else {}),
            "limits": {"memory": "128Mi"},
        },
        "securityContext": container_security_context(read_only_root=True),
    }


def deployment(ctx: JobContext, replicas: int = 1, gang_epoch: int = 0) -> Manifest:
    """`replicas` is 0 while the job is suspended or finished: the GPUs go back to the cluster.
    `gang_epoch` (gang restarts so far) is a pod-template annotation: raising it replaces the pod."""
    spec = ctx.spec
    placement = spec.rollout
    settings = ctx.settings
    image = placement.image or settings.rollout_image
    health = {
        "httpGet": {"path": "/health", "port": PORT_NAME},
        "periodSeconds": PROBE_PERIOD_SECONDS,
        "timeoutSeconds": PROBE_TIMEOUT_SECONDS,
    }
    cache = cache_size(placement, ctx)
    pod_spec: Manifest = {
        **pod_identity(ctx, with_service_account=True),
        "securityContext": pod_security_context(),
        **gpu_placement(placement, ctx),
        "containers": [
            {
                "name": "vllm",
                "image": image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": vllm_serve_command(ctx),
                "env": [*cache_env(), *placement_env(placement)],
                **secret_env(ctx),
                "ports": [{"name": PORT_NAME, "containerPort": ROLLOUT_PORT, "protocol": "TCP"}],
                # Downloading, loading and compiling a model takes minutes (rollout.startupTimeoutSeconds).
                "startupProbe": {**health, "failureThreshold": startup_failure_threshold(ctx)},
                # Readiness gates the trainer's start and holds the Service's only endpoint: a minute of late
                # answers under load, not three seconds, takes it away.
                "readinessProbe": {**health, "failureThreshold": 6},
                "livenessProbe": {
                    **health,
                    "periodSeconds": LIVENESS_PERIOD_SECONDS,
                    "timeoutSeconds": LIVENESS_PERIOD_SECONDS // 2,
                    "failureThreshold": LIVENESS_FAILURE_THRESHOLD,
                },
                "resources": resources(
                    placement,
                    settings.rollout_cpu,
                    settings.rollout_memory,
                    cache if requests_cache_storage(placement, ctx) else None,
                    placement.gpus,
                ),
                "securityContext": container_security_context(read_only_root=False),
                "volumeMounts": [
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "cache", "mountPath": CACHE_MOUNT},
                ],
            }
        ],
        "volumes": [shm_volume(placement.shared_memory), scratch_volume("cache", cache)],
    }
    if image == (spec.trainer.image or settings.trainer_image):
        pod_spec["initContainers"] = [
            driver_check_container(image, settings.image_pull_policy, requests_cache_storage(placement, ctx))
        ]
    if spec.run_policy.priority_class_name:
        pod_spec["priorityClassName"] = spec.run_policy.priority_class_name
    annotations = {GANG_EPOCH_ANNOTATION: str(gang_epoch)}
    if spec.run_policy.gang_scheduler == "volcano":
        pod_spec["schedulerName"] = "volcano"
        annotations |= volcano_pod_fields(ctx)
    # Recreate: a rolling update would need a second set of GPUs for the overlap.
    return recreate_deployment(ctx, COMPONENT, replicas, pod_spec, annotations=annotations)


def service(ctx: JobContext) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, COMPONENT),
        "spec": {
            "selector": selector_labels(ctx, COMPONENT),
            "ports": [{"name": PORT_NAME, "port": ROLLOUT_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
