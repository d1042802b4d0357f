"""What a real API server would check of the operator's requests: Kubernetes RBAC over the rules the
chart renders, and the OwnerReferencesPermissionEnforcement admission plugin (on by default on
OpenShift). Neither runs here (no kube-apiserver; KMock authorizes nothing), so both are ported, each
from its upstream source:

- the plugin: kubernetes/kubernetes plugin/pkg/admission/gc/gc_admission.go (`Validate`). Changing an
  object's ownerReferences (an update that adds, removes or edits one) needs `delete` on the object
  itself; a *create* does not (kubernetes/kubernetes#63403, Kubernetes 1.11: "owner references can be
  set during creation without deletion power"). Every ownerReference newly carrying
  blockOwnerDeletion=true, on create or update, needs `update` on the owner's `finalizers`
  subresource (same namespace for a namespaced owner).
- RBAC: kubernetes/kubernetes plugin/pkg/auth/authorizer/rbac/rbac.go with
  pkg/apis/rbac/v1/evaluation_helpers.go: a rule allows a request when its verbs, apiGroups and
  resources (`resource/subresource` for a subresource) match, `*` matching all, and its
  resourceNames (if any) name the object; a ClusterRole bound by a ClusterRoleBinding applies in
  every namespace, a Role bound by a RoleBinding in its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Request:
    """An authorization request, as the API server asks RBAC (authorizer.AttributesRecord)."""

    verb: str
    group: str
    resource: str
    namespace: str
    name: str = ""
    subresource: str = ""
    why: str = ""

    @property
    def qualified(self) -> str:
        return self.resource + (f"/{self.subresource}" if self.subresource else "")

    def __str__(self) -> str:
        where = f"{self.group or 'core'}/{self.qualified} {self.name!r} in {self.namespace or 'the cluster'}"
        return f"{self.verb} {where}" + (f" ({self.why})" if self.why else "")


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def _blocking(refs: list[Manifest]) -> list[Manifest]:
    return [ref for ref in refs if ref.get("blockOwnerDeletion") is True]


def owner_reference_checks(
    obj: Manifest,
    group: str,
    resource: str,
    plural_of: dict[tuple[str, str], str],
    old: Manifest | None = None,
) -> list[Request]:
    """The authorization requests gc_admission.go's Validate makes for creating `obj` (old None) or
    updating `old` to `obj`, a `group`/`resource` object; `plural_of` maps an owner's (group, kind) to
    its resource, as the API server's RESTMapper does (an unmapped owner is refused upstream too)."""
    meta = obj["metadata"]
    new_refs = meta.get("ownerReferences") or []
    old_refs = ((old or {}).get("metadata") or {}).get("ownerReferences") or []
    changing = bool(new_refs) if old is None else new_refs != old_refs
    if not changing:
        return []
    namespace, name = meta.get("namespace", ""), meta["name"]
    checks = []
    if old is not None:
        checks.append(Request("delete", group, resource, namespace, name, why="an update changing ownerReferences"))
    old_blocking = {ref["uid"] for ref in _blocking(old_refs)}
    for ref in _blocking(new_refs):
        if ref["uid"] in old_blocking:
            continue
        owner_group = _group(ref["apiVersion"])
        owner = plural_of.get((owner_group, ref["kind"]))
        if owner is None:
            raise LookupError(f"no REST mapping for {ref['apiVersion']} {ref['kind']}: the API server refuses it")
        checks.append(
            Request(
                "update",
                owner_group,
                owner,
                namespace,
                ref["name"],
                subresource="finalizers",
                why=f"blockOwnerDeletion on {meta['name']}'s ownerReference",
            )
        )
    return checks


@dataclass(frozen=True)
class Grants:
    """The rules bound to one service account: cluster-wide ones and those of each namespace."""

    cluster: tuple[Manifest, ...]
    by_namespace: dict[str, tuple[Manifest, ...]]

    @classmethod
    def rendered(cls, documents: list[Manifest], account: str, account_namespace: str) -> Grants:
        """From the chart's rendered documents: the roles whose bindings name the service account."""
        roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in documents}
        cluster: list[Manifest] = []
        by_namespace: dict[str, list[Manifest]] = {}
        for binding in documents:
            if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
                continue
            if {"kind": "ServiceAccount", "name": account, "namespace": account_namespace} not in binding["subjects"]:
                continue
            ref = binding["roleRef"]
            here = binding["metadata"].get("namespace", "")
            role = roles[(ref["kind"], here if ref["kind"] == "Role" else "", ref["name"])]
            if binding["kind"] == "ClusterRoleBinding":
                cluster += role["rules"]
            else:
                by_namespace.setdefault(here, []).extend(role["rules"])
        return cls(tuple(cluster), {ns: tuple(rules) for ns, rules in by_namespace.items()})

    def allows(self, request: Request) -> bool:
        rules = self.cluster + (self.by_namespace.get(request.namespace, ()) if request.namespace else ())
        return any(_matches(rule, request) for rule in rules)


def _matches(rule: Manifest, request: Request) -> bool:
    def has(values: list[str], value: str) -> bool:
        return "*" in values or value in values

    names = rule.get("resourceNames") or []
    return (
        has(rule.get("verbs") or [], request.verb)
        and has(rule.get("apiGroups") or [], request.group)
        and has(rule.get("resources") or [], request.qualified)
        and (not names or request.name in names)
    )
