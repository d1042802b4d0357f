"""The job spec: every bad field is rejected with its path and reason; good files validate."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from g2rpo.api.spec import SpecError, load_job, parse_job

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "apiVersion": "g2rpo.dev/v1alpha1",
    "kind": "G2RPOJob",
    "metadata": {"name": "unit"},
    "spec": {
        "model": {"name": "bundled:SmolLM2-135M-Instruct"},
        "dataset": {"name": "builtin:arithmetic", "guidanceColumn": "solution"},
        "training": {"numGenerations": 4},
        "guidance": {"ratio": 0.5, "initialLength": 32, "maxLength": 64},
    },
}


def with_changes(*changes):
    doc = copy.deepcopy(GOOD)
    for path, value in changes:
        node = doc
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


DELETE = object()


def errors_of(doc) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    return {".".join(str(p) for p in path): reason for path, reason in info.value.errors}


def test_good_spec_parses_with_defaults():
    job = parse_job(GOOD)
    assert job.spec.guided_per_group == 2
    assert job.spec.guidance_reward.name == "accuracy"
    assert job.spec.training.num_generations == 4


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ([("spec.guidance.ratio", 1.5)], "spec.guidance.ratio", "less than or equal to 1"),
        ([("spec.guidance.ratio", -0.1)], "spec.guidance.ratio", "greater than or equal to 0"),
        ([("spec.guidance.schedule", "wobbly")], "spec.guidance.schedule", "'wobbly'"),
        ([("spec.guidance.minLength", 70)], "spec.guidance", "minLength (70) must not exceed maxLength (64)"),
        ([("spec.guidance.initialLength", 100)], "spec.guidance", "initialLength (100) must lie in"),
        ([("spec.guidance.loss", "half")], "spec.guidance.loss", "'include' or 'mask'"),
        ([("spec.guidance.window", 0)], "spec.guidance.window", "greater than 0"),
        ([("spec.guidance.decay", 1.5)], "spec.guidance.decay", "less than 1"),
        ([("spec.dataset.guidanceColumn", None)], "spec.dataset.guidanceColumn", "required when guidance.ratio > 0"),
        ([("spec.guidance.ratio", 0.2)], "spec.guidance.ratio", "guides no roll-out"),
        ([("spec.guidance.bogus", 1)], "spec.guidance.bogus", "unknown field"),
        ([("spec.training.numGenerations", 1)], "spec.training.numGenerations", "greater than or equal to 2"),
        ([("spec.training.learningRate", -1)], "spec.training.learningRate", "greater than 0"),
        ([("spec.training.temperature", 0)], "spec.training.temperature", "greater than 0"),
        ([("spec.training.epsilonHigh", 0.1)], "spec.training.epsilonHigh", "at least training.epsilon"),
        ([("spec.training.lossType", "ppo")], "spec.training.lossType", "'ppo'"),
        ([("spec.model.name", "")], "spec.model.name", "at least 1 character"),
        ([("spec.model", DELETE)], "spec.model", "Field required"),
        ([("spec.dataset.name", "builtin:gsm8k")], "spec.dataset", "unknown built-in dataset"),
        ([("spec.rewards", [{"name": "accuracy"}, {"name": "accuracy"}])], "spec.rewards.1.name", "listed twice"),
        ([("spec.rewards", [{"name": "magic"}])], "spec.rewards.0.name", "'magic'"),
        ([("spec.rewards", [{"name": "code"}])], "spec.dataset.testsColumn", "needs a column of test code"),
        (
            [
                (
                    "spec.rewards",
                    [{"name": "accuracy", "drivesGuidance": True}, {"name": "format", "drivesGuidance": True}],
                )
            ],
            "spec.rewards.1.drivesGuidance",
            "only one reward",
        ),
        ([("spec.rewards", [{"name": "format", "weight": float("nan")}])], "spec.rewards.0", "finite"),
        ([("spec.curriculum", {"column": "steps", "order": ["a", "a"]})], "spec.curriculum", "tier twice"),
        ([("spec.checkpoint.everySteps", 0)], "spec.checkpoint.everySteps", "greater than 0"),
        ([("metadata.name", "Bad_Name")], "metadata.name", "must be a DNS-1035 label"),
        ([("apiVersion", "g2rpo.dev/v2")], "apiVersion", "'g2rpo.dev/v1alpha1'"),
        ([("kind", "Job")], "kind", "'G2RPOJob'"),
    ],
)
def test_bad_fields_are_rejected_with_their_path(changes, field, reason):
    found = errors_of(with_changes(*changes))
    assert field in found, f"expected an error on {field}, got {found}"
    assert reason in found[field]


def test_every_error_is_reported_at_once():
    found = errors_of(with_changes(("spec.guidance.ratio", 7), ("spec.training.learningRate", 0), ("spec.extra", 1)))
    assert {"spec.guidance.ratio", "spec.training.learningRate", "spec.extra"} <= set(found)


def test_four_independent_mistakes_are_reported_in_one_run(tmp_path):
    """Field errors (an unknown field, a negative learning rate) and the checks pydantic runs only once the
    fields they read parsed (guidance lengths out of order; a ratio that guides no roll-out, a check of the
    whole spec) come out together (issue 19)."""
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            with_changes(
                ("spec.dataset.colour", "blue"),
                ("spec.training.learningRate", -1e-5),
                ("spec.guidance.minLength", 64),
                ("spec.guidance.maxLength", 8),
                ("spec.guidance.initialLength", 16),
                ("spec.guidance.ratio", 0.1),
            )
        )
    )
    result = _cli("validate", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()[1:]
    assert lines == [
        "  spec.dataset.colour: unknown field",
        "  spec.guidance: minLength (64) must not exceed maxLength (8)",
        "  spec.training.learningRate: Input should be greater than 0",
        "  spec.guidance.ratio: ratio*numGenerations = 0.1*4 guides no roll-out (floor rounds it to 0); raise the "
        "ratio to at least 0.25 or set it to 0 for vanilla GRPO",
    ], result.stderr


def test_a_check_behind_an_unknown_field_of_its_own_section_is_reported():
    found = errors_of(with_changes(("spec.guidance.lenght", 3), ("spec.guidance.minLength", 65)))
    assert set(found) == {"spec.guidance.lenght", "spec.guidance"}, found
    assert "minLength (65) must not exceed maxLength (64)" in found["spec.guidance"]


def test_no_check_speaks_of_a_value_that_was_refused():
    """A refused value's default stands in while the other checks run: no check that reads it may report."""
    found = errors_of(
        with_changes(
            ("spec.training.numGenerations", "four"),  # refused: the default 8 must not be judged with ratio 0.1
            ("spec.guidance.ratio", 0.1),
            ("spec.guidance.minLength", -1),  # refused: the default 1 must not be judged against maxLength 0
            ("spec.guidance.maxLength", 0),
            ("spec.guidance.initialLength", 0),
        )
    )
    assert set(found) == {"spec.training.numGenerations", "spec.guidance.minLength"}, found


def test_a_check_of_the_whole_spec_is_reported_once_beside_an_error_outside_the_spec():
    found = errors_of(with_changes(("metadata.name", "Bad_Name"), ("spec.guidance.ratio", 0.1)))
    assert list(found) == ["metadata.name", "spec.guidance.ratio"]
    with pytest.raises(SpecError) as info:
        parse_job(with_changes(("metadata.name", "Bad_Name"), ("spec.guidance.ratio", 0.1)))
    assert len(info.value.errors) == 2


def test_cross_section_checks_also_run_behind_field_errors_of_parse_spec():
    from g2rpo.api.spec import parse_spec

    spec = with_changes(("spec.guidance.ratio", 0.1), ("spec.rollout.gpus", 0), ("spec.model.revision", 5))["spec"]
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert [".".join(map(str, path)) for path, _ in info.value.errors] == [
        "spec.model.revision",
        "spec.rollout.gpus",
        "spec.guidance.ratio",
    ]


def test_camel_case_names_are_the_contract():
    job = parse_job(with_changes(("spec.training.perDeviceBatchSize", 12)))
    assert job.spec.training.per_device_batch_size == 12
    dumped = job.model_dump(by_alias=True, exclude_none=True)
    assert dumped["spec"]["training"]["perDeviceBatchSize"] == 12


def test_alpha_rounding_follows_eq_3():
    for ratio, g, expected in [(0.25, 12, 3), (1 / 6, 6, 1), (0.5, 5, 2), (1.0, 7, 7), (0.0, 8, 0)]:
        doc = with_changes(("spec.guidance.ratio", ratio), ("spec.training.numGenerations", g))
        assert parse_job(doc).spec.guided_per_group == expected


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_and_start_with_their_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and ("g2rpo run" in first_line or "kubectl apply" in first_line), first_line
    load_job(path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "g2rpo.cli", *args], capture_output=True, text=True, timeout=60)


def test_validate_cli_accepts_a_good_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    result = _cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "valid G2RPOJob 'unit'" in result.stdout


def test_validate_cli_lists_every_error_and_fails(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(with_changes(("spec.guidance.ratio", 2), ("spec.guidance.schedule", "nope"))))
    result = _cli("validate", str(path))
    assert result.returncode == 1
    assert "spec.guidance.ratio: Input should be less than or equal to 1" in result.stderr
    assert "spec.guidance.schedule:" in result.stderr


def test_validate_cli_on_garbage(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("spec: [unclosed")
    result = _cli("validate", str(path))
    assert result.returncode == 1 and "not valid YAML" in result.stderr
    assert _cli("validate", str(tmp_path / "missing.yaml")).returncode == 2


@pytest.mark.parametrize(
    ("field", "suggested"),
    [
        ("spec.training.numGeneratons", "spec.training.numGenerations"),
        ("spec.guidance.initialLenght", "spec.guidance.initialLength"),
        ("spec.rewards.0.wieght", "spec.rewards[0].weight"),
        ("specs", "spec"),
    ],
)
def test_an_unknown_field_names_the_closest_known_one(field, suggested):
    if field.startswith("spec.rewards.0."):
        doc = with_changes(("spec.rewards", [{"name": "accuracy", "wieght": 1}]))
    else:
        doc = with_changes((field, 1))
    assert errors_of(doc)[field] == f"unknown field; did you mean {suggested}?"


def test_an_unknown_field_with_no_close_name_gets_no_guess():
    assert errors_of(with_changes(("spec.training.xyzzy", 1)))["spec.training.xyzzy"] == "unknown field"


def test_parse_spec_suggests_with_the_spec_prefix():
    from g2rpo.api.spec import parse_spec

    with pytest.raises(SpecError) as info:
        parse_spec({**GOOD["spec"], "guidance": {"ratoi": 0.5}})
    assert info.value.lines() == ["spec.guidance.ratoi: unknown field; did you mean spec.guidance.ratio?"]


@pytest.mark.parametrize(
    ("kind_line", "expected"),
    [
        ("kind: G2RPOjob", "kind: must be 'G2RPOJob', found 'G2RPOjob'"),
        ("", "kind: must be 'G2RPOJob', it is missing"),
    ],
)
def test_a_misspelt_or_missing_kind_is_named(tmp_path, kind_line, expected):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GOOD).replace("kind: G2RPOJob", kind_line))
    with pytest.raises(SpecError) as info:
        load_job(path)
    assert info.value.lines() == [f"{expected} (in {path})"]


@pytest.mark.parametrize("num_generations", range(2, 65))
def test_the_suggested_alpha_for_a_ratio_that_guides_nothing_is_accepted(num_generations):
    found = errors_of(with_changes(("spec.guidance.ratio", 0.01), ("spec.training.numGenerations", num_generations)))
    suggested = found["spec.guidance.ratio"].split("raise the ratio to at least ")[1].split(" ")[0]
    assert len(suggested.replace("0.", "", 1).lstrip("0")) <= 4, suggested
    doc = with_changes(("spec.guidance.ratio", float(suggested)), ("spec.training.numGenerations", num_generations))
    assert parse_job(doc).spec.guided_per_group == 1


@pytest.mark.parametrize("field", ["guidance_column", "tests_column"])
def test_the_code_reward_columns_say_that_it_scores_the_fenced_program(field):
    from g2rpo.api.spec import DatasetSpec

    description = DatasetSpec.model_fields[field].description
    assert "last ```python fenced block after </think>" in description, description
