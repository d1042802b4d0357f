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

Rows with an empty prompt are dropped (and counted in the log); then the curriculum order applies,
then dataset.maxSamples. Every problem a user can fix is a SpecError naming the spec field.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from datasets import Dataset

from g2rpo.data.arithmetic import generate
from g2rpo.data.curriculum import COLUMN_PATH, sorted_indices
from g2rpo.spec import DatasetSpec, G2RPOJobSpec, SpecError

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


def load_training_dataset(spec: G2RPOJobSpec) -> Dataset:
    """The job's training rows: columns prompt, answer, guidance, difficulty (and tests)."""
    source = _load_source(spec.dataset)
    if len(source) == 0:
        raise SpecError([(NAME_PATH, f"dataset {spec.dataset.name!r} has no rows")])
    columns = _source_columns(spec)
    _check_columns_exist(columns, source.column_names)

    prompts = list(source[columns["prompt"].name])
    kept = [i for i, prompt in enumerate(prompts) if _text(prompt).strip()]
    if len(kept) < len(source):
        logger.warning("dropped %d of %d rows with an empty prompt", len(source) - len(kept), len(source))
    if not kept:
        raise SpecError([(("spec", "dataset", "promptColumn"), "every row has an empty prompt")])
    if spec.curriculum is not None:
        keys = list(source[spec.curriculum.column])
        kept = [kept[i] for i in sorted_indices([keys[i] for i in kept], spec.curriculum)]
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


def prompt_messages(problem: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation a problem is posed as, in training and in `g2rpo eval` alike."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": problem}]


def _source_columns(spec: G2RPOJobSpec) -> dict[str, SourceColumn]:
    """The source column behind each output column (and behind the curriculum key)."""
    dataset = spec.dataset
    columns = {
        "prompt": SourceColumn(("spec", "dataset", "promptColumn"), dataset.prompt_column),
        "answer": SourceColumn(("spec", "dataset", "answerColumn"), dataset.answer_column),
    }
    if dataset.guidance_column:
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
                (path, f"no column {column!r} in the dataset; available columns: {listing}")
                for path, column in missing.items()
            ]
        )


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


def _load_source(dataset: DatasetSpec) -> Dataset:
    if dataset.is_builtin_arithmetic:
        return Dataset.from_list(generate(dataset.arithmetic))
    path = Path(dataset.name).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_folder(path, dataset.split)
    if path.suffix in FILE_FORMATS or dataset.name.startswith(("/", ".", "~")):
        raise SpecError([(NAME_PATH, f"no such file or folder: {path}")])
    try:
        return datasets.load_dataset(dataset.name, dataset.config, split=dataset.split)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise SpecError([(NAME_PATH, f"not a local path, and the hub has no dataset {dataset.name!r}: {exc}")]) from exc


def _load_file(path: Path) -> Dataset:
    data_format = FILE_FORMATS.get(path.suffix)
    if data_format is None:
        raise SpecError([(NAME_PATH, f"unsupported file type {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")])
    try:
        return datasets.load_dataset(data_format, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError) as exc:  # ValueError: a file without rows
        raise SpecError([(NAME_PATH, f"cannot read {path} as {data_format}: {exc.__cause__ or exc}")]) from exc


def _load_folder(path: Path, split: str) -> Dataset:
    """A folder written by save_to_disk (a Dataset or a DatasetDict), or one holding data files."""
    saved = any((path / marker).exists() for marker in (STATE_FILE, DATASET_DICT_FILE))
    if saved:
        loaded = datasets.load_from_disk(str(path))
    else:
        try:
            loaded = datasets.load_dataset(str(path))
        except datasets.exceptions.DataFilesNotFoundError as exc:
            raise SpecError([(NAME_PATH, f"no data files ({', '.join(FILE_FORMATS)}) in {path}")]) from exc
    if isinstance(loaded, Dataset):
        return loaded
    if split not in loaded:
        raise SpecError([(SPLIT_PATH, f"no split {split!r} in {path}; available splits: {', '.join(loaded)}")])
    return loaded[split]
