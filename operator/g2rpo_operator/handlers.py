"""kopf handlers: thin adapters from kopf's events to `Reconciler.reconcile`.

Watches, not polling. Each job has a kopf daemon that runs its level-triggered pass whenever it is
woken, and otherwise sleeps:
- kopf watches the job's children (Deployments, Jobs, Pods, Services and NetworkPolicies labelled
  app.kubernetes.io/managed-by=g2rpo-operator, filtered by the API server: a manual edit of one wakes
  its job, whose pass undoes it, see drift.py) and the claims; every event
  lands in the cache (cache.py) and wakes the owning job (its app.kubernetes.io/instance label; a
  claim wakes the jobs of its namespace); an event of the job itself (a spec edit) wakes it too;
- every settings.poll_seconds, while the job runs or misses an unwatched reference, a pass runs
  from the cache (no API request): the controller's progress, the deadline, the missing Secret;
- every settings.resync_seconds the pass reads everything from the API (repairs a lost event).
The daemon writes the status itself (a merge patch of the status subresource) when it changed.
A steady job therefore costs no API request between two resyncs (bench/operator_reconcile.py).
The pass's blocking API calls run in a thread, off kopf's event loop.

Errors: API errors that may pass (429, 5xx, no connection) are retried with an exponential delay;
others (403 from RBAC, 422 from an admission webhook) slowly, because the cause lies outside the
operator and a crash would help nobody. Either way the daemon keeps running. A refused write of a
child (reconcile.refusal) is no error of the pass: the status says it (ChildrenSynced=False,
APIRefused, naming the object and the API server's message), and the pass is retried with a delay
that doubles from REFUSED_FIRST_DELAY up to REFUSED_MAX_DELAY (a quota or a webhook may change
without any event the operator watches), until a pass gets every write through.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from g2rpo.api.crd import PLURAL
from g2rpo.api.spec import API_GROUP, API_VERSION
from g2rpo.api.status import CHILDREN_SYNCED, READY, REFERENCES_RESOLVED
from g2rpo_operator.builders.common import INSTANCE_LABEL, MANAGED_BY
from g2rpo_operator.cache import ObjectCache
from g2rpo_operator.conditions import KUBELET_WAITS
from g2rpo_operator.kube import (
    DEPLOYMENTS,
    JOBS,
    NETWORK_POLICIES,
    PODS,
    PVCS,
    SERVICES,
    KubeApi,
    KubeError,
    Manifest,
    Resource,
    older_than,
    workloads,
)
from g2rpo_operator.metrics import OperatorMetrics
from g2rpo_operator.reconcile import Reconciler
from g2rpo_operator.settings import OperatorSettings

ANNOTATION_PREFIX = "g2rpo.dev"
PEERING_NAME = "g2rpo-operator"
MAX_RETRY_DELAY = 60.0
NON_RETRYABLE_DELAY = 120.0
REFUSED_FIRST_DELAY = 2.0
REFUSED_MAX_DELAY = 300.0
WATCH_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}
G2RPOJOBS = Resource(API_GROUP, API_VERSION, PLURAL, "G2RPOJob")


@dataclass
class Operator:
    """What the handlers share: the reconciler, the settings, the metrics, and each job's wake-up."""

    reconciler: Reconciler
    settings: OperatorSettings
    metrics: OperatorMetrics
    wakeups: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    latest: dict[tuple[str, str], dict] = field(default_factory=dict)
    """The newest body of each job seen in a watch event (a pass must never act on an older spec)."""

    def remember(self, key: tuple[str, str], body: dict) -> None:
        """Keep `body` as the job's newest unless a newer version is known (a status patch's answer and
        the watch events of the job arrive in either order)."""
        known = self.latest.get(key)
        if known is None or not older_than(body, known):
            self.latest[key] = body

    def wake(self, namespace: str, name: str | None = None) -> None:
        """Wake one job's daemon, or every job of `namespace` (name None). Runs on kopf's event loop."""
        for (ns, job), event in self.wakeups.items():
            if ns == namespace and name in (None, job):
                event.set()

    def run(self, trigger: str, body: dict, fresh: bool) -> Manifest | None:
        """One reconcile pass for one job (blocking: runs in a thread); KubeErrors propagate."""
        key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
        started = time.perf_counter()
        try:
            status = self.reconciler.reconcile(body, fresh=fresh)
        except KubeError as exc:
            self._failed(trigger, "api_retryable" if exc.retryable else "api")
            raise
        except Exception:
            self._failed(trigger, "unexpected")
            raise
        self.metrics.duration.observe(time.perf_counter() - started)
        self.metrics.reconciles.labels(trigger, "ok").inc()
        self.metrics.observe_phase(key, (status or body.get("status") or {}).get("phase"))
        return status

    def _failed(self, trigger: str, kind: str) -> None:
        self.metrics.reconciles.labels(trigger, "error").inc()
        self.metrics.errors.labels(kind).inc()


def children_refused(status: dict) -> bool:
    """Whether the API server refused a write of the job's children in the last pass."""
    return any(c.get("type") == CHILDREN_SYNCED and c.get("status") == "False" for c in status.get("conditions") or [])


def needs_poll(status: dict) -> bool:
    """Whether the job must be looked at without an event: while it runs (the controller's progress, the
    deadline), misses a reference no watch reports (the envFromSecret Secret), or waits for its pods to
    start (a pod stuck in ContainerCreating changes nothing watched: its mount errors are Events, read by
    the pass). Otherwise a job waits for watch events (its children, its claim, its spec) and the resync alone."""
    if status.get("phase") == "Running":
        return True
    conditions = status.get("conditions") or []
    if any(c.get("type") == REFERENCES_RESOLVED and c.get("status") == "False" for c in conditions):
        return True
    return status.get("phase") == "Pending" and any(
        c.get("type") == READY and c.get("reason") in KUBELET_WAITS for c in conditions
    )


def _namespace(body: kopf.Body) -> str:
    """The namespace of a watched object: every kind watched here (G2RPOJob, its children, the claims)
    is namespaced, so the API server always sets it; kopf types it optional for cluster-wide kinds."""
    namespace = body.metadata.namespace
    if namespace is None:
        raise kopf.PermanentError(f"{body.get('kind')} {body.metadata.name!r} has no namespace (a namespaced kind)")
    return namespace


def _key(body: kopf.Body) -> tuple[str, str]:
    """A job's key in `Operator.wakeups` and `Operator.latest`: (namespace, name)."""
    return _namespace(body), body.metadata.name


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Until woken, stopped, or `seconds` passed."""
    waits = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())}
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


def register(registry: kopf.OperatorRegistry, operator: Operator, api: KubeApi) -> None:
    """Register the handlers into `registry` (a fresh one per operator: tests run several)."""
    resource = (API_GROUP, API_VERSION, PLURAL)
    settings = operator.settings
    cache = operator.reconciler.cache

    @kopf.daemon(*resource, id="reconcile", cancellation_backoff=1.0, cancellation_timeout=10.0, registry=registry)
    async def reconcile_job(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any) -> None:
        """The job's passes: at once, then on every wake-up, poll and resync (see the module docstring)."""
        key = _key(body)
        wake = operator.wakeups.setdefault(key, asyncio.Event())
        loop = asyncio.get_running_loop()
        next_resync, retry, trigger = 0.0, 0, "start"
        try:
            while not stopped:
                fresh = loop.time() >= next_resync
                wake.clear()
                current = operator.latest.get(key) or dict(body)
                try:
                    status = await asyncio.to_thread(operator.run, "resync" if fresh else trigger, current, fresh)
                    if status is not None:
                        patched = await asyncio.to_thread(
                            api.patch, G2RPOJOBS, key[0], key[1], {"status": status}, "status"
                        )
                        # The next pass must see this status even before its watch event arrives (this
                        # daemon is the status's only writer).
                        if isinstance(patched.get("status"), dict):
                            operator.remember(key, patched)
                except KubeError as exc:
                    retry += 1
                    delay = min(2.0**retry, MAX_RETRY_DELAY) if exc.retryable else NON_RETRYABLE_DELAY
                    logger.warning(f"reconcile failed, retrying in {delay:g} s: {exc}")
                except Exception:
                    retry += 1
                    delay = min(2.0**retry, MAX_RETRY_DELAY)
                    logger.exception(f"reconcile failed unexpectedly, retrying in {delay:g} s")
                else:
                    written = status or current.get("status") or {}
                    if children_refused(written):
                        retry += 1
                        delay = min(REFUSED_FIRST_DELAY * 2.0 ** (retry - 1), REFUSED_MAX_DELAY)
                        operator.metrics.errors.labels("refused").inc()
                        logger.warning(f"the API server refused a write of a child, retrying in {delay:g} s")
                    else:
                        retry = 0
                        delay = settings.poll_seconds if needs_poll(written) else math.inf
                    if fresh:
                        next_resync = loop.time() + settings.resync_seconds
                await _sleep(wake, stopped, min(delay, max(0.0, next_resync - loop.time())))
                trigger = "watch" if wake.is_set() else "poll"
        finally:
            operator.wakeups.pop(key, None)
            operator.latest.pop(key, None)

    @kopf.on.event(*resource, id="job-changed", registry=registry)
    async def job_changed(type: str, body: kopf.Body, **_: Any) -> None:
        key = _key(body)
        if type == "DELETED":
            operator.latest.pop(key, None)
            return
        operator.remember(key, dict(body))
        operator.wake(*key)

    for child in watched_kinds(settings):
        _watch_child(registry, operator, cache, child)

    @kopf.on.event("v1", "persistentvolumeclaims", id="claim-changed", registry=registry)
    async def claim_changed(type: str, body: kopf.Body, **_: Any) -> None:
        """Claims are the users' objects (no label of ours): a change wakes the jobs of its namespace."""
        _store(cache, PVCS, type, dict(body))
        operator.wake(_namespace(body))

    @kopf.on.delete(*resource, id="forget", optional=True, registry=registry)
    def forget(body: kopf.Body, **_: Any) -> None:
        """Children go with the job through their ownerReferences; only the metrics forget it."""
        operator.metrics.observe_phase(f"{body.metadata.namespace}/{body.metadata.name}", None)

    @kopf.on.probe(id="jobs", registry=registry)
    def jobs(**_: Any) -> int:
        return operator.metrics.tracked_jobs()


def watched_kinds(settings: OperatorSettings) -> tuple[Resource, ...]:
    """The kinds kopf watches: Workloads only with the Kueue integration (kopf resolves every watched
    kind at startup and warns about a CRD that is not installed)."""
    kueue = (workloads(settings.kueue_api_version),) if settings.kueue_enabled else ()
    return (DEPLOYMENTS, JOBS, PODS, PVCS, SERVICES, NETWORK_POLICIES, *kueue)


def _store(cache: ObjectCache, res: Resource, type_: str | None, obj: dict) -> None:
    if type_ == "DELETED":
        cache.forget(res, obj["metadata"].get("namespace") or "", obj["metadata"]["name"], deleted=obj)
    else:
        cache.store(res, obj)


def _watch_child(registry: kopf.OperatorRegistry, operator: Operator, cache: ObjectCache, res: Resource) -> None:
    """Cache the job's children of kind `res` and wake their job (app.kubernetes.io/instance) on any change."""
    selector = (res.group, res.version, res.plural) if res.group else (res.version, res.plural)

    @kopf.on.event(*selector, id=f"{res.plural}-changed", labels=WATCH_LABELS, registry=registry)
    async def child_changed(type: str, body: kopf.Body, **_: Any) -> None:
        _store(cache, res, type, dict(body))
        job = body.metadata.labels.get(INSTANCE_LABEL)
        if job:
            operator.wake(_namespace(body), job)


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
    register(registry, operator, api)
    if not settings.standalone:
        register_peering(registry, operator, api)
    return operator


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    """kopf's own settings: bookkeeping in g2rpo.dev annotations (the status schema is strict), no
    CRD scanning (so no cluster-wide CRD read permission), peering so that replicas never both act
    (cluster-wide ClusterKopfPeering, or one KopfPeering per watched namespace with G2RPO_NAMESPACES),
    and the children's watches filtered by our managed-by label on the API server."""
    ks = kopf.OperatorSettings()
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    ks.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX)
    ks.persistence.finalizer = f"{ANNOTATION_PREFIX}/operator"
    ks.scanning.disabled = True
    selector = ",".join(f"{k}={v}" for k, v in WATCH_LABELS.items())
    for res in watched_kinds(settings):
        if res is not PVCS:  # server-side: the operator never streams the cluster's other pods
            ks.watching.label_selectors[
                (res.group, res.version, res.plural) if res.group else (res.version, res.plural)
            ] = selector
    ks.peering.name = PEERING_NAME
    ks.peering.standalone = settings.standalone
    ks.peering.mandatory = not settings.standalone
    ks.peering.clusterwide = not settings.namespaces
    ks.peering.priority = settings.peering_priority if settings.peering_priority is not None else time.time_ns() // 1000
    return ks
