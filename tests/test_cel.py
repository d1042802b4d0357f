"""The CRD's admission rules (`x-kubernetes-validations`), evaluated with cel-python on held examples.

No API server runs here, so this module does what kube-apiserver does with a custom resource
before its CEL rules run, then runs every rule with the `cel-python` interpreter:
- structural defaulting (a missing field with a `default` gets it, recursively);
- values typed by the schema (a `number` written as `1` is a double, as in Kubernetes'
  UnstructuredToVal);
- each rule evaluated with `self` at its node (every item of a list), transition rules (those
  naming `oldSelf`) only on updates and only where both the old and the new value exist.
The rules use only standard CEL (has, type, size, all, exists_one, filter, startsWith, matches),
which cel-python implements itself: no Kubernetes extension function needs a shim.

What this cannot check: the API server's type checker and cost estimator (no kube-apiserver here);
tests/test_operator_cluster.py applies the CRD to a real cluster when one is configured. The cost
estimator needs bounded strings and lists: test_every_string_list_and_map_under_spec_is_bounded.

Each refusal is also checked against the model and the operator (admission.validate), or for the
two rules that only the trainer checked so far (batch layout, bundled model name), against the
trainer's start-up checks: they must refuse the same field.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from g2rpo.api.crd import CROSS_FIELD_RULES, render_crd
from g2rpo.api.spec import MUTABLE_FIELDS, SpecError, parse_job
from g2rpo_operator.admission import validate

from operator_fixtures import deep_merge, job_manifest

CEL = celpy.Environment()


def root_schema() -> dict:
    return render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def rule_nodes(node: dict, steps: tuple[str, ...] = ()):
    """(path steps, node) for every schema node carrying rules; "[]" steps into list items."""
    if node.get("x-kubernetes-validations"):
        yield steps, node
    for name, child in (node.get("properties") or {}).items():
        yield from rule_nodes(child, (*steps, name))
    if "items" in node:
        yield from rule_nodes(node["items"], (*steps, "[]"))


def defaulted(node: dict, value: Any) -> Any:
    """Kubernetes' structural defaulting, applied before validation."""
    if isinstance(value, dict) and "properties" in node:
        for name, child in node["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value and value[name] is not None:
                value[name] = defaulted(child, value[name])
    elif isinstance(value, list) and "items" in node:
        return [defaulted(node["items"], item) for item in value]
    return value


def typed(node: dict, value: Any) -> Any:
    """JSON as the API server types it for CEL: numbers are doubles even when written as integers."""
    if node.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        if "properties" in node:
            return {k: typed(node["properties"].get(k, {}), v) for k, v in value.items()}
        if isinstance(node.get("additionalProperties"), dict):
            return {k: typed(node["additionalProperties"], v) for k, v in value.items()}
    if isinstance(value, list) and "items" in node:
        return [typed(node["items"], item) for item in value]
    return value


def values_at(value: Any, steps: tuple[str, ...]) -> list[Any]:
    if not steps:
        return [value]
    head, rest = steps[0], steps[1:]
    if head == "[]":
        return [v for item in (value or []) for v in values_at(item, rest)]
    if not isinstance(value, dict) or value.get(head) is None:
        return []
    return values_at(value[head], rest)


@cache
def program(rule: str):
    return CEL.program(CEL.compile(rule))


def run(rule: str, self_value: Any, old_value: Any = None) -> bool:
    activation = {"self": celpy.json_to_cel(self_value)}
    if old_value is not None:
        activation["oldSelf"] = celpy.json_to_cel(old_value)
    result = program(rule).evaluate(activation)
    if isinstance(result, celpy.CELEvalError):
        return False  # the API server refuses an object whose rule errors
    return bool(result)


def admit(new: dict, old: dict | None = None) -> list[str]:
    """The messages of every rule the object breaks (empty: admitted). `old`: an update."""
    schema = root_schema()
    new = typed(schema, defaulted(schema, copy.deepcopy(new)))
    old = typed(schema, defaulted(schema, copy.deepcopy(old))) if old is not None else None
    refused = []
    for steps, node in rule_nodes(schema):
        for entry in node["x-kubernetes-validations"]:
            transition = "oldSelf" in entry["rule"]
            if transition and old is None:
                continue
            if transition:
                assert "[]" not in steps, "transition rules inside lists need list-type map correlation"
                pairs = list(zip(values_at(new, steps), values_at(old, steps), strict=False))
            else:
                pairs = [(value, None) for value in values_at(new, steps)]
            if not all(run(entry["rule"], value, previous) for value, previous in pairs):
                refused.append(entry["message"])
    return refused


def field_of(message: str) -> str:
    """The dotted field a message starts with, list indices dropped."""
    return re.sub(r"\[\d*\]", "", message.split(":", 1)[0].split(" ", 1)[0])


def operator_errors(document: dict) -> list[str]:
    _, errors = validate(document["metadata"]["name"], document["spec"])
    return errors


def trainer_start_errors(document: dict) -> list[str]:
    """What the trainer refuses at start-up (on a cluster: world size = replicas x GPUs per replica)."""
    from g2rpo.api.spec import SpecError
    from g2rpo.models.bundled import resolve_model_path
    from g2rpo.train.build import _check_batch_layout

    spec = parse_job(document).spec
    errors = []
    for check in (
        lambda: _check_batch_layout(spec, spec.trainer.replicas * spec.trainer.gpus_per_replica),
        lambda: resolve_model_path(spec.model),
    ):
        try:
            check()
        except SpecError as exc:
            errors += exc.lines()
    return errors


# --- the rules -----------------------------------------------------------------------------------


def test_every_rule_compiles_and_names_its_field():
    rules = [entry for _, node in rule_nodes(root_schema()) for entry in node["x-kubernetes-validations"]]
    assert len(rules) > 30
    for entry in rules:
        program(entry["rule"])  # raises on a rule cel-python cannot parse
        assert entry["message"].startswith(("spec.", "metadata.")), entry
        assert entry["reason"] in {
            "FieldValueInvalid",
            "FieldValueForbidden",
            "FieldValueRequired",
            "FieldValueDuplicate",
        }
        assert entry.get("fieldPath", ".").startswith("."), entry


def test_a_valid_job_is_admitted_and_so_is_the_model_and_the_operator():
    document = job_manifest()
    assert admit(document) == []
    assert operator_errors(document) == []
    parse_job(document)


def test_the_shipped_example_is_admitted():
    example = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "g2rpojob.yaml"
    (job,) = [d for d in yaml.safe_load_all(example.read_text()) if d and d["kind"] == "G2RPOJob"]
    assert admit(job) == []


# (spec changes, expected CEL message prefix); every cross-field rule needs at least one example.
VIOLATIONS = [
    ({"rewards": [{"name": "accuracy"}, {"name": "accuracy"}]}, "spec.rewards: a reward name is listed twice"),
    (
        {"rewards": [{"name": "accuracy", "drivesGuidance": True}, {"name": "format", "drivesGuidance": True}]},
        "spec.rewards: only one reward can drive",
    ),
    ({"rewards": [{"name": "code"}]}, "spec.dataset.testsColumn:"),
    ({"dataset": {"guidanceColumn": None}}, "spec.dataset.guidanceColumn:"),
    ({"guidance": {"ratio": 0.1}, "training": {"numGenerations": 8}}, "spec.guidance.ratio:"),
    ({"training": {"epsilon": 0.3, "epsilonHigh": 0.2}}, "spec.training.epsilonHigh:"),
    ({"checkpoint": {"volumeClaim": None}}, "spec.checkpoint.volumeClaim:"),
    ({"guidance": {"schedule": "concave"}}, "spec.guidance.totalSteps:"),
    ({"guidance": {"schedule": "cosine", "minLength": 0}}, "spec.guidance.totalSteps:"),
    ({"checkpoint": {"dir": "/checkpointsX/a"}}, "spec.checkpoint.dir:"),
    ({"dataset": {"name": "builtin:gsm8k"}}, "spec.dataset.name:"),
    (
        {"training": {"perDeviceBatchSize": 4}, "trainer": {"replicas": 1, "gpusPerReplica": 1}},
        "spec.training.perDeviceBatchSize:",
    ),
    ({"model": {"name": "bundled:SmolLM2-1.7B"}}, "spec.model.name:"),
    ({"dataset": {"arithmetic": {"minSteps": 5, "maxSteps": 2}}}, "spec.dataset.arithmetic.minSteps:"),
    ({"guidance": {"minLength": 10, "maxLength": 5, "initialLength": 5}}, "spec.guidance.minLength:"),
    ({"guidance": {"initialLength": 4000, "maxLength": 3072}}, "spec.guidance.initialLength:"),
    ({"curriculum": {"column": "source", "order": ["a", "b", "a"]}}, "spec.curriculum.order:"),
    ({"rollout": {"gpus": 4, "dataParallelSize": 2}}, "spec.rollout.dataParallelSize:"),
    ({"rollout": {"gpus": 2, "tensorParallelSize": 4}}, "spec.rollout: tensorParallelSize"),
    ({"runPolicy": {"gangScheduler": "kueue"}}, "spec.runPolicy.queue:"),
    ({"trainer": {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]}}, "spec.trainer.tolerations"),
    ({"rollout": {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]}}, "spec.rollout.tolerations"),
    (
        {"controller": {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]}},
        "spec.controller.tolerations",
    ),
]
NAME_VIOLATIONS = [
    ("x" * 53, 1, "metadata.name: at most 52 characters"),
    ("9lives", 1, "metadata.name: must be a DNS-1035 label"),
    ("qwen2.5-math", 1, "metadata.name: must be a DNS-1035 label"),  # a valid custom-resource name
    ("qwen-", 1, "metadata.name: must be a DNS-1035 label"),
    ("j" * 52, 101, "metadata.name: too long for spec.trainer.replicas"),  # <name>-trainer-100: 64
    ("j" * 51, 1001, "metadata.name: too long for spec.trainer.replicas"),  # <name>-trainer-1000: 64
]


@pytest.mark.parametrize("change, expected", VIOLATIONS, ids=[e for _, e in VIOLATIONS])
def test_each_cross_field_violation_is_refused_with_its_message(change, expected):
    document = job_manifest()
    document["spec"] = deep_merge(document["spec"], change)
    refused = admit(document)
    assert refused and refused[0].startswith(expected), refused
    if expected == "spec.guidance.minLength:":  # min > max leaves no room for initialLength either
        assert refused[1:] == ["spec.guidance.initialLength: must lie in [minLength, maxLength]"]
    else:
        assert len(refused) == 1, refused
    # The model and the operator (or the trainer at start-up) refuse the same field; admission says it earlier.
    field = field_of(refused[0])
    errors = operator_errors(document) or trainer_start_errors(document)
    assert any(field_of(e).startswith(field) or field.startswith(field_of(e)) for e in errors), (field, errors)


@pytest.mark.parametrize("name, replicas, expected", NAME_VIOLATIONS)
def test_a_bad_name_is_refused(name, replicas, expected):
    """At admission, by the operator and by `g2rpo validate` (the model), with the same reason."""
    document = job_manifest(name=name, trainer={"replicas": replicas})
    refused = admit(document)
    assert len(refused) == 1 and refused[0].startswith(expected), refused
    assert [e for e in operator_errors(document) if e.startswith(expected)]
    with pytest.raises(SpecError) as raised:
        parse_job(document)
    assert [line for line in raised.value.lines() if line.startswith(expected)], raised.value.lines()


@pytest.mark.parametrize("name, replicas", [("j" * 52, 1), ("j" * 52, 100), ("j" * 51, 1000), ("a", 1), ("a-9", 8)])
def test_the_longest_names_are_admitted(name, replicas):
    document = job_manifest(name=name, trainer={"replicas": replicas})
    assert admit(document) == [] and operator_errors(document) == []
    parse_job(document)


def test_null_optional_fields_read_as_unset():
    document = job_manifest(trainer={"tolerations": [{"key": "a", "operator": "Exists", "value": None}]})
    document["spec"]["training"] = {"epsilonHigh": None}
    assert admit(document) == [] and operator_errors(document) == []


def test_every_cross_field_rule_has_a_refusing_example():
    covered = [expected for _, expected in VIOLATIONS] + [expected for _, _, expected in NAME_VIOLATIONS]
    for rule in CROSS_FIELD_RULES:
        assert any(rule.message.startswith(e) for e in covered), f"no held example refuses: {rule.message}"


# --- updates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"model": {"name": "Qwen/Qwen3-4B-Base"}}, "spec.model"),
        ({"trainer": {"replicas": 4}}, "spec.trainer"),
        ({"guidance": {"ratio": 0.5}}, "spec.guidance"),
        ({"runPolicy": {"gangScheduler": "volcano"}}, "spec.runPolicy.gangScheduler"),
        ({"runPolicy": {"queue": "gpu-queue"}}, "spec.runPolicy.queue"),
        ({"curriculum": {"column": "source"}}, "spec.curriculum"),
        ({"envFromSecret": "hf-token"}, "spec.envFromSecret"),
    ],
)
def test_an_immutable_field_edit_is_refused(edit, field):
    old = job_manifest()
    new = job_manifest(**edit)
    refused = admit(new, old)
    assert refused == [
        f"{field} is immutable: only {', '.join(f'spec.{p}' for p in sorted(MUTABLE_FIELDS))} "
        "can change after creation; create a new job to change it"
    ], refused
    assert admit(new) == []  # the same object is fine as a new job


@pytest.mark.parametrize(
    "edit",
    [{"suspend": True}, {"runPolicy": {"backoffLimit": 9}}, {"runPolicy": {"activeDeadlineSeconds": 3600}}],
)
def test_a_mutable_field_edit_is_admitted(edit):
    assert admit(job_manifest(**edit), job_manifest()) == []


def test_an_old_object_that_lacks_defaulted_sections_compares_after_defaulting():
    """An object stored before a section existed is defaulted on read, like the new one: no false edit."""
    old = job_manifest()
    new = job_manifest(guidance={"ratio": 0.25}, runPolicy={"backoffLimit": 3})
    assert admit(new, old) == []


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, copy.deepcopy(value[0]) if value else "x"]
    if isinstance(value, dict):
        return {**value, "added": "x"}
    return "x"


def test_every_immutability_rule_refuses_a_change_and_admits_none():
    """Generic over every transition rule, so that a new spec field is covered as soon as it exists."""
    schema = root_schema()
    document = typed(schema, defaulted(schema, job_manifest(curriculum={"column": "c"}, envFromSecret="s")))
    checked = 0
    for steps, node in rule_nodes(schema):
        for entry in node["x-kubernetes-validations"]:
            if "oldSelf" not in entry["rule"]:
                continue
            (section,) = values_at(document, steps)
            name = entry["fieldPath"].lstrip(".")
            value = section if section.get(name) is not None else {**section, name: "x"}
            changed = {**value, name: _changed(value.get(name))}
            absent = {k: v for k, v in value.items() if k != name}
            assert run(entry["rule"], value, copy.deepcopy(value)), entry
            assert not run(entry["rule"], changed, value), entry
            if "has(" in entry["rule"]:
                assert not run(entry["rule"], value, absent) and not run(entry["rule"], absent, value), entry
            checked += 1
    # One rule per field that is neither mutable nor a section holding mutable fields.
    spec_fields = root_schema()["properties"]["spec"]["properties"]
    sections = {path.split(".")[0] for path in MUTABLE_FIELDS if "." in path}
    expected = sum(name not in MUTABLE_FIELDS and name not in sections for name in spec_fields)
    for section in sections:
        expected += sum(f"{section}.{name}" not in MUTABLE_FIELDS for name in spec_fields[section]["properties"])
    assert checked == expected > 10


# --- the API server's cost estimator needs bounds -------------------------------------------------


def _unbounded(node: dict, path: str):
    kind = node.get("type")
    if kind == "string" and "maxLength" not in node and "enum" not in node:
        yield path
    if kind == "array" and "maxItems" not in node:
        yield path
    if kind == "object" and isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node:
        yield path
    for name, child in (node.get("properties") or {}).items():
        yield from _unbounded(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _unbounded(node[key], f"{path}.{key}")


def test_every_string_list_and_map_under_spec_is_bounded():
    assert list(_unbounded(root_schema()["properties"]["spec"], "spec")) == []
