"""What a pass writes back to a live child: the fields the operator renders that the API lets change.

Every pass compares each owned child with what the builders render now (the spec, the operator's
settings, the operator's version) and patches the difference, so a manual edit or a settings change
is undone or applied (merge patches: fields others add, such as the API server's defaults, stay):

- every kind below: the labels and annotations the operator sets, with its values (a removed
  app.kubernetes.io/managed-by label would hide the child from the operator's watches);
- ConfigMap: the accepted spec (`data`);
- Deployment: the replica count and the rollout's gang-epoch annotation only. The rest of a pod
  template is never rewritten: that would restart vLLM or the controller mid-run;
- Service: the rendered spec fields (selector, ports, publishNotReadyAddresses), but never clusterIP
  (immutable once allocated: kubernetes pkg/apis/core/validation ValidateServiceUpdate);
- NetworkPolicy: the whole spec, compared exactly (who may reach the pods: a peer a user widened must
  be narrowed again; the API server defaults nothing the builders leave out);
- PodGroup (Volcano): the rendered spec fields (Volcano's podgroup webhooks act on CREATE only:
  volcano pkg/webhooks/admission/podgroups);
- Workload (Kueue): the rendered spec fields, only while Kueue has not reserved quota for it: from
  then on its pod sets are immutable (kueue pkg/webhooks/workload_webhook.go ValidateWorkloadUpdate:
  validateImmutablePodSets when HasQuotaReservation) and so are queueName and priorityClassRef (the
  CEL rules on kueue apis/kueue/v1beta2/workload_types.go Workload); it is recreated with the new
  spec after the next eviction or suspend;
- Secret (the controller token the pods already mounted) and the trainer Job (an immutable pod
  template): left as created, so the operator needs no right to change Secrets or Jobs.

Comparison: a rendered mapping matches a live one when each rendered key matches (the API server adds
defaults: Service.spec.type, a Workload's `active`), except maps of strings (label selectors, node
selectors, resource lists), which must be equal; lists match item by item.
"""

from __future__ import annotations

from typing import Any

from g2rpo_operator.builders.common import GANG_EPOCH_ANNOTATION, Manifest

IMMUTABLE_SPEC_FIELDS = {"Service": frozenset({"clusterIP", "clusterIPs"})}
SPEC_SYNCED = frozenset({"Service", "NetworkPolicy", "PodGroup", "Workload"})
EXACT_SPEC = frozenset({"NetworkPolicy"})
LEFT_AS_CREATED = frozenset({"Secret", "Job"})


def _string_map(value: dict[str, Any]) -> bool:
    return all(isinstance(item, str) for item in value.values())


def matches(rendered: Any, live: Any) -> bool:
    """Whether the live value holds what the builders rendered (see the module docstring)."""
    if isinstance(rendered, dict | list) and not rendered and live is None:
        return True  # an empty map or list is not stored (omitempty)
    if isinstance(rendered, dict):
        if not isinstance(live, dict):
            return False
        if _string_map(rendered):
            return rendered == live
        return all(matches(value, live.get(key)) for key, value in rendered.items())
    if isinstance(rendered, list):
        return (
            isinstance(live, list)
            and len(rendered) == len(live)
            and all(matches(a, b) for a, b in zip(rendered, live, strict=True))
        )
    return rendered == live


def stored_form(value: Any) -> Any:
    """`value` as the API server stores it: an empty `matchLabels` map is dropped (metav1.LabelSelector:
    omitempty), but an empty selector itself is kept (`namespaceSelector: {}` means every namespace)."""
    if isinstance(value, dict):
        return {
            key: stored_form(item)
            for key, item in value.items()
            if item is not None and not (key == "matchLabels" and not item)
        }
    if isinstance(value, list):
        return [stored_form(item) for item in value]
    return value


def merge_patch(rendered: Any, live: Any, exact: bool = False) -> Any:
    """The JSON merge patch (RFC 7386) value that turns `live` into `rendered`: a merge patch merges
    maps, so keys to drop are sent as null: every extra key where `exact`, else those of maps of
    strings (a selector); lists and scalars are replaced whole."""
    if not (isinstance(rendered, dict) and isinstance(live, dict)):
        return rendered
    out = {key: merge_patch(value, live.get(key), exact) for key, value in rendered.items()}
    if exact or _string_map(rendered):
        out.update({key: None for key in live if key not in rendered})
    return out


def quota_reserved(workload: Manifest) -> bool:
    conditions = (workload.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "QuotaReserved" and c.get("status") == "True" for c in conditions)


def _metadata_patch(live: Manifest, desired: Manifest) -> Manifest:
    patch: Manifest = {}
    for field in ("labels", "annotations"):
        wanted = desired["metadata"].get(field) or {}
        have = live["metadata"].get(field) or {}
        changed = {key: value for key, value in wanted.items() if have.get(key) != value}
        if changed:
            patch[field] = changed
    return patch


def _spec_patch(kind: str, live: Manifest, desired: Manifest) -> Manifest:
    if kind not in SPEC_SYNCED or (kind == "Workload" and quota_reserved(live)):
        return {}
    rendered, have = desired.get("spec") or {}, live.get("spec") or {}
    if kind in EXACT_SPEC:
        return merge_patch(rendered, have, exact=True) if stored_form(rendered) != stored_form(have) else {}
    skipped = IMMUTABLE_SPEC_FIELDS.get(kind, frozenset())
    return {
        key: merge_patch(value, have.get(key))
        for key, value in rendered.items()
        if key not in skipped and not matches(value, have.get(key))
    }


def _deployment_patch(live: Manifest, desired: Manifest) -> Manifest:
    """Scale, and the gang epoch (raising it replaces the vLLM pod, see builders.common)."""
    patch: Manifest = {}
    if live["spec"].get("replicas") != desired["spec"]["replicas"]:
        patch["replicas"] = desired["spec"]["replicas"]
    wanted = (desired["spec"]["template"]["metadata"].get("annotations") or {}).get(GANG_EPOCH_ANNOTATION)
    have = (live["spec"]["template"]["metadata"].get("annotations") or {}).get(GANG_EPOCH_ANNOTATION)
    if wanted is not None and wanted != have:
        patch["template"] = {"metadata": {"annotations": {GANG_EPOCH_ANNOTATION: wanted}}}
    return patch


def drift_patch(live: Manifest, desired: Manifest) -> Manifest | None:
    """The merge patch that brings the live child back to the rendered one where the API allows it
    (None: nothing to do)."""
    kind = desired["kind"]
    if kind in LEFT_AS_CREATED:
        return None
    patch: Manifest = {}
    metadata = _metadata_patch(live, desired)
    if metadata:
        patch["metadata"] = metadata
    spec = _deployment_patch(live, desired) if kind == "Deployment" else _spec_patch(kind, live, desired)
    if spec:
        patch["spec"] = spec
    if kind == "ConfigMap" and live.get("data") != desired["data"]:
        patch["data"] = desired["data"]
    return patch or None
