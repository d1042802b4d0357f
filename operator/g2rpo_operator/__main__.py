"""`python -m g2rpo_operator`: run the operator (what the operator Deployment's container runs).

Configuration comes from G2RPO_* environment variables (see settings.py); credentials from the
pod's service account, or the kubeconfig outside a cluster. /metrics is served on
G2RPO_METRICS_PORT, kopf's health probe on G2RPO_HEALTH_PORT at /healthz.
"""

from __future__ import annotations

import dataclasses
import logging

import kopf

from g2rpo_operator.handlers import build, kopf_settings, register_client_login
from g2rpo_operator.kube import KubeApi
from g2rpo_operator.kueue import served_version
from g2rpo_operator.settings import OperatorSettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = OperatorSettings.from_env()
    registry = kopf.OperatorRegistry()
    register_client_login(registry)
    api = KubeApi.from_environment()
    if settings.kueue_enabled:
        settings = dataclasses.replace(settings, kueue_api_version=served_version(api))
        logging.getLogger(__name__).info("Kueue integration: speaking kueue.x-k8s.io/%s", settings.kueue_api_version)
    operator = build(api, settings, registry)
    operator.metrics.serve(settings.metrics_port)
    kopf.run(
        registry=registry,
        settings=kopf_settings(settings),
        standalone=settings.standalone,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
    )


if __name__ == "__main__":
    main()
