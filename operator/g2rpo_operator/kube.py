"""A small dict-in, dict-out Kubernetes API client for the kinds the operator manages.

It borrows configuration, authentication and TLS from the official `kubernetes` client (kubeconfig,
in-cluster service account, exec plugins) and speaks plain JSON, so the reconciler works on the same
dicts the builders produce. Errors become `KubeError` with the HTTP status; `retryable` tells the
caller whether backing off and trying again can help (429, 5xx, no connection).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from g2rpo_operator.settings import KUEUE_VERSIONS

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def discovery_path(self) -> str:
        """Its group version's path: GET lists the kinds the API server serves there."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = self.discovery_path
        path = f"{base}/namespaces/{namespace}/{self.plural}" if self.namespaced else f"{base}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
SECRETS = Resource("", "v1", "secrets", "Secret")
SERVICES = Resource("", "v1", "services", "Service")
PODS = Resource("", "v1", "pods", "Pod")
EVENTS = Resource("", "v1", "events", "Event")
PVCS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
JOBS = Resource("batch", "v1", "jobs", "Job")
PODGROUPS = Resource("scheduling.volcano.sh", "v1beta1", "podgroups", "PodGroup")
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
PRIORITY_CLASSES = Resource("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", namespaced=False)
KUEUE_GROUP = "kueue.x-k8s.io"


def workloads(version: str) -> Resource:
    return Resource(KUEUE_GROUP, version, "workloads", "Workload")


def resource_flavors(version: str) -> Resource:
    return Resource(KUEUE_GROUP, version, "resourceflavors", "ResourceFlavor", namespaced=False)


CLUSTER_PEERINGS = Resource("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", namespaced=False)
PEERINGS = Resource("kopf.dev", "v1", "kopfpeerings", "KopfPeering")
_BY_KIND = {
    (r.api_version, r.kind): r
    for r in (
        CONFIGMAPS,
        SECRETS,
        SERVICES,
        DEPLOYMENTS,
        JOBS,
        PODGROUPS,
        NETWORK_POLICIES,
        *(kind(version) for version in KUEUE_VERSIONS for kind in (workloads, resource_flavors)),
        PRIORITY_CLASSES,
        PODS,
        PVCS,
        CLUSTER_PEERINGS,
        PEERINGS,
    )
}


_BY_KIND_ONLY = {r.kind: r for r in _BY_KIND.values() if r.group != KUEUE_GROUP}


def resource_of(manifest: Manifest) -> Resource:
    return _BY_KIND[(manifest["apiVersion"], manifest["kind"])]


def resource_of_kind(kind: str, kueue_version: str) -> Resource:
    """The resource of a kind the operator manages (none is served by two API groups; Kueue's kinds in
    the version the operator speaks)."""
    if kind == "Workload":
        return workloads(kueue_version)
    return _BY_KIND_ONLY[kind]


class KubeError(Exception):
    def __init__(self, status: int, message: str, detail: str | None = None):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.detail = detail if detail is not None else message
        """The API server's own message (its Status object's `message`), without the request."""

    @property
    def retryable(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500

    @property
    def refused(self) -> bool:
        """The API server (an admission plugin, a webhook, RBAC, a quota) refused the request itself: the
        same request fails again until someone changes the cluster or the job (400, 403, 404, 422, ...).
        409 (exists, or a stale version) and 429 (throttled) are not refusals."""
        return 400 <= self.status < 500 and self.status not in (409, 429)


def compare_versions(a: Manifest, b: Manifest) -> int | None:
    """-1, 0 or 1 as object `a` is an older, the same or a newer version than `b` (by resourceVersion);
    None when either version cannot be compared.

    Answers arrive out of order: a write's response read in a pass's thread can land after the watch
    event of a later change, and a late watch event after a fresh read. A resourceVersion is an etcd
    revision, an integer that only grows; Kubernetes 1.35 made comparing two of the same resource
    part of the API (KEP-5504)."""
    first = str(a.get("metadata", {}).get("resourceVersion", ""))
    second = str(b.get("metadata", {}).get("resourceVersion", ""))
    if not (first.isdigit() and second.isdigit()):
        return None
    return (int(first) > int(second)) - (int(first) < int(second))


def older_than(candidate: Manifest, current: Manifest) -> bool:
    """Whether `candidate` is known to be an older version than `current` (incomparable: not older)."""
    return compare_versions(candidate, current) == -1


def matches(obj: Manifest, labels: dict[str, str]) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class KubeApi:
    """Blocking calls (run from kopf's sync handlers, which kopf runs in its thread pool)."""

    def __init__(self, api_client: k8s.ApiClient, timeout: float = 10.0):
        self.api_client = api_client
        self.timeout = timeout

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In-cluster service account when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube)."""
        configuration = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=configuration)
        return cls(k8s.ApiClient(configuration))

    @classmethod
    def for_url(cls, url: str) -> KubeApi:
        """An unauthenticated client for a loopback API server (tests, benchmarks)."""
        return cls(k8s.ApiClient(k8s.Configuration(host=url)))

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self.api_client.param_serialize(
            method, path, query_params=query or None, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        try:
            response = self.api_client.call_api(*request, _request_timeout=self.timeout)
            response.read()
        except (urllib3.exceptions.HTTPError, k8s.ApiException, OSError) as exc:
            raise KubeError(getattr(exc, "status", 0) or 0, f"{method} {path}: {exc}") from None
        text = (response.data or b"").decode() or "{}"
        if response.status >= 400:
            try:
                message = json.loads(text).get("message") or text
            except ValueError:
                message = text
            raise KubeError(response.status, f"{method} {path}: {message}", message)
        return json.loads(text)

    def get(self, res: Resource, namespace: str, name: str) -> Manifest | None:
        try:
            return self._call("GET", res.path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, res: Resource, namespace: str, labels: dict[str, str]) -> list[Manifest]:
        """Objects carrying all `labels`. The selector is also applied here: some API fakes ignore it."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items = self._call("GET", res.path(namespace), query=[("labelSelector", selector)]).get("items") or []
        return [item for item in items if matches(item, labels)]

    def list_events(self, namespace: str, pods: Sequence[str]) -> Sequence[Manifest]:
        """The events about the named pods (one field-selected list per pod; the names are also checked here:
        some API fakes ignore field selectors)."""
        return [
            item
            for name in pods
            for item in self._call(
                "GET",
                EVENTS.path(namespace),
                query=[("fieldSelector", f"involvedObject.kind=Pod,involvedObject.name={name}")],
            ).get("items")
            or []
            if (item.get("involvedObject") or {}).get("name") == name
        ]

    def create(self, manifest: Manifest, dry_run: bool = False) -> Manifest:
        """Create; `dry_run` only asks whether the API server would (it answers 409 when the name is
        taken: k8s.io/apiserver pkg/registry/generic/registry/dryrun.go checks storage), storing nothing."""
        res = resource_of(manifest)
        query = [("dryRun", "All")] if dry_run else None
        return self._call("POST", res.path(manifest["metadata"].get("namespace")), body=manifest, query=query)

    def patch(
        self, res: Resource, namespace: str, name: str, body: Manifest, subresource: str | None = None
    ) -> Manifest:
        return self._call(
            "PATCH", res.path(namespace, name, subresource), body=body, content_type="application/merge-patch+json"
        )

    def serves(self, res: Resource) -> bool:
        """Whether the API server serves `res` (its group version's discovery document lists it; every
        authenticated client may read discovery)."""
        try:
            found = self._call("GET", res.discovery_path)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return any(item.get("name") == res.plural for item in found.get("resources") or [])

    def delete(self, res: Resource, namespace: str, name: str, propagation: str = "Background") -> None:
        """Delete; an object already gone is not an error (deletion is idempotent)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self._call("DELETE", res.path(namespace, name), body=body)
        except KubeError as exc:
            if exc.status != 404:
                raise
