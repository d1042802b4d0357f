"""The G2RPOJob CRD: rendered from the job-spec model, committed, structural, and validating.

Validation is checked with jsonschema against the rendered openAPIV3Schema (no API server here);
tests/test_operator_cluster.py applies the CRD to a real cluster when one is configured.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from g2rpo.api.crd import SchemaError, render_crd, render_crd_yaml, structural
from g2rpo.api.spec import parse_spec

from operator_fixtures import crd_json_schema, job_manifest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "manifests" / "crd" / "g2rpojob.yaml"
FORBIDDEN = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "const"}


def schema() -> dict:
    return render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_the_rendered_one():
    assert COMMITTED.read_text() == render_crd_yaml(), (
        "manifests/crd/g2rpojob.yaml is stale: regenerate it with "
        "`python -m g2rpo.api.crd > manifests/crd/g2rpojob.yaml` (or `g2rpo crd`)"
    )


def _nodes(node: Any, path: str = ""):
    if isinstance(node, dict):
        if "type" in node or "x-kubernetes-preserve-unknown-fields" in node:
            yield path, node
        for key, value in node.items():
            if key == "properties":
                for name, child in value.items():
                    yield from _nodes(child, f"{path}.{name}")
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                yield from _nodes(value, f"{path}.{key}")


def test_schema_is_structural():
    nodes = list(_nodes(schema()))
    assert len(nodes) > 100
    for path, node in nodes:
        assert not FORBIDDEN & node.keys(), f"{path}: {FORBIDDEN & node.keys()}"
        assert node.get("type") or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        if node.get("type") == "array":
            assert "items" in node, path


def test_crd_metadata_printer_columns_and_status_subresource():
    crd = render_crd()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "g2rpojobs.g2rpo.dev"
    assert crd["spec"]["names"]["shortNames"] == ["g2j"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns)[:4] == ["Phase", "Step", "Reward", "Guidance"] and "Age" in columns
    status = schema()["properties"]["status"]["properties"]
    for name, path in columns.items():
        if path.startswith(".status."):
            assert path.removeprefix(".status.") in status, name
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_types_ranges_enums_defaults_and_descriptions_come_from_the_model():
    spec = schema()["properties"]["spec"]
    guidance = spec["properties"]["guidance"]["properties"]
    assert guidance["ratio"]["minimum"] == 0.0 and guidance["ratio"]["maximum"] == 1.0
    assert guidance["schedule"]["enum"] == ["fixed", "linear", "concave", "stepwise", "adaptive", "cosine"]
    assert guidance["groups"]["enum"] == ["all", "unsolved"] and guidance["groups"]["default"] == "all"
    assert guidance["schedule"]["default"] == "adaptive"
    assert "alpha" in guidance["ratio"]["description"]
    trainer = spec["properties"]["trainer"]["properties"]
    assert trainer["replicas"] == {**trainer["replicas"], "type": "integer", "minimum": 1}
    assert trainer["zeroStage"]["enum"] == [0, 1, 2, 3] and trainer["zeroStage"]["default"] == 2
    temperature = spec["properties"]["training"]["properties"]["temperature"]
    assert temperature["minimum"] == 0 and temperature["exclusiveMinimum"] is True
    assert spec["properties"]["checkpoint"]["properties"]["volumeClaim"]["nullable"] is True
    assert spec["required"] == ["model", "dataset"]


def _apply_defaults(node: dict, value: Any) -> Any:
    """Kubernetes' structural defaulting: a missing field with a default gets it, inside objects that exist."""
    if isinstance(value, dict) and "properties" in node:
        for name, child in node["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = _apply_defaults(child, value[name])
    elif isinstance(value, list) and "items" in node:
        return [_apply_defaults(node["items"], item) for item in value]
    return value


def test_kubernetes_defaults_agree_with_the_model():
    """Defaults applied by the API server must not change what the spec means."""
    raw = job_manifest(
        guidance={"ratio": 0.5}, rollout={"tolerations": [{"key": "x"}]}, curriculum={"column": "source"}
    )
    defaulted = _apply_defaults(schema()["properties"]["spec"], copy.deepcopy(raw["spec"]))
    assert defaulted["guidance"]["schedule"] == "adaptive"
    assert defaulted["rollout"]["tolerations"][0]["operator"] == "Equal"
    assert parse_spec(defaulted) == parse_spec(raw["spec"])


@pytest.mark.parametrize(
    "change, error",
    [
        ({"guidance": {"schedule": "exponential"}}, "is not one of"),
        ({"guidance": {"ratio": 1.5}}, "greater than the maximum"),
        ({"trainer": {"replicas": 0}}, "less than the minimum"),
        ({"trainer": {"zeroStage": 4}}, "is not one of"),
        ({"training": {"temperature": 0}}, "less than or equal to the minimum"),
        ({"rollout": {"memory": "lots"}}, "does not match"),
        ({"training": {"learningRate": "fast"}}, "is not of type"),
        ({"guidance": {"sschedule": "linear"}}, "Additional properties are not allowed"),
    ],
)
def test_schema_rejects_bad_values(change, error):
    validator = jsonschema.Draft4Validator(crd_json_schema())
    validator.validate(job_manifest())
    with pytest.raises(jsonschema.ValidationError, match=error):
        validator.validate(job_manifest(**change))


def test_schema_requires_model_and_dataset():
    document = job_manifest()
    del document["spec"]["model"]
    with pytest.raises(jsonschema.ValidationError, match="'model' is a required property"):
        jsonschema.Draft4Validator(crd_json_schema()).validate(document)


def test_unsupported_constructs_fail_the_render():
    class Mixed(BaseModel):
        value: int | str

    source = Mixed.model_json_schema()
    with pytest.raises(SchemaError, match=r"value: a union of \['integer', 'string'\]"):
        structural(source, {}, "spec")


def test_committed_crd_parses_as_one_yaml_document():
    documents = list(yaml.safe_load_all(COMMITTED.read_text()))
    assert len(documents) == 1 and documents[0] == render_crd()
