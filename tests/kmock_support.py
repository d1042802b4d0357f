"""KMock, adapted to stand in for a Kubernetes API server in the operator's tests and benchmark.

KMock (PyPI `kmock`, by kopf's author) is the sanctioned fake of the API server on these machines:
there is no cluster here. It serves the Kubernetes REST API on loopback; kopf, the operator and its
API client run for real against it over HTTP. `Emulator` adds what a real API server (and its
garbage collector) does and KMock 0.8 does not, measured in ../shared/testing.md: uid, namespace,
creationTimestamp, generation and resourceVersion on writes, a merge patch that names a stale
resourceVersion refused with 409, and the cascade deletion of objects whose owners are gone. Like
KMock, it has no controllers: tests set child status themselves (`patch_status`), as the
Deployment/Job controllers and the kubelet would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime
import itertools
import socket
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import enums

JOBS = kmock.resource("g2rpo.dev/v1alpha1/g2rpojobs")
CONFIGMAPS = kmock.resource("v1/configmaps")
SECRETS = kmock.resource("v1/secrets")
SERVICES = kmock.resource("v1/services")
PODS = kmock.resource("v1/pods")
PVCS = kmock.resource("v1/persistentvolumeclaims")
DEPLOYMENTS = kmock.resource("apps/v1/deployments")
BATCH_JOBS = kmock.resource("batch/v1/jobs")
PEERINGS = kmock.resource("kopf.dev/v1/clusterkopfpeerings")
NAMESPACED_PEERINGS = kmock.resource("kopf.dev/v1/kopfpeerings")
PODGROUPS = kmock.resource("scheduling.volcano.sh/v1beta1/podgroups")
NETWORK_POLICIES = kmock.resource("networking.k8s.io/v1/networkpolicies")
PRIORITY_CLASSES = kmock.resource("scheduling.k8s.io/v1/priorityclasses")


def kueue_workloads(version: str = "v1beta2") -> kmock.resource:
    return kmock.resource(f"kueue.x-k8s.io/{version}/workloads")


def kueue_flavors(version: str = "v1beta2") -> kmock.resource:
    return kmock.resource(f"kueue.x-k8s.io/{version}/resourceflavors")


WORKLOADS = kueue_workloads()
RESOURCE_FLAVORS = kueue_flavors()
CHILD_RESOURCES = (CONFIGMAPS, SECRETS, SERVICES, DEPLOYMENTS, BATCH_JOBS, NETWORK_POLICIES)


def _path(res: kmock.resource, namespace: str, name: str | None = None) -> str:
    base = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    return f"{base}/namespaces/{namespace}/{res.plural}" + (f"/{name}" if name else "")


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator plus object metadata and ownerReference garbage collection."""

    _versions = itertools.count(1)
    record_requests = True
    """KMock matches every request against every recorded one (quadratic): a long benchmark turns
    this off; then only `served` (requests by client, from the User-Agent) is kept."""

    @property
    def served(self) -> collections.Counter:
        if "_served" not in self.__dict__:
            self.__dict__["_served"] = collections.Counter()
        return self.__dict__["_served"]

    @property
    def refusals(self) -> list[tuple[Callable[[Any], bool], kmock.KubernetesError, list[float]]]:
        if "_refusals" not in self.__dict__:
            self.__dict__["_refusals"] = []
        return self.__dict__["_refusals"]

    def refuse(self, matches: Callable[[Any], bool], status: int, reason: str, message: str) -> list[float]:
        """Answer every request that `matches` with an error Status and store nothing, as an API server's
        admission (RBAC, a webhook, a quota) does; KMock's own reactions answer but still store the write.
        Returns the list the monotonic times of the refused requests are appended to; clear
        `refusals` to lift it."""
        seen: list[float] = []
        self.refusals.append((matches, kmock.KubernetesError(status=status, reason=reason, message=message), seen))
        return seen

    async def _handle(self, request: Any) -> Any:
        self.served[request.headers.get("User-Agent", "").split("/")[0]] += 1
        for matches, error, seen in list(self.refusals):
            if matches(request):
                seen.append(time.monotonic())
                raise error
        if request.action == enums.action.CREATE and request.params.get("dryRun") == "All":
            return self._dry_run_create(request)
        request = self._stamped(request)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:  # a stale resourceVersion: the API server says 422
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
        finally:
            # Only a deletion (or the patch that releases the last finalizer) can orphan anything.
            if (
                request.action in (enums.action.DELETE, enums.action.UPDATE)
                and request.name is not None
                and self.stored(request.resource, request.namespace, request.name) is None
            ):
                await self._collect_garbage()
            if not self.record_requests:
                self._requests[:] = [r for r in self._requests if r is not request]

    def _dry_run_create(self, request: Any) -> Any:
        """A create with dryRun=All, as the API server answers it (k8s.io/apiserver
        pkg/registry/generic/registry/dryrun.go): 409 if the name is taken, else the object as it would
        be created; nothing is stored (KMock itself ignores dryRun and would create it)."""
        meta = request.data.get("metadata") or {}
        if self.stored(request.resource, request.namespace or meta.get("namespace"), meta.get("name")) is not None:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists", message=f"{meta.get('name')!r} exists")
        return aiohttp.web.json_response(request.data, status=201)

    def _stamped(self, request: Any) -> Any:
        if request.resource is None:
            return request
        version = str(next(self._versions))
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            data = copy.deepcopy(request.data)
            meta = data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("namespace", request.namespace)
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["generation"] = 1
            meta["resourceVersion"] = version
            return _with_data(request, data)
        if request.action == enums.action.UPDATE and isinstance(request.data, dict):
            data = copy.deepcopy(request.data)
            expected = (data.get("metadata") or {}).get("resourceVersion")
            if expected is not None:  # a merge patch naming a version applies only over that version
                current = self.stored(request.resource, request.namespace, request.name)
                if current is not None and current["metadata"].get("resourceVersion") != expected:
                    raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
            data.setdefault("metadata", {})["resourceVersion"] = version
            if "spec" in data and request.subresource is None:
                current = self.stored(request.resource, request.namespace, request.name)
                data["metadata"]["generation"] = int((current or {}).get("metadata", {}).get("generation", 0)) + 1
            return _with_data(request, data)
        if request.action == enums.action.UPDATE and isinstance(request.data, list):
            op = {"op": "add", "path": "/metadata/resourceVersion", "value": version}
            return _with_data(request, [*request.data, op])
        return request

    def stored(self, res: Any, namespace: str | None, name: str | None) -> dict | None:
        """The object as stored now (a plain dict), or None when absent or deleted."""
        key = (res, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            return copy.deepcopy(self.objects[key].raw)
        return None

    async def _collect_garbage(self) -> None:
        """Delete, repeatedly, every object all of whose owners are gone (background propagation)."""
        while True:
            async with self._lock:
                live = [(key, obj) for key, obj in self._objects.items() if not obj.deleted]
                uids = {obj.get("metadata", {}).get("uid") for _, obj in live}
                orphans = [
                    (key, obj)
                    for key, obj in live
                    if (refs := obj.get("metadata", {}).get("ownerReferences"))
                    and not any(ref.get("uid") in uids for ref in refs)
                ]
                for key, obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})
            if not orphans:
                return

    # --- what the tests do in place of Kubernetes' controllers and users ---

    def named(self, res: Any, namespace: str) -> dict[str, dict]:
        return {
            key[2]: copy.deepcopy(obj.raw)
            for key, obj in self.objects.items()
            if key[0] == res and key[1] == namespace and not obj.deleted
        }

    async def create_object(self, res: Any, namespace: str, body: dict) -> dict:
        async with self.post(_path(res, namespace), json=body) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def patch_object(self, res: Any, namespace: str, name: str, body: dict, status: bool = False) -> None:
        path = _path(res, namespace, name) + ("/status" if status else "")
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.patch(path, json=body, headers=headers) as response:
            assert response.status < 300, await response.text()

    async def delete_object(self, res: Any, namespace: str, name: str) -> None:
        async with self.delete(_path(res, namespace, name)) as response:
            assert response.status < 300, await response.text()


def _with_data(request: Any, data: Any) -> Any:
    """Replace a request's parsed body in place: KMock matches reactions by request identity, so a
    copy would match none. (kmock's Request is a frozen attrs class, hence object.__setattr__.)"""
    object.__setattr__(request, "data", data)
    return request


ALL_VERBS = frozenset({"create", "delete", "get", "list", "patch", "update", "watch"})
PEERING_VERBS = frozenset({"create", "get", "list", "patch", "watch"})


def _custom_resource(
    kind: str,
    namespaced: bool,
    verbs: frozenset[str] = ALL_VERBS,
    shortnames: tuple[str, ...] = (),
    status: bool = False,
) -> kmock.ResourceInfo:
    """What a CRD serves: the kind, its scope, its verbs and short names, and a status subresource."""
    return kmock.ResourceInfo(
        kind=kind,
        singular=kind.lower(),
        namespaced=namespaced,
        verbs=set(verbs),
        shortnames=set(shortnames),
        subresources={"status"} if status else set(),
    )


def new_emulator() -> Emulator:
    emulator = Emulator()
    with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated importlib call
        warnings.simplefilter("ignore", DeprecationWarning)
        emulator.resources.load_bundled()
    emulator.resources[JOBS] = _custom_resource("G2RPOJob", namespaced=True, shortnames=("g2j",), status=True)
    emulator.resources[PEERINGS] = _custom_resource("ClusterKopfPeering", namespaced=False, verbs=PEERING_VERBS)
    emulator.resources[NAMESPACED_PEERINGS] = _custom_resource("KopfPeering", namespaced=True, verbs=PEERING_VERBS)
    # Kueue's kinds in both versions it has served, as its CRDs serve them (KMock converts nothing between
    # versions and has no Kueue controller: a test speaks the operator's version, and admits and evicts).
    for version in ("v1beta2", "v1beta1"):
        emulator.resources[kueue_workloads(version)] = _custom_resource(
            "Workload", namespaced=True, shortnames=("wl",), status=True
        )
        emulator.resources[kueue_flavors(version)] = _custom_resource(
            "ResourceFlavor", namespaced=False, shortnames=("flavor",)
        )
    return emulator


@contextlib.asynccontextmanager
async def serving(emulator: Emulator) -> AsyncIterator[str]:
    async with emulator, kmock.Server(emulator) as server:
        yield str(server.url).rstrip("/")


@contextlib.contextmanager
def serving_in_thread(emulator: Emulator | None = None) -> Iterator[tuple[Emulator, str, Callable[[Awaitable], Any]]]:
    """KMock serving on loopback from its own thread and event loop, for synchronous clients (a
    subprocess, the Kubernetes Python client); yields (emulator, url, run) where run(coroutine)
    executes on that loop and returns its result."""
    emulator = emulator or new_emulator()
    loop = asyncio.new_event_loop()
    ready, stop, box = threading.Event(), asyncio.Event(), {}

    async def serve() -> None:
        async with serving(emulator) as url:
            box["url"] = url
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "KMock did not start"
    try:
        yield emulator, box["url"], lambda coroutine: asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
