"""What the operator knows of a job's children between API reads: a cache fed by watches.

kopf watches the kinds whose changes matter to a job's status or that a pass brings back from a
manual edit (WATCHED: Deployments, Jobs, Pods, Services, NetworkPolicies and, with the Kueue
integration on, Kueue Workloads labelled app.kubernetes.io/managed-by=g2rpo-operator, server-side,
and PersistentVolumeClaims) and stores every event here; the event also wakes the owning job's pass (handlers.py). A pass reads
through `View`:

- a *fresh* view (a job's first pass, then every settings.resync_seconds) reads every object from
  the API and refreshes the cache: it repairs whatever a lost watch event would have missed;
- a *cached* view answers watched kinds from the cache (a miss means "absent": the watch would
  have said otherwise) and other kinds (ConfigMap, Secret, PodGroup) from what the last fresh pass or this operator's own writes saw, asking the API only for what it
  has never seen. A steady job's cached passes therefore make no API request at all.

Writes go through the view too, and their answers update the cache, so a pass never acts twice on
its own stale picture (e.g. patching the ConfigMap again because the cache still held the old one).
Answers and events race (a write's answer, read in a pass's thread, can arrive after the watch event
of a later change), so the cache never replaces an object by an older version of it, nor brings back
one whose deletion it saw (`kube.older_than`).
"""

from __future__ import annotations

import collections
import copy
import threading

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
    compare_versions,
    matches,
    older_than,
    resource_of,
)

WATCHED = frozenset(res.kind for res in (DEPLOYMENTS, JOBS, PODS, PVCS, SERVICES, NETWORK_POLICIES)) | {"Workload"}
"""Kinds a cached view answers from the cache. Workloads are watched only with the Kueue integration on
(handlers.watched_kinds), and only jobs under Kueue, which it requires, ever read one."""
Key = tuple[Resource, str, str]
TOMBSTONES = 4096
"""How many deletions the cache remembers (a late answer must not bring a deleted object back)."""


class ObjectCache:
    """Objects by (resource, namespace, name); thread-safe (kopf's event loop writes, passes in threads read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[Key, Manifest] = {}
        self._deleted: collections.OrderedDict[Key, Manifest] = collections.OrderedDict()

    def store(self, res: Resource, obj: Manifest) -> None:
        """Keep `obj` unless the cache knows a newer version of it, or of its deletion."""
        meta = obj["metadata"]
        key = (res, meta.get("namespace") or "", meta["name"])
        with self._lock:
            alive, gone = self._objects.get(key), self._deleted.get(key)
            if alive is not None and older_than(obj, alive):
                return
            if gone is not None and compare_versions(obj, gone) in (-1, 0):
                return  # a version from before the deletion (a DELETED event may carry the last version)
            self._deleted.pop(key, None)
            self._objects[key] = obj

    def forget(self, res: Resource, namespace: str, name: str, deleted: Manifest | None = None) -> None:
        """Drop an object; `deleted` (a watch's DELETED event, which carries the deletion's version) is
        remembered, so that an older answer arriving late cannot bring the object back."""
        key = (res, namespace, name)
        with self._lock:
            current = self._objects.get(key)
            if deleted is not None and current is not None and older_than(deleted, current):
                return  # the event of an earlier object of that name, deleted before this one was created
            self._objects.pop(key, None)
            if deleted is not None:
                self._deleted[key] = deleted
                self._deleted.move_to_end(key)
                while len(self._deleted) > TOMBSTONES:
                    self._deleted.popitem(last=False)

    def get(self, res: Resource, namespace: str, name: str) -> Manifest | None:
        with self._lock:
            obj = self._objects.get((res, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def knows(self, res: Resource, namespace: str, name: str) -> bool:
        with self._lock:
            return (res, namespace, name) in self._objects

    def list(self, res: Resource, namespace: str, labels: dict[str, str]) -> list[Manifest]:
        with self._lock:
            found = [obj for (r, ns, _), obj in self._objects.items() if r is res and ns == namespace]
        return [copy.deepcopy(obj) for obj in found if matches(obj, labels)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)


class View:
    """The API as one pass sees it: reads from the cache unless `fresh`, writes through to the API."""

    def __init__(self, api: KubeApi, cache: ObjectCache, fresh: bool):
        self.api = api
        self.cache = cache
        self.fresh = fresh

    def get(self, res: Resource, namespace: str, name: str) -> Manifest | None:
        if not self.fresh and (res.kind in WATCHED or self.cache.knows(res, namespace, name)):
            return self.cache.get(res, namespace, name)
        obj = self.api.get(res, namespace, name)
        if obj is None:
            self.cache.forget(res, namespace, name)
        else:
            self.cache.store(res, obj)
        return obj

    def list(self, res: Resource, namespace: str, labels: dict[str, str]) -> list[Manifest]:
        if not self.fresh:
            return self.cache.list(res, namespace, labels)
        found = self.api.list(res, namespace, labels)
        names = {obj["metadata"]["name"] for obj in found}
        for stale in self.cache.list(res, namespace, labels):
            if stale["metadata"]["name"] not in names:
                self.cache.forget(res, namespace, stale["metadata"]["name"])
        for obj in found:
            self.cache.store(res, obj)
        return found

    def exists_unread(self, manifest: Manifest, create: bool) -> bool:
        """Whether an object of `manifest`'s kind and name exists, for a kind the operator may create but
        never read (Secrets, see tokens.py); `create` creates it if absent, else a dry-run create asks.
        Either answers 409 for a taken name and never carries the existing object. The cache keeps a
        stub (name only) of one known to exist, so a cached view asks again only after a fresh one."""
        res, meta = resource_of(manifest), manifest["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if not self.fresh and self.cache.knows(res, namespace, name):
            return True
        try:
            self.api.create(manifest, dry_run=not create)
            existed = False
        except KubeError as exc:
            if exc.status != 409:
                raise
            existed = True
        if existed or create:
            self.cache.store(res, {"metadata": {"namespace": namespace, "name": name}})
        else:
            self.cache.forget(res, namespace, name)
        return existed

    def create(self, manifest: Manifest) -> Manifest:
        created = self.api.create(manifest)
        if created.get("metadata", {}).get("name"):
            self.cache.store(resource_of(manifest), created)
        return created

    def patch(
        self, res: Resource, namespace: str, name: str, body: Manifest, subresource: str | None = None
    ) -> Manifest:
        patched = self.api.patch(res, namespace, name, body, subresource)
        if subresource is None and patched.get("metadata", {}).get("name"):
            self.cache.store(res, patched)
        return patched

    def delete(self, res: Resource, namespace: str, name: str, propagation: str = "Background") -> None:
        """The object may linger (finalizers, foreground deletion): until the watch says more, the cache
        marks it as being deleted, so that the next pass does not ask again."""
        self.api.delete(res, namespace, name, propagation)
        obj = self.cache.get(res, namespace, name)
        if obj is not None:
            obj["metadata"].setdefault("deletionTimestamp", "requested")
            self.cache.store(res, obj)
