"""The training set of a job: any source, mapped to the one shape the trainer reads.

Sources (`dataset.name`): `builtin:arithmetic` (generated, offline); a local file (.jsonl, .json,
.parquet, .csv) or folder (written by `save_to_disk`, or holding data files); otherwise a hub id.
Whatever the source, the result has exactly these columns, so that the trainer, the rewards and
the guidance code never look at user column names:

- `prompt`: conversational, [{"role": "system", ...} if dataset.systemPrompt, {"role": "user", "content": problem}]
- `answer`: the reference final answer, a string (numbers in the source become strings: 12.0 -> "12")
- `guidance`: the reference reasoning trajectory ("" when dataset.guidanceColumn is unset)
- `difficulty`: the difficulty key as a string (dataset.difficultyColumn, else curriculum.column,
  else the step count of builtin:arithmetic; "" when there is none)
- `tests`: test code for the code reward, only when dataset.testsColumn is set

Rows without a value that the job needs (`required_roles`: the prompt always; the answer only
with the accuracy reward; the guidance only when guidance.ratio > 0; the tests with the code
reward; the difficulty when dataset.difficultyColumn is set) follow dataset.onInvalidRow:
`error` (default: a demanding user wants to know, not to train on a silently smaller or
emptier set) refuses the dataset naming the column, the count and the first rows; `skip` drops
them and logs the count per column. A value is missing when it is None, NaN (an empty CSV
cell) or blank text; it is never turned into "". Rows are numbered from 1 in source order.
Missing curriculum keys follow curriculum.unknown. Then the curriculum order applies, then
dataset.maxSamples. Every problem a user can fix is a SpecError naming the spec field.

A relative local path in dataset.name is resolved by the command line against the job file's
folder (`resolve_relative_name`), so a job and its data travel together. Everywhere else (the
cluster trainer, whose job file is a ConfigMap mount with nothing beside it) it is read from the
current folder, and an error says so.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from datasets import Dataset

from g2rpo.api.spec import DatasetSpec, G2RPOJobSpec, SpecError
from g2rpo.data.arithmetic import generate
from g2rpo.data.curriculum import COLUMN_PATH, sorted_indices

logger = logging.getLogger(__name__)

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BUILTIN_DIFFICULTY_COLUMN = "steps"
NAME_PATH = ("spec", "dataset", "name")
SPLIT_PATH = ("spec", "dataset", "split")
STATE_FILE = datasets.config.DATASET_STATE_JSON_FILENAME  # save_to_disk of a Dataset
DATASET_DICT_FILE = datasets.config.DATASETDICT_JSON_FILENAME  # save_to_disk of a DatasetDict


class SourceColumn(NamedTuple):
    field_path: tuple[str, ...]  # the spec field that names the column, for errors
    name: str


def required_roles(spec: G2RPOJobSpec) -> set[str]:
    """The output columns every row must have a value in, given the job's rewards and guidance."""
    names = {reward.name for reward in spec.rewards}
    roles = {"prompt"}
    if "accuracy" in names:
        roles.add("answer")
    if spec.guidance.ratio > 0 and spec.dataset.guidance_column:
        roles.add("guidance")
    if "code" in names:
        roles.add("tests")
    if spec.dataset.difficulty_column:
        roles.add("difficulty")
    return roles


def load_training_dataset(spec: G2RPOJobSpec) -> Dataset:
    """The job's training rows: columns prompt, answer, guidance, difficulty (and tests)."""
    source = _load_source(spec.dataset)
    if len(source) == 0:
        raise SpecError([(NAME_PATH, f"dataset {spec.dataset.name!r} has no rows")])
    columns = _source_columns(spec)
    _check_columns_exist(columns, source.column_names)

    kept = _valid_rows(source, columns, required_roles(spec), spec.dataset.on_invalid_row)
    if spec.curriculum is not None:
        keys = list(source[spec.curriculum.column])
        ordered = sorted_indices([keys[i] for i in kept], spec.curriculum, row_numbers=[i + 1 for i in kept])
        _log_unlisted_tiers([keys[i] for i in kept], spec)
        kept = [kept[i] for i in ordered]
    if spec.dataset.max_samples is not None:
        kept = kept[: spec.dataset.max_samples]

    rows = source.select(kept)
    table: dict[str, list[Any]] = {
        "prompt": [prompt_messages(_text(p), spec.dataset.system_prompt) for p in rows[columns["prompt"].name]]
    }
    for role in ("answer", "guidance", "difficulty", "tests"):
        if role in columns:
            table[role] = [_text(value) for value in rows[columns[role].name]]
        elif role != "tests":
            table[role] = [""] * len(rows)
    return Dataset.from_dict(table)


def _valid_rows(source: Dataset, columns: dict[str, SourceColumn], required: set[str], policy: str) -> list[int]:
    """Indices of the rows with a value in every required column, following dataset.onInvalidRow."""
    missing: dict[str, list[int]] = {}
    for role in sorted(required & columns.keys(), key=list(columns).index):
        values = source[columns[role].name]
        rows = [i for i, value in enumerate(values) if not _text(value).strip()]
        if rows:
            missing[role] = rows
    if not missing:
        return list(range(len(source)))
    total = len(source)
    if policy == "error":
        raise SpecError(
            [
                (
                    columns[role].field_path,
                    f"{len(rows)} of {total} rows have no {columns[role].name!r} value (rows {_row_list(rows)}); "
                    "fix the data or set dataset.onInvalidRow: skip",
                )
                for role, rows in missing.items()
            ]
        )
    invalid = set().union(*missing.values())
    for role, rows in missing.items():
        logger.warning(
            "skipping %d of %d rows with no %r value (rows %s; dataset.onInvalidRow: skip)",
            len(rows),
            total,
            columns[role].name,
            _row_list(rows),
        )
    kept = [i for i in range(total) if i not in invalid]
    if not kept:
        raise SpecError([(("spec", "dataset", "onInvalidRow"), f"all {total} rows were skipped as invalid")])
    logger.warning("training on %d of %d rows", len(kept), total)
    return kept


def _row_list(rows: list[int], shown: int = 5) -> str:
    numbers = ", ".join(str(i + 1) for i in rows[:shown])
    return numbers + (f", ... ({len(rows) - shown} more)" if len(rows) > shown else "")


def _log_unlisted_tiers(keys: list[Any], spec: G2RPOJobSpec) -> None:
    """Under curriculum.unknown first/last, say how many rows have a key outside curriculum.order."""
    curriculum = spec.curriculum
    if curriculum is None or curriculum.order is None or curriculum.unknown == "error":
        return
    listed = set(curriculum.order)
    unlisted = [(i, key) for i, key in enumerate(keys) if str(key) not in listed]
    if unlisted:
        examples = ", ".join(f"row {i + 1}: {key!r}" for i, key in unlisted[:5])
        logger.warning(
            "%d rows have a %r value not listed in curriculum.order (%s); they go %s (curriculum.unknown)",
            len(unlisted),
            curriculum.column,
            examples,
            curriculum.unknown,
        )


def prompt_messages(problem: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation a problem is posed as, in training and in `g2rpo eval` alike."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": problem}]


def _source_columns(spec: G2RPOJobSpec) -> dict[str, SourceColumn]:
    """The source column behind each output column (and behind the curriculum key).

    The answer column is mapped only when a reward reads it (accuracy), so a code-only job's
    data needs none; without it every row's answer is "".
    """
    dataset = spec.dataset
    columns = {"prompt": SourceColumn(("spec", "dataset", "promptColumn"), dataset.prompt_column)}
    if "accuracy" in {reward.name for reward in spec.rewards}:
        columns["answer"] = SourceColumn(("spec", "dataset", "answerColumn"), dataset.answer_column)
    if dataset.guidance_column and spec.guidance.ratio > 0:  # vanilla GRPO reads no trajectory
        columns["guidance"] = SourceColumn(("spec", "dataset", "guidanceColumn"), dataset.guidance_column)
    if dataset.difficulty_column:
        columns["difficulty"] = SourceColumn(("spec", "dataset", "difficultyColumn"), dataset.difficulty_column)
    elif spec.curriculum is not None:
        columns["difficulty"] = SourceColumn(COLUMN_PATH, spec.curriculum.column)
    elif dataset.is_builtin_arithmetic:
        columns["difficulty"] = SourceColumn(NAME_PATH, BUILTIN_DIFFICULTY_COLUMN)
    if dataset.tests_column:
        columns["tests"] = SourceColumn(("spec", "dataset", "testsColumn"), dataset.tests_column)
    if spec.curriculum is not None:
        columns["curriculum"] = SourceColumn(COLUMN_PATH, spec.curriculum.column)
    return columns


def _check_columns_exist(columns: dict[str, SourceColumn], available: list[str]) -> None:
    missing = {path: column for path, column in columns.values() if column not in available}
    if missing:
        listing = ", ".join(available)
        raise SpecError(
            [
                (
                    path,
                    f"no column {column!r} in the dataset{_did_you_mean(column, available)}; available columns: {listing}",
                )
                for path, column in missing.items()
            ]
        )


def _did_you_mean(name: str, available: list[str]) -> str:
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.6) or [
        a for a in available if a.lower() == name.lower()
    ]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _text(value: Any) -> str:
    """A cell as text: None and NaN (empty CSV cells) -> "", whole floats without their ".0"."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value)


def resolve_relative_name(dataset: DatasetSpec, job_dir: Path) -> None:
    """Make a relative local dataset.name absolute, against the job file's folder (in place).

    A name is local when it exists there, ends in a data file suffix or starts with "."; any
    other relative name (org/name) stays a hub id.
    """
    name = dataset.name
    if dataset.is_builtin_arithmetic or name.startswith(("/", "~")):
        return
    candidate = (job_dir / name).absolute()
    if candidate.exists():
        dataset.name = str(candidate)
    elif Path(name).suffix in FILE_FORMATS or name.startswith("."):
        raise SpecError(
            [
                (
                    NAME_PATH,
                    f"no such file or folder: {candidate} (a relative dataset.name is read from the job file's folder, {job_dir.absolute()})",
                )
            ]
        )


def _load_source(dataset: DatasetSpec) -> Dataset:
    if dataset.is_builtin_arithmetic:
        return Dataset.from_list(generate(dataset.arithmetic))
    path = Path(dataset.name).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_folder(path, dataset.split)
    if path.suffix in FILE_FORMATS or dataset.name.startswith(("/", ".", "~")):
        where = "" if path.is_absolute() else f" (a relative name is read from the current folder, {Path.cwd()})"
        raise SpecError([(NAME_PATH, f"no such file or folder: {path}{where}")])
    try:
        return datasets.load_dataset(dataset.name, dataset.config, split=dataset.split)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise SpecError([(NAME_PATH, f"not a local path, and the hub has no dataset {dataset.name!r}: {exc}")]) from exc
    except ConnectionError as exc:  # datasets' own "Couldn't reach '<name>' on the Hub (<cause>)" (datasets/load.py)
        raise HubUnreachable(
            [
                (
                    NAME_PATH,
                    f"could not download {dataset.name!r}: {exc}; connect to the network (check HF_ENDPOINT, "
                    "HF_HUB_OFFLINE, proxy settings) and retry, or set dataset.name to a local copy (a .jsonl, "
                    ".json, .parquet or .csv file, or a folder)",
                )
            ]
        ) from exc


class HubUnreachable(SpecError):
    """The job names a hub dataset and the hub cannot be reached: the job may be right, its data is unchecked."""


def _load_file(path: Path) -> Dataset:
    data_format = FILE_FORMATS.get(path.suffix)
    if data_format is None:
        raise SpecError([(NAME_PATH, f"unsupported file type {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")])
    if data_format == "json":
        _check_json(path)
    try:
        with _datasets_errors_silenced():
            return datasets.load_dataset(data_format, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError) as exc:  # ValueError: a file without rows
        raise SpecError([(NAME_PATH, f"cannot read {path} as {data_format}: {exc.__cause__ or exc}")]) from exc


def _check_json(path: Path, shown: int = 5) -> None:
    """Name what is broken in a .json or .jsonl file as `file:line:column: reason`.

    `datasets` (through pyarrow) accepts some broken lines (a trailing comma), reports others by a
    0-based row inside a block, and logs each error before raising it; Python's json module is
    exact. A .json file is one JSON document, or JSON Lines (which `datasets` reads as well).
    """
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(text)
            return
        except json.JSONDecodeError as exc:
            if not _starts_with_a_json_object_line(text):
                raise SpecError([(NAME_PATH, f"{path}:{exc.lineno}:{exc.colno}: {exc.msg}")]) from None
    broken: list[str] = []
    count = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\n"))
                if isinstance(value, dict):
                    continue
                reason = f"{path}:{number}: a JSON {type(value).__name__}, not an object"
            except json.JSONDecodeError as exc:
                reason = f"{path}:{number}:{exc.colno}: {exc.msg}"
            count += 1
            if len(broken) < shown:
                broken.append(reason)
    if broken:
        more = f"; {count - shown} more" if count > shown else ""
        raise SpecError([(NAME_PATH, f"{count} broken JSON line(s): {'; '.join(broken)}{more}")])


def _starts_with_a_json_object_line(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


@contextmanager
def _datasets_errors_silenced():
    """`datasets` logs a load error before raising it; the SpecError says it once, with the field."""
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


def _load_folder(path: Path, split: str) -> Dataset:
    """A folder written by save_to_disk (a Dataset or a DatasetDict), or one holding data files."""
    saved = any((path / marker).exists() for marker in (STATE_FILE, DATASET_DICT_FILE))
    if saved:
        loaded = datasets.load_from_disk(str(path))
    else:
        for data_file in sorted(path.rglob("*.json*")):
            hidden = any(part.startswith(".") for part in data_file.relative_to(path).parts)  # datasets skips them
            if data_file.suffix in (".json", ".jsonl") and not hidden:
                _check_json(data_file)
        try:
            with _datasets_errors_silenced():
                loaded = datasets.load_dataset(str(path))
        except datasets.exceptions.DataFilesNotFoundError as exc:
            raise SpecError([(NAME_PATH, f"no data files ({', '.join(FILE_FORMATS)}) in {path}")]) from exc
        except datasets.exceptions.DatasetGenerationError as exc:
            raise SpecError([(NAME_PATH, f"cannot read the data files in {path}: {exc.__cause__ or exc}")]) from exc
    if isinstance(loaded, Dataset):
        return loaded
    if split not in loaded:
        raise SpecError([(SPLIT_PATH, f"no split {split!r} in {path}; available splits: {', '.join(loaded)}")])
    return loaded[split]
