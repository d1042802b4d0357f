"""The guidance controller: one Deployment (1 replica) + Service per job.

The controller is the single source of truth for the guidance length, so it must keep its state
across its own restarts: its state folder lives on the job's checkpoint claim (a sub-path per
job), next to the checkpoints it must rewind to. It needs no GPU, so it gets no GPU node
selector; its image is the slim operator/controller image, whose root filesystem can be read-only.
The Service's port is named `metrics` so that a ServiceMonitor (or annotation-based scraping)
finds /metrics; the same port serves the API (GET /v1/guidance). One scrape path: only the Service
carries prometheus.io annotations (annotation-based Prometheus configs scrape it through its
endpoints); a PodMonitor/ServiceMonitor selects the controller pods by their stable labels
app.kubernetes.io/name=g2rpo, app.kubernetes.io/component=controller (instance = the job's name).
"""

from __future__ import annotations

from g2rpo.api.names import (
    CONTROLLER_JOB_FLAG,
    CONTROLLER_PORT,
    CONTROLLER_PORT_FLAG,
    CONTROLLER_SCHEDULE_FROM_FLAG,
    CONTROLLER_STATE_DIR_FLAG,
    CONTROLLER_TOKEN_FILE_FLAG,
    HEALTH_PATH,
    JOB_FILE,
    METRICS_PATH,
    READY_PATH,
    TOKEN_FILE,
)
from g2rpo_operator.builders.common import (
    JobContext,
    Manifest,
    config_mounts,
    config_volume,
    container_security_context,
    metadata,
    node_selector,
    placement_env,
    pod_identity,
    pod_security_context,
    recreate_deployment,
    resources,
    scratch_volume,
    selector_labels,
    token_volume,
    tolerations,
)

COMPONENT = "controller"
STATE_DIR = "/var/lib/g2rpo"
METRICS_PORT_NAME = "metrics"


def _scrape_annotations() -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(CONTROLLER_PORT),
        "prometheus.io/path": METRICS_PATH,
    }


def controller_command(ctx: JobContext) -> list[str]:
    return [
        "g2rpo",
        "controller",
        CONTROLLER_JOB_FLAG,
        ctx.name,
        CONTROLLER_STATE_DIR_FLAG,
        STATE_DIR,
        CONTROLLER_TOKEN_FILE_FLAG,
        TOKEN_FILE,
        CONTROLLER_PORT_FLAG,
        str(CONTROLLER_PORT),
        CONTROLLER_SCHEDULE_FROM_FLAG,
        JOB_FILE,
    ]


def deployment(ctx: JobContext, replicas: int = 1) -> Manifest:
    """`replicas` is 0 while the job is suspended; never more than 1 (one state owner)."""
    placement = ctx.spec.controller
    settings = ctx.settings
    # 5 s, not the kubelet's 1 s: a busy node's answer is late, not missing.
    probe = {"httpGet": {"path": HEALTH_PATH, "port": METRICS_PORT_NAME}, "periodSeconds": 10, "timeoutSeconds": 5}
    container: Manifest = {
        "name": COMPONENT,
        "image": placement.image or settings.controller_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": controller_command(ctx),
        "env": placement_env(placement),
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": CONTROLLER_PORT, "protocol": "TCP"}],
        "readinessProbe": {**probe, "httpGet": {"path": READY_PATH, "port": METRICS_PORT_NAME}},
        "livenessProbe": {**probe, "failureThreshold": 6},
        "resources": resources(
            placement, settings.controller_cpu, settings.controller_memory, settings.controller_scratch_size
        ),
        "securityContext": container_security_context(read_only_root=True),
        "volumeMounts": [
            *config_mounts(),
            {"name": "state", "mountPath": STATE_DIR, "subPath": f"{ctx.name}/controller-state"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: Manifest = {
        **pod_identity(ctx, with_service_account=False),
        "securityContext": pod_security_context(),
        "nodeSelector": node_selector(placement, settings.controller_node_selector),
        "tolerations": tolerations(placement, settings.controller_tolerations),
        "containers": [container],
        "volumes": [
            config_volume(ctx),
            token_volume(ctx),
            {"name": "state", "persistentVolumeClaim": {"claimName": ctx.spec.checkpoint.volume_claim}},
            scratch_volume("tmp", settings.controller_scratch_size),
        ],
    }
    # Recreate: two controllers must never write the same state folder at once.
    return recreate_deployment(ctx, COMPONENT, replicas, pod_spec)


def service(ctx: JobContext) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, COMPONENT, annotations=_scrape_annotations()),
        "spec": {
            "selector": selector_labels(ctx, COMPONENT),
            "ports": [
                {"name": METRICS_PORT_NAME, "port": CONTROLLER_PORT, "targetPort": METRICS_PORT_NAME, "protocol": "TCP"}
            ],
        },
    }
