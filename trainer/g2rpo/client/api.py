"""G2RPOJobs on a cluster from Python: submit, read, watch, list, delete, and their pods' logs.

Built on the official Kubernetes client (`kubernetes`, the `cluster` extra), so the kubeconfig works
as for kubectl: `KUBECONFIG` (several files joined by ':' are merged), `~/.kube/config`, a named
context, exec credential plugins (gke-gcloud-auth-plugin, `aws eks get-token`), or the pod's service
account inside a cluster. The namespace is the one asked for, else the context's, else the pod's own,
else `default`, as kubectl picks it.

The job and its status are read through the models the operator writes them with (`g2rpo.api.spec`,
`g2rpo.api.status`): no second schema. Every failure a user can cause or meet (no kubeconfig, an
unreachable server, no CRD, a missing job, a refusal) is a `ClusterError` whose message is one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from g2rpo.api.crd import PLURAL
from g2rpo.api.spec import API_GROUP, API_VERSION, KIND, G2RPOJob, SpecError, parse_job
from g2rpo.api.status import Condition, JobStatus, parse_timestamp

INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENTS = ("trainer", "rollout", "controller")
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
"""The Job controller's annotation (and, since Kubernetes 1.28, label) with a pod's index in an Indexed
Job: the trainer pod's node rank (pkg/controller/job/indexed_job_utils.go)."""
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
FINISHED_PHASES = ("Succeeded", "Failed")


class ClusterError(Exception):
    """What went wrong, in one line for the user."""


@dataclass(frozen=True)
class JobView:
    """A G2RPOJob as the operator last reported it."""

    name: str
    namespace: str
    status: JobStatus | None
    """None until the operator has written a status (not running, or not yet reconciled)."""
    max_steps: int | None
    """training.maxSteps when set (else the run ends after training.epochs)."""
    created: datetime | None
    resource_version: str | None = field(default=None, compare=False)

    @property
    def phase(self) -> str:
        return self.status.phase if self.status else "Unknown"

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES

    @property
    def conditions(self) -> list[Condition]:
        return self.status.conditions if self.status else []

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> JobView:
        meta = obj.get("metadata") or {}
        raw_status = obj.get("status")
        training = ((obj.get("spec") or {}).get("training")) or {}
        created = meta.get("creationTimestamp")
        return cls(
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            # The operator writes cleared fields as null: drop them before the model reads the rest.
            status=JobStatus.model_validate({k: v for k, v in raw_status.items() if v is not None})
            if raw_status and raw_status.get("phase")
            else None,
            max_steps=training.get("maxSteps"),
            created=parse_timestamp(created) if created else None,
            resource_version=meta.get("resourceVersion"),
        )


class JobClient:
    """One namespace of one cluster. `api_client` (a configured `kubernetes.client.ApiClient`) skips the
    kubeconfig lookup: tests and in-cluster tools pass their own."""

    def __init__(
        self,
        namespace: str | None = None,
        context: str | None = None,
        kubeconfig: str | None = None,
        api_client: Any = None,
    ) -> None:
        try:
            from kubernetes import client
        except ImportError:
            raise ClusterError(
                "the cluster commands need the Kubernetes client: pip install 'g2rpo[cluster]'"
            ) from None
        context_namespace = None
        if api_client is None:
            api_client, context_namespace = _load_config(context, kubeconfig)
        self._api_client = api_client
        self.server: str = api_client.configuration.host
        self.namespace: str = namespace or context_namespace or _pod_namespace() or "default"
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    # --- jobs ---------------------------------------------------------------------------------

    def submit(self, job: G2RPOJob) -> JobView:
        """Create the job (in its own metadata.namespace if it names one, else this client's)."""
        body = job.model_dump(by_alias=True, exclude_none=True, mode="json")
        body.pop("status", None)
        namespace = job.metadata.namespace or self.namespace
        body["metadata"]["namespace"] = namespace
        created = self._call(
            f"create {KIND} {job.metadata.name!r} in namespace {namespace!r}",
            self._custom.create_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            namespace,
            PLURAL,
            body,
            exists=f"{KIND} {job.metadata.name!r} already exists in namespace {namespace!r}: "
            f"`g2rpo status {job.metadata.name}` shows it; delete it first to submit it again",
            # The body is read here: the generated client maps only 201 (a real API server's answer
            # to a create) to an object, and a stand-in answering 200 would give None.
            _preload_content=False,
        )
        return JobView.from_object(json.loads(created.data))

    def get(self, name: str) -> JobView:
        return JobView.from_object(self._read(name))

    def spec(self, name: str) -> G2RPOJob:
        """The job as submitted, read back through the job model."""
        obj = self._read(name)
        try:
            return parse_job({k: v for k, v in obj.items() if k in ("apiVersion", "kind", "metadata", "spec")})
        except SpecError as exc:
            raise ClusterError(f"{KIND} {name!r} on the cluster does not parse: {'; '.join(exc.lines())}") from None

    def _read(self, name: str) -> dict[str, Any]:
        return self._call(
            f"read {KIND} {name!r}",
            self._custom.get_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            self.namespace,
            PLURAL,
            name,
            missing=name,
        )

    def list(self, all_namespaces: bool = False) -> list[JobView]:
        if all_namespaces:
            answer = self._call(
                f"list {PLURAL} in all namespaces",
                self._custom.list_cluster_custom_object,
                API_GROUP,
                API_VERSION,
                PLURAL,
            )
        else:
            answer = self._call(
                f"list {PLURAL} in namespace {self.namespace!r}",
                self._custom.list_namespaced_custom_object,
                API_GROUP,
                API_VERSION,
                self.namespace,
                PLURAL,
            )
        views = [JobView.from_object(item) for item in answer.get("items", [])]
        return sorted(views, key=lambda v: (v.namespace, v.name))

    def delete(self, name: str) -> None:
        """Delete the job; Kubernetes' garbage collector removes its children (they carry owner references)."""
        self._call(
            f"delete {KIND} {name!r}",
            self._custom.delete_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            self.namespace,
            PLURAL,
            name,
            missing=name,
        )

    def watch(self, name: str, timeout_seconds: int = 300) -> Iterator[JobView]:
        """The job now, then each change, until it finishes (the last view yielded is the finished one).

        A watch on the namespace's jobs, narrowed by a field selector on the name (each view is also
        checked by name, for API servers and stand-ins that ignore selectors); a watch the server closes
        (its timeout, a restart) is reopened from the last resourceVersion seen."""
        from kubernetes import watch

        view = self.get(name)
        yield view
        while not view.finished:
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self._custom.list_namespaced_custom_object,
                    API_GROUP,
                    API_VERSION,
                    self.namespace,
                    PLURAL,
                    field_selector=f"metadata.name={name}",
                    resource_version=view.resource_version,
                    timeout_seconds=timeout_seconds,
                ):
                    obj = event["object"]
                    if (obj.get("metadata") or {}).get("name") != name:
                        continue
                    if event["type"] == "DELETED":
                        raise ClusterError(f"{KIND} {name!r} was deleted")
                    changed = JobView.from_object(obj)
                    if changed.status != view.status:
                        yield changed
                    view = changed
                    if view.finished:
                        return
            except ClusterError:
                raise
            except Exception as exc:  # the stream's own errors: the same one-line translation as any call
                raise self._translate(exc, f"watch {KIND} {name!r}", missing=name) from None
            finally:
                stream.stop()
            view = self.get(name)  # the server ended the watch: re-read, then watch again
            if view.finished:
                yield view

    # --- pods and logs ------------------------------------------------------------------------

    def pod(self, name: str, component: str = "trainer", rank: int = 0) -> dict[str, Any]:
        """The newest pod of the job's `component`; for the trainer, the one of node rank `rank`."""
        if component not in COMPONENTS:
            raise ClusterError(f"component {component!r}: expected one of {', '.join(COMPONENTS)}")
        self.get(name)  # a missing job is reported as such, not as "no pods"
        selector = f"{INSTANCE_LABEL}={name},{COMPONENT_LABEL}={component}"
        answer = self._call(
            f"list the pods of {KIND} {name!r}",
            self._core.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
            _preload_content=False,
        )
        pods = [
            p
            for p in json.loads(answer.data).get("items", [])
            if (labels := (p.get("metadata") or {}).get("labels") or {}).get(INSTANCE_LABEL) == name
            and labels.get(COMPONENT_LABEL) == component
        ]
        if component == "trainer":
            pods = [p for p in pods if _completion_index(p) == rank]
        if not pods:
            which = f"trainer rank {rank}" if component == "trainer" else component
            raise ClusterError(
                f"{KIND} {name!r} has no {which} pod in namespace {self.namespace!r} now "
                f"(phase {self.get(name).phase}; `g2rpo status {name}` says why)"
            )
        return max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))

    def logs(self, name: str, component: str = "trainer", rank: int = 0, follow: bool = False) -> Iterator[str]:
        """The log lines of the pod `pod()` picks (its default container), following them when asked."""
        pod = self.pod(name, component, rank)
        pod_name = pod["metadata"]["name"]
        response = self._call(
            f"read the log of pod {pod_name!r}",
            self._core.read_namespaced_pod_log,
            pod_name,
            self.namespace,
            container=_default_container(pod),
            follow=follow,
            _preload_content=False,
        )
        pending = b""
        try:
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            response.release_conn()

    # --- errors -------------------------------------------------------------------------------

    def _call(
        self, what: str, method: Any, *args: Any, missing: str | None = None, exists: str | None = None, **kwargs: Any
    ) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            raise self._translate(exc, what, missing=missing, exists=exists) from None

    def _translate(
        self, exc: Exception, what: str, missing: str | None = None, exists: str | None = None
    ) -> ClusterError:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if isinstance(exc, ApiException):
            message = _server_message(exc)
            if exc.status == 404:
                if not self._crd_served():
                    return ClusterError(
                        f"the cluster at {self.server} does not serve {PLURAL}.{API_GROUP}/{API_VERSION}: "
                        "the G2RPOJob CRD is not installed (helm install g2rpo charts/g2rpo, or g2rpo crd | kubectl apply -f -)"
                    )
                if missing is not None:
                    return ClusterError(f"{KIND} {missing!r} not found in namespace {self.namespace!r}")
            if exc.status == 409 and exists is not None:
                return ClusterError(exists)
            if exc.status == 403:
                return ClusterError(f"forbidden: cannot {what}: {message}")
            if exc.status == 401:
                return ClusterError(f"unauthorized: the cluster at {self.server} refused the credentials ({message})")
            if exc.status == 422:
                return ClusterError(f"the API server refused to {what}: {message}")
            return ClusterError(f"cannot {what}: {exc.status} {exc.reason}: {message}")
        if isinstance(exc, HTTPError | OSError):
            reason = getattr(exc, "reason", None) or exc
            return ClusterError(f"cannot reach the cluster at {self.server}: {_first_line(str(reason))}")
        return ClusterError(f"cannot {what}: {_first_line(str(exc)) or type(exc).__name__}")

    def _crd_served(self) -> bool:
        """Whether discovery lists the G2RPOJob resource (a 404 then means the object is missing)."""
        from kubernetes import client

        with contextlib.suppress(Exception):
            resources = client.CustomObjectsApi(self._api_client).get_api_resources(API_GROUP, API_VERSION)
            return any(r.name == PLURAL for r in resources.resources or [])
        return False


def _load_config(context: str | None, kubeconfig: str | None) -> tuple[Any, str | None]:
    """An ApiClient from the kubeconfig (or the pod's service account) and the context's namespace."""
    from kubernetes import client, config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except config.ConfigException as exc:
        if context is None and kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            return client.ApiClient(), None
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterError(
            f"no cluster configured: {where}: {_first_line(str(exc))} (set KUBECONFIG or --kubeconfig)"
        ) from None
    chosen = active
    if context is not None:
        chosen = next((c for c in contexts if c["name"] == context), None)
        if chosen is None:
            names = ", ".join(c["name"] for c in contexts) or "none"
            raise ClusterError(f"context {context!r} is not in the kubeconfig (contexts: {names})")
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise ClusterError(f"kubeconfig context {chosen['name']!r}: {_first_line(str(exc))}") from None
    return client.ApiClient(configuration), (chosen.get("context") or {}).get("namespace")


def _pod_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return open(SERVICE_ACCOUNT_NAMESPACE).read().strip() or None
    return None


def _completion_index(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    raw = (meta.get("labels") or {}).get(COMPLETION_INDEX) or (meta.get("annotations") or {}).get(COMPLETION_INDEX)
    return int(raw) if raw is not None and str(raw).isdigit() else None


def _default_container(pod: dict[str, Any]) -> str:
    """kubectl's choice: the default-container annotation, else the first container."""
    annotated = ((pod.get("metadata") or {}).get("annotations") or {}).get(DEFAULT_CONTAINER_ANNOTATION)
    return annotated or pod["spec"]["containers"][0]["name"]


def _server_message(exc: Any) -> str:
    with contextlib.suppress(ValueError, TypeError):
        body = json.loads(exc.body)
        if isinstance(body, dict) and body.get("message"):
            return _first_line(body["message"])
    return _first_line(str(exc.body or exc.reason or ""))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def age(moment: datetime | None, now: datetime | None = None) -> str:
    """kubectl's short age: 45s, 12m, 3h, 2d."""
    if moment is None:
        return "-"
    seconds = max(int(((now or datetime.now(UTC)) - moment).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
