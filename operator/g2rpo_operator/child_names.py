"""Whether the API server would take the names a job's children carry, read off the rendered children.

g2rpo.api.spec.job_name_errors (and the CRD's CEL rules made from it) state the job name's limits as
numbers; this module checks what the builders actually render against the API server's own name
rules, so that a new child, a longer suffix or a new label cannot get past those numbers unnoticed:
the operator refuses such a job before creating anything, and tests/test_names.py checks that both
agree. The rules, from kubernetes/apimachinery pkg/util/validation/validation.go and the kinds'
validation (kubernetes pkg/apis/.../validation):

- a Service's name is a DNS-1035 label (ValidateServiceName = NameIsDNS1035Label); every other kind's
  name a DNS-1123 subdomain (NameIsDNSSubdomain; custom resources likewise);
- a label value (objects, pod templates, selectors) has at most 63 characters (IsValidLabelValue); the
  Job controller also copies the Job's name into its pods' `batch.kubernetes.io/job-name` label;
- a pod's hostname and subdomain are DNS-1123 labels; an Indexed Job names its pods' hostnames
  `<job>-<index>` and refuses a Job whose last one would not be one (batch validateJob).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from g2rpo_operator.builders.common import Manifest

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LABEL_MAX = 63
SUBDOMAIN_MAX = 253

_RULES = {
    "DNS-1123 label": (DNS1123_LABEL, LABEL_MAX),
    "DNS-1035 label": (DNS1035_LABEL, LABEL_MAX),
    "DNS-1123 subdomain": (DNS1123_SUBDOMAIN, SUBDOMAIN_MAX),
    "label value": (LABEL_VALUE, LABEL_MAX),
}


def _broken(value: str, rule: str) -> bool:
    pattern, most = _RULES[rule]
    return len(value) > most or not pattern.fullmatch(value)


def constrained_names(child: Manifest) -> Iterator[tuple[str, str, str]]:
    """(where, value, rule) for every name in `child` that the API server checks against a rule."""
    kind, name = child["kind"], child["metadata"]["name"]
    yield "metadata.name", name, "DNS-1035 label" if kind == "Service" else "DNS-1123 subdomain"
    for key, value in (child["metadata"].get("labels") or {}).items():
        yield f"metadata.labels[{key}]", value, "label value"
    spec = child.get("spec") or {}
    if kind == "Service":
        for key, value in (spec.get("selector") or {}).items():
            yield f"spec.selector[{key}]", value, "label value"
    if kind == "Job":
        yield "the pods' label batch.kubernetes.io/job-name", name, "label value"
        if spec.get("completionMode") == "Indexed" and spec.get("completions"):
            yield "the last pod's hostname", f"{name}-{spec['completions'] - 1}", "DNS-1123 label"
    templates = [spec["template"]] if "template" in spec else []
    templates += [pod_set["template"] for pod_set in spec.get("podSets") or []]
    for template in templates:
        for key, value in ((template.get("metadata") or {}).get("labels") or {}).items():
            yield f"pod template label {key}", value, "label value"
        for field in ("hostname", "subdomain"):
            if field in template["spec"]:
                yield f"pod spec.{field}", template["spec"][field], "DNS-1123 label"
    yield from _selector_values(spec, "spec")


def _selector_values(node: object, path: str) -> Iterator[tuple[str, str, str]]:
    """Label values in label selectors (matchLabels) anywhere under `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "matchLabels" and isinstance(value, dict):
                for label, wanted in value.items():
                    yield f"{path}.matchLabels[{label}]", wanted, "label value"
            else:
                yield from _selector_values(value, f"{path}.{key}")
    elif isinstance(node, list):
        for item in node:
            yield from _selector_values(item, f"{path}[]")


def invalid_child_names(children: list[Manifest]) -> list[str]:
    """One line for each name among `children` that the API server would refuse (empty: none)."""
    return [
        f"{child['kind']} {child['metadata']['name']!r}: {where} {value!r} is not a valid {rule} "
        f"(at most {_RULES[rule][1]} characters)"
        for child in children
        for where, value, rule in constrained_names(child)
        if _broken(value, rule)
    ]
