"""kopf handlers: thin adapters from kopf's events to `Reconciler.reconcile`.

Two triggers reach the same level-triggered pass: a timer per job (every `resync_seconds`; it also
fires as soon as a job is first seen, which creates its children, and again after an operator
restart) and spec edits (so suspend/resume or a refused edit shows at once, not one interval
later). A per-job lock in kopf's per-object memo keeps the two from running the same job's pass
concurrently. kopf runs these sync handlers in its thread pool; the pass's blocking API calls
stay off the event loop.

Errors: API errors that may pass (429, 5xx, no connection) become kopf.TemporaryError with an
exponential delay; others (403 from RBAC, 422 from an admission webhook) are retried slowly,
because the cause lies outside the operator and a crash would help nobody.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import kopf
from g2rpo.spec import API_GROUP, API_VERSION

from g2rpo_operator.crd import PLURAL
from g2rpo_operator.kube import KubeApi, KubeError
from g2rpo_operator.metrics import OperatorMetrics
from g2rpo_operator.reconcile import Reconciler
from g2rpo_operator.settings import OperatorSettings

ANNOTATION_PREFIX = "g2rpo.dev"
PEERING_NAME = "g2rpo-operator"
MAX_RETRY_DELAY = 60.0
NON_RETRYABLE_DELAY = 120.0


@dataclass
class Operator:
    """What the handlers share: the reconciler, the settings and the metrics."""

    reconciler: Reconciler
    settings: OperatorSettings
    metrics: OperatorMetrics

    def run(self, trigger: str, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int) -> None:
        """One reconcile pass for one job, its status into kopf's patch; errors become kopf retries."""
        key = f"{body.metadata.namespace}/{body.metadata.name}"
        with memo.setdefault("reconcile_lock", threading.Lock()):
            started = time.perf_counter()
            try:
                status = self.reconciler.reconcile(dict(body))
            except KubeError as exc:
                self._failed(trigger, "api_retryable" if exc.retryable else "api")
                delay = min(2.0**retry, MAX_RETRY_DELAY) if exc.retryable else NON_RETRYABLE_DELAY
                raise kopf.TemporaryError(f"{key}: {exc}", delay=delay) from exc
            except Exception:
                self._failed(trigger, "unexpected")  # kopf logs it and retries with its own backoff
                raise
            self.metrics.duration.observe(time.perf_counter() - started)
        self.metrics.reconciles.labels(trigger, "ok").inc()
        if status is not None:
            patch.status.update(status)
        self.metrics.observe_phase(key, (status or body.status).get("phase"))

    def _failed(self, trigger: str, kind: str) -> None:
        self.metrics.reconciles.labels(trigger, "error").inc()
        self.metrics.errors.labels(kind).inc()


def register(registry: kopf.OperatorRegistry, operator: Operator) -> None:
    """Register the handlers into `registry` (a fresh one per operator: tests run several)."""
    resource = (API_GROUP, API_VERSION, PLURAL)

    @kopf.timer(*resource, id="resync", interval=operator.settings.resync_seconds, registry=registry)
    def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, **_: Any) -> None:
        operator.run("timer", body, patch, memo, retry)

    @kopf.on.update(*resource, id="spec", field="spec", registry=registry)
    def spec_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, **_: Any) -> None:
        operator.run("update", body, patch, memo, retry)

    @kopf.on.delete(*resource, id="forget", optional=True, registry=registry)
    def forget(body: kopf.Body, **_: Any) -> None:
        """Children go with the job through their ownerReferences; only the metrics forget it."""
        operator.metrics.observe_phase(f"{body.metadata.namespace}/{body.metadata.name}", None)

    @kopf.on.probe(id="jobs", registry=registry)
    def jobs(**_: Any) -> int:
        return operator.metrics.tracked_jobs()


def register_peering(registry: kopf.OperatorRegistry, operator: Operator, api: KubeApi) -> None:
    """Create kopf's peering object(s) at startup if absent (kopf only patches them, and an apply of the
    CRD and the object in one `kubectl apply -k` fails while the CRD is not yet established)."""

    @kopf.on.startup(id="peering", registry=registry)
    def ensure_peering(**_: Any) -> None:
        name = PEERING_NAME
        if not operator.settings.namespaces:
            objs = [{"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}]
        else:
            objs = [
                {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": name, "namespace": namespace}}
                for namespace in operator.settings.namespaces
            ]
        for obj in objs:
            try:
                api.create(obj)
            except KubeError as exc:
                if exc.status != 409:
                    raise kopf.TemporaryError(f"cannot create the peering object: {exc}", delay=5) from exc


def register_client_login(registry: kopf.OperatorRegistry) -> None:
    """kopf authenticates like the kubernetes client: the pod's service account, else the kubeconfig."""
    kopf.on.login(id="kubernetes-client", registry=registry)(kopf.login_via_client)


def build(api: KubeApi, settings: OperatorSettings, registry: kopf.OperatorRegistry) -> Operator:
    """The operator, its handlers registered into `registry` (what __main__ runs; tests too)."""
    operator = Operator(Reconciler(api, settings), settings, OperatorMetrics())
    register(registry, operator)
    if not settings.standalone:
        register_peering(registry, operator, api)
    return operator


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    """kopf's own settings: bookkeeping in g2rpo.dev annotations (the status schema is strict), no
    CRD scanning (so no cluster-wide CRD read permission), peering so that replicas never both act."""
    ks = kopf.OperatorSettings()
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    ks.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX)
    ks.persistence.finalizer = f"{ANNOTATION_PREFIX}/operator"
    ks.scanning.disabled = True
    ks.peering.name = PEERING_NAME
    ks.peering.standalone = settings.standalone
    ks.peering.mandatory = not settings.standalone
    ks.peering.clusterwide = not settings.namespaces
    ks.peering.priority = settings.peering_priority if settings.peering_priority is not None else time.time_ns() // 1000
    return ks
