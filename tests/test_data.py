"""Training data: the arithmetic generator, curriculum order, and loading every kind of source.

Local sources are real files written in tmp_path and read by `datasets` itself (its Arrow cache
is redirected into tmp_path too); the hub path needs the network and is not exercised here.
"""

from __future__ import annotations

import json
import logging
import operator
import re
from collections import Counter

import datasets
import pandas as pd
import pytest

from g2rpo.api.spec import ArithmeticDatasetSpec, CurriculumSpec, G2RPOJobSpec, SpecError
from g2rpo.data import load
from g2rpo.data.arithmetic import generate, value_limit
from g2rpo.data.curriculum import order_rows
from g2rpo.data.load import load_training_dataset

STEP_LINE = re.compile(r"^Step (\d+): (\d+) ([-+*/]) (\d+) = (\d+)\.$")
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def job(dataset: dict, curriculum: dict | None = None) -> G2RPOJobSpec:
    """A job around `dataset`; guidance is switched off when the dataset has no guidance column."""
    document = {"model": {"name": "unused"}, "dataset": dataset}
    if dataset.get("guidanceColumn", "solution") is None:
        document["guidance"] = {"ratio": 0}
    if curriculum is not None:
        document["curriculum"] = curriculum
    return G2RPOJobSpec.model_validate(document)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- generator ---------------------------------------------------------------------------------


def test_same_seed_gives_the_same_problems_and_another_seed_others():
    params = ArithmeticDatasetSpec(num_problems=40, seed=3)
    assert generate(params) == generate(params)
    assert generate(params) != generate(ArithmeticDatasetSpec(num_problems=40, seed=4))


def test_answers_equal_the_evaluated_steps_of_the_solution():
    params = ArithmeticDatasetSpec(num_problems=200, min_steps=1, max_steps=5, max_operand=20, seed=7)
    for row in generate(params):
        assert set(row) == {"problem", "answer", "solution", "steps"}
        assert isinstance(row["answer"], str) and isinstance(row["steps"], int)
        head, body_and_tail = row["solution"].split("<think>\n")
        body, tail = body_and_tail.split("\n</think>\n")
        assert head == "" and tail == f"The answer is \\boxed{{{row['answer']}}}."
        lines = body.split("\n")
        assert len(lines) == row["steps"]
        previous = None
        for number, line in enumerate(lines, start=1):
            match = STEP_LINE.match(line)
            assert match, line
            step, left, symbol, right, result = match.groups()
            assert int(step) == number
            assert previous is None or int(left) == previous, "each step starts from the last result"
            exact = OPERATIONS[symbol](int(left), int(right))
            assert exact == int(result), f"{line} (division must be exact)"
            assert 0 <= int(result) <= value_limit(params.max_operand)
            assert 1 <= int(right) <= params.max_operand
            previous = int(result)
        assert row["answer"] == str(previous)
        first_value = lines[0].split()[2]
        assert first_value in row["problem"] and row["problem"].endswith("?")


def test_tiers_are_spread_evenly_over_the_set():
    rows = generate(ArithmeticDatasetSpec(num_problems=10, min_steps=1, max_steps=4))
    counts = Counter(row["steps"] for row in rows)
    assert set(counts) == {1, 2, 3, 4}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_problems_are_not_copies_of_one_template():
    rows = generate(ArithmeticDatasetSpec(num_problems=60, min_steps=2, max_steps=2))
    assert len({row["problem"] for row in rows}) == 60
    names = {row["problem"].split()[0] for row in rows}
    objects = {re.match(r"\w+ has \d+ ([a-z ]+)\.", row["problem"]).group(1) for row in rows}
    assert len(names) >= 5 and len(objects) >= 5


# --- curriculum --------------------------------------------------------------------------------


ROWS = [
    {"id": 0, "source": "olympiads"},
    {"id": 1, "source": "cn_contest"},
    {"id": 2, "source": "mystery"},
    {"id": 3, "source": "amc_aime"},
    {"id": 4, "source": "cn_contest"},
]
TIERS = ["cn_contest", "amc_aime", "olympiads"]


def ids(rows):
    return [row["id"] for row in rows]


def test_order_ranks_rows_by_the_listed_tiers_stably():
    assert ids(order_rows(ROWS, CurriculumSpec(column="source", order=TIERS))) == [1, 4, 3, 0, 2]


def test_unknown_tiers_go_first_last_or_are_an_error():
    assert ids(order_rows(ROWS, CurriculumSpec(column="source", order=TIERS, unknown="first"))) == [2, 1, 4, 3, 0]
    with pytest.raises(SpecError, match=r"spec\.curriculum\.order: 1 rows .*'mystery'"):
        order_rows(ROWS, CurriculumSpec(column="source", order=TIERS, unknown="error"))


def test_order_compares_values_as_strings():
    rows = [{"level": 3}, {"level": 1}, {"level": 2}]
    assert order_rows(rows, CurriculumSpec(column="level", order=["1", "2", "3"])) == [rows[1], rows[2], rows[0]]


def test_without_order_numbers_sort_numerically_and_text_as_strings():
    numbers = [{"level": 10}, {"level": 2}, {"level": "1"}, {"level": None}]
    assert [r["level"] for r in order_rows(numbers, CurriculumSpec(column="level"))] == ["1", 2, 10, None]
    words = [{"level": "b"}, {"level": 10}, {"level": "a"}]
    assert [r["level"] for r in order_rows(words, CurriculumSpec(column="level"))] == [10, "a", "b"]
    with pytest.raises(SpecError, match=r"spec\.curriculum\.unknown"):
        order_rows(numbers, CurriculumSpec(column="level", unknown="error"))


def test_missing_curriculum_column_names_the_field_and_the_columns():
    with pytest.raises(SpecError, match=r"spec\.curriculum\.column: no column 'tier'.*available columns: id, source"):
        order_rows(ROWS, CurriculumSpec(column="tier"))


# --- loading -----------------------------------------------------------------------------------


def test_builtin_arithmetic_with_system_prompt_and_curriculum():
    spec = job(
        {"name": "builtin:arithmetic", "systemPrompt": "Reason step by step.", "arithmetic": {"numProblems": 12}},
        curriculum={"column": "steps"},
    )
    dataset = load_training_dataset(spec)
    assert dataset.column_names == ["prompt", "answer", "guidance", "difficulty"]
    assert len(dataset) == 12
    assert dataset["difficulty"] == sorted(dataset["difficulty"], key=int)
    first = dataset[0]
    assert first["prompt"][0] == {"role": "system", "content": "Reason step by step."}
    assert first["prompt"][1]["role"] == "user" and first["prompt"][1]["content"].endswith("?")
    assert first["guidance"].endswith(f"\\boxed{{{first['answer']}}}.")


def test_builtin_difficulty_is_the_step_count_without_curriculum():
    dataset = load_training_dataset(job({"name": "builtin:arithmetic", "arithmetic": {"numProblems": 8}}))
    assert len(dataset[0]["prompt"]) == 1
    assert sorted(set(dataset["difficulty"])) == ["1", "2", "3", "4"]


def test_jsonl_with_mapped_columns_and_numeric_answers(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "final": i + 1, "level": "easy"} for i in range(3)]
    spec = job(
        {
            "name": write_jsonl(tmp_path / "train.jsonl", rows),
            "promptColumn": "question",
            "answerColumn": "final",
            "guidanceColumn": None,
            "difficultyColumn": "level",
        }
    )
    dataset = load_training_dataset(spec)
    assert dataset.column_names == ["prompt", "answer", "guidance", "difficulty"]
    assert dataset["answer"] == ["1", "2", "3"]
    assert dataset["guidance"] == ["", "", ""]
    assert dataset["difficulty"] == ["easy"] * 3
    assert dataset[2]["prompt"] == [{"role": "user", "content": "What is 2 + 1?"}]


def test_rows_without_a_needed_value_are_refused_by_default_naming_column_and_rows(tmp_path):
    path = tmp_path / "train.csv"
    pd.DataFrame(
        {"problem": ["1+1?", "", "2+2?", "3+3?"], "answer": [2, 0, None, 6], "solution": ["1+1=2", "", "2+2=4", " "]}
    ).to_csv(path, index=False)
    with pytest.raises(SpecError) as caught:
        load_training_dataset(job({"name": str(path)}))
    assert caught.value.lines() == [
        "spec.dataset.promptColumn: 1 of 4 rows have no 'problem' value (rows 2); fix the data or set dataset.onInvalidRow: skip",
        "spec.dataset.answerColumn: 1 of 4 rows have no 'answer' value (rows 3); fix the data or set dataset.onInvalidRow: skip",
        "spec.dataset.guidanceColumn: 2 of 4 rows have no 'solution' value (rows 2, 4); fix the data or set dataset.onInvalidRow: skip",
    ]


def test_skip_policy_drops_invalid_rows_and_counts_them_in_the_log(tmp_path, caplog):
    path = tmp_path / "train.csv"
    pd.DataFrame({"problem": ["1+1?", "", "2+2?"], "answer": [2, 0, None], "solution": ["1+1=2", "", "2+2=4"]}).to_csv(
        path, index=False
    )
    with caplog.at_level(logging.WARNING, logger="g2rpo.data.load"):
        dataset = load_training_dataset(job({"name": str(path), "onInvalidRow": "skip"}))
    assert dataset["answer"] == ["2"] and dataset["guidance"] == ["1+1=2"]
    assert "skipping 1 of 3 rows with no 'problem' value (rows 2; dataset.onInvalidRow: skip)" in caplog.text
    assert "skipping 1 of 3 rows with no 'answer' value (rows 3; dataset.onInvalidRow: skip)" in caplog.text
    assert "training on 1 of 3 rows" in caplog.text


def test_the_answer_column_is_needed_only_by_the_accuracy_reward(tmp_path):
    path = write_jsonl(tmp_path / "code.jsonl", [{"problem": "Write f.", "test": "assert f() == 1"}])
    spec = G2RPOJobSpec.model_validate(
        {
            "model": {"name": "unused"},
            "dataset": {"name": path, "testsColumn": "test", "guidanceColumn": None},
            "rewards": [{"name": "code"}],
            "guidance": {"ratio": 0},
        }
    )
    dataset = load_training_dataset(spec)
    assert dataset["answer"] == [""] and dataset["tests"] == ["assert f() == 1"]
    empty_tests = write_jsonl(tmp_path / "no-tests.jsonl", [{"problem": "Write f.", "test": ""}])
    spec.dataset.name = empty_tests
    with pytest.raises(SpecError, match=r"spec\.dataset\.testsColumn: 1 of 1 rows have no 'test' value \(rows 1\)"):
        load_training_dataset(spec)


def test_a_missing_column_suggests_the_closest_one(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "Answer": "1", "solutions": "s"}])
    with pytest.raises(SpecError) as caught:
        load_training_dataset(job({"name": path}))
    assert caught.value.lines() == [
        "spec.dataset.answerColumn: no column 'answer' in the dataset (did you mean 'Answer'?); "
        "available columns: problem, Answer, solutions",
        "spec.dataset.guidanceColumn: no column 'solution' in the dataset (did you mean 'solutions'?); "
        "available columns: problem, Answer, solutions",
    ]


def test_broken_json_lines_are_named_by_their_line_in_the_file(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"problem": "a", "answer": "1", "solution": "s"}\n'
        "\n"
        '{"problem": "b", "answer": 2,}\n'  # a trailing comma: pyarrow's reader accepts it silently
        '["not", "an", "object"]\n'
    )
    with pytest.raises(SpecError) as caught:
        load_training_dataset(job({"name": str(path)}))
    assert caught.value.lines() == [
        f"spec.dataset.name: 2 broken JSON line(s): {path}:3:30: Expecting property name "
        f"enclosed in double quotes; {path}:4: a JSON list, not an object"
    ]
    assert "broken" not in capsys.readouterr().err, "said once, by the SpecError"


BROKEN_SECOND_LINE = '{"problem": "a", "answer": "1", "solution": "s"}\n{"problem": "b", answer: "2"}\n'


@pytest.mark.parametrize("layout", ["json lines in a .json file", "a folder of .jsonl files"])
def test_a_broken_json_line_is_reported_once_by_file_and_line(tmp_path, capsys, caplog, layout):
    if layout == "json lines in a .json file":
        path = tmp_path / "rows.json"
        name = path
    else:
        (tmp_path / "rows").mkdir()
        path = tmp_path / "rows" / "train.jsonl"
        name = tmp_path / "rows"
    path.write_text(BROKEN_SECOND_LINE)
    with pytest.raises(SpecError) as caught:
        load_training_dataset(job({"name": str(name)}))
    assert caught.value.lines() == [
        f"spec.dataset.name: 1 broken JSON line(s): {path}:2:18: Expecting property name enclosed in double quotes"
    ]
    assert "row" not in capsys.readouterr().err + caplog.text, "said once, by the SpecError"


def test_a_broken_json_document_is_reported_by_file_and_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"problem": "a", "answer": "1", "solution": "s"},\n  {"problem": "b",}\n]\n')
    with pytest.raises(SpecError) as caught:
        load_training_dataset(job({"name": str(path)}))
    assert caught.value.lines() == [
        f"spec.dataset.name: {path}:3:19: Expecting property name enclosed in double quotes"
    ]


def test_a_json_document_and_json_lines_in_a_json_file_both_load(tmp_path):
    rows = [{"problem": "a", "answer": "1", "solution": "s"}, {"problem": "b", "answer": "2", "solution": "t"}]
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name in ("array.json", "lines.json"):
        assert load_training_dataset(job({"name": str(tmp_path / name)}))["answer"] == ["1", "2"]


def test_relative_dataset_names_are_read_from_the_job_files_folder(tmp_path):
    from g2rpo.data.load import resolve_relative_name

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "t.jsonl", [{"problem": "p", "answer": "1", "solution": "s"}])
    spec = job({"name": "data/t.jsonl"})
    resolve_relative_name(spec.dataset, tmp_path)
    assert spec.dataset.name == str(tmp_path / "data" / "t.jsonl")
    missing = job({"name": "data/missing.jsonl"})
    with pytest.raises(
        SpecError,
        match=r"no such file or folder: .*data/missing\.jsonl \(a relative dataset\.name is read from the job file's folder",
    ):
        resolve_relative_name(missing.dataset, tmp_path)
    hub = job({"name": "open-r1/OpenR1-Math-220k"})
    resolve_relative_name(hub.dataset, tmp_path)
    assert hub.dataset.name == "open-r1/OpenR1-Math-220k"


def test_outside_the_command_line_a_relative_name_is_read_from_the_current_folder_and_the_error_says_so(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "1", "solution": "s"}])
    assert load_training_dataset(job({"name": "t.jsonl"}))["answer"] == ["1"]
    with pytest.raises(SpecError) as caught:
        load_training_dataset(job({"name": "data/missing.jsonl"}))
    assert caught.value.lines() == [
        f"spec.dataset.name: no such file or folder: data/missing.jsonl (a relative name is read from the current "
        f"folder, {tmp_path})"
    ]


def test_parquet_with_tests_column(tmp_path):
    path = tmp_path / "code.parquet"
    pd.DataFrame(
        {"problem": ["Write f."], "answer": ["None"], "solution": ["def f(): ..."], "test": ["assert f() is None"]}
    ).to_parquet(path)
    dataset = load_training_dataset(job({"name": str(path), "testsColumn": "test"}))
    assert dataset.column_names == ["prompt", "answer", "guidance", "difficulty", "tests"]
    assert dataset["tests"] == ["assert f() is None"]


def test_max_samples_applies_after_the_curriculum_order(tmp_path):
    rows = [
        {"problem": f"p{i}", "answer": str(i), "solution": "s", "source": tier}
        for i, tier in enumerate(["hard", "easy", "mid", "easy"])
    ]
    spec = job(
        {"name": write_jsonl(tmp_path / "mixed.jsonl", rows), "maxSamples": 3},
        curriculum={"column": "source", "order": ["easy", "mid", "hard"]},
    )
    dataset = load_training_dataset(spec)
    assert dataset["answer"] == ["1", "3", "2"]
    assert dataset["difficulty"] == ["easy", "easy", "mid"]


def test_folders_saved_by_save_to_disk_with_splits(tmp_path):
    rows = {"problem": ["a?", "b?"], "answer": ["1", "2"], "solution": ["x", "y"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "saved")
    assert load_training_dataset(job({"name": str(tmp_path / "saved")}))["answer"] == ["1", "2"]
    with pytest.raises(SpecError, match=r"spec\.dataset\.split: no split 'test'.*available splits: train"):
        load_training_dataset(job({"name": str(tmp_path / "saved"), "split": "test"}))


def test_every_missing_column_is_named_by_its_field_with_the_available_columns(tmp_path):
    spec = job(
        {"name": write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "sol": "s"}]), "difficultyColumn": "level"},
        curriculum={"column": "tier"},
    )
    with pytest.raises(SpecError) as caught:
        load_training_dataset(spec)
    lines = caught.value.lines()
    for field, column in [
        ("spec.dataset.answerColumn", "answer"),
        ("spec.dataset.guidanceColumn", "solution"),
        ("spec.dataset.difficultyColumn", "level"),
        ("spec.curriculum.column", "tier"),
    ]:
        assert any(
            line.startswith(f"{field}: no column {column!r}") and "available columns: problem, sol" in line
            for line in lines
        ), lines


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("{tmp}/missing.jsonl", r"spec\.dataset\.name: no such file or folder"),
        ("{tmp}/rows.txt", r"spec\.dataset\.name: unsupported file type '\.txt'"),
        ("{tmp}/empty.csv", r"spec\.dataset\.name: cannot read .*empty\.csv as csv: .*no data"),
        (
            "{tmp}/broken.jsonl",
            r"spec\.dataset\.name: 1 broken JSON line\(s\): .*broken\.jsonl:1:13: Unterminated string",
        ),
        ("{tmp}/empty.parquet", r"spec\.dataset\.name: cannot read .*empty\.parquet as parquet"),
        ("{tmp}/blank.jsonl", r"spec\.dataset\.promptColumn: 1 of 1 rows have no 'problem' value \(rows 1\)"),
    ],
)
def test_source_errors_name_their_field(tmp_path, name, message):
    (tmp_path / "rows.txt").write_text("problem\n")
    (tmp_path / "empty.csv").write_text("problem,answer,solution\n")
    (tmp_path / "broken.jsonl").write_text('{"problem": "unterminated\n')
    pd.DataFrame({"problem": [], "answer": [], "solution": []}).to_parquet(tmp_path / "empty.parquet")
    write_jsonl(tmp_path / "blank.jsonl", [{"problem": " ", "answer": "1", "solution": "s"}])
    with pytest.raises(SpecError, match=message):
        load_training_dataset(job({"name": name.format(tmp=tmp_path)}))


def test_a_source_without_rows_names_the_dataset(monkeypatch):
    """Local files without rows fail inside `datasets` already (above); a hub split can still be empty."""
    monkeypatch.setattr(load, "_load_source", lambda dataset: datasets.Dataset.from_dict({"problem": []}))
    with pytest.raises(SpecError, match=r"spec\.dataset\.name: dataset 'some/hub-id' has no rows"):
        load.load_training_dataset(job({"name": "some/hub-id"}))


def test_unknown_curriculum_tier_with_error_policy_names_the_order(tmp_path):
    spec = job(
        {"name": write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "1", "solution": "s", "src": "x"}])},
        curriculum={"column": "src", "order": ["a"], "unknown": "error"},
    )
    with pytest.raises(
        SpecError, match=r"spec\.curriculum\.order: 1 rows have a 'src' value not listed in \['a'\] \(row 1: 'x'\)"
    ):
        load_training_dataset(spec)


# --- g2rpo validate opens the data ---------------------------------------------------------------

VALIDATE_JOB = """\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: data-check}}
spec:
  model: {{name: unused}}
  dataset: {{name: {name}, promptColumn: {prompt}}}
  curriculum: {{column: src, order: [easy, hard], unknown: error}}
"""


def validate(tmp_path, capsys, *extra, name="rows.jsonl", prompt="problem"):
    from g2rpo.cli import main

    (tmp_path / "job.yaml").write_text(VALIDATE_JOB.format(name=name, prompt=prompt))
    code = main(["validate", str(tmp_path / "job.yaml"), *extra])
    return code, capsys.readouterr()


@pytest.fixture
def rows_file(tmp_path):
    rows = [
        {"problem": f"p{i}", "answer": str(i), "solution": "s", "src": tier} for i, tier in enumerate(["easy", "hard"])
    ]
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def test_validate_reads_the_data_relative_to_the_job_file(tmp_path, capsys, rows_file, monkeypatch):
    monkeypatch.chdir("/")
    code, out = validate(tmp_path, capsys)
    assert code == 0, out.err
    assert out.out.strip() == f"{tmp_path / 'job.yaml'}: valid G2RPOJob 'data-check'; 2 training rows from {rows_file}"


def test_validate_refuses_a_missing_data_file_naming_where_it_looked(tmp_path, capsys):
    code, out = validate(tmp_path, capsys, name="missing.jsonl")
    assert code == 1
    assert (
        f"spec.dataset.name: no such file or folder: {tmp_path / 'missing.jsonl'} (a relative dataset.name is read from the job file's folder, {tmp_path})"
        in out.err
    )
    assert validate(tmp_path, capsys, "--no-data", name="missing.jsonl")[0] == 0


def test_validate_names_an_unknown_column_and_a_curriculum_value_outside_the_order(tmp_path, capsys, rows_file):
    code, out = validate(tmp_path, capsys, prompt="problems")
    assert code == 1
    assert "spec.dataset.promptColumn: no column 'problems' in the dataset (did you mean 'problem'?)" in out.err
    write_jsonl(tmp_path / "rows.jsonl", [{"problem": "p", "answer": "1", "solution": "s", "src": "medium"}])
    code, out = validate(tmp_path, capsys)
    assert code == 1
    assert (
        "spec.curriculum.order: 1 rows have a 'src' value not listed in ['easy', 'hard'] (row 1: 'medium')" in out.err
    )


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: a connection to it is refused


@pytest.mark.parametrize(
    "network",
    [
        pytest.param({"HF_HUB_OFFLINE": "1"}, id="offline-mode"),
        # A hub endpoint nothing listens on: what no network looks like (huggingface_hub retries it for ~23 s).
        pytest.param(
            {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"},
            id="unreachable",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_validate_data_without_network_is_one_line_naming_the_field_and_what_to_do(tmp_path, network):
    """Issue 19: no retry warnings and no traceback, one line: the field, what failed, what to do."""
    import os
    import subprocess
    import sys

    (tmp_path / "job.yaml").write_text(
        VALIDATE_JOB.format(name="open-r1/OpenR1-Math-220k", prompt="problem").replace("  curriculum:", "#")
    )
    result = subprocess.run(
        [sys.executable, "-m", "g2rpo.cli", "validate", str(tmp_path / "job.yaml"), "--data"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf"), **network},  # an empty cache
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"{tmp_path / 'job.yaml'}: data not checked: spec.dataset.name: could not download 'open-r1/OpenR1-Math-220k': "
        "Couldn't reach 'open-r1/OpenR1-Math-220k' on the Hub ("
    ), lines[0]
    assert lines[0].endswith(
        "or set dataset.name to a local copy (a .jsonl, .json, .parquet or .csv file, or a folder)"
    )
