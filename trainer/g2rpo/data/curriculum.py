"""Curriculum: training rows ordered from easy to hard by a difficulty key (paper Table 6).

Why: the adaptive guidance schedule reacts to changes of the accuracy reward. If batches of mixed
difficulty come in random order, the reward moves with the batch, not with what the model learnt;
ordering by tier makes a change of reward mean a change of skill.

With `order`, a row's place is the rank of its key (compared as a string) in that list; keys not
listed, and rows without a key (None or ""), go first, last, or are an error (`unknown`). Without
`order`, keys sort ascending: numerically when every key is a number (or a numeric string, as CSV
and JSON sources often have), else as strings; rows without a key follow `unknown` too. The sort
is stable, so rows of one tier keep their source order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from g2rpo.api.spec import CurriculumSpec, SpecError

ORDER_PATH = ("spec", "curriculum", "order")
COLUMN_PATH = ("spec", "curriculum", "column")
UNKNOWN_PATH = ("spec", "curriculum", "unknown")


def order_rows(rows: Sequence[Mapping[str, Any]], spec: CurriculumSpec) -> list:
    """The rows, stably sorted by `spec.column` (see the module docstring for the rules)."""
    available = sorted({name for row in rows for name in row})
    if any(spec.column not in row for row in rows):
        raise missing_column_error(spec.column, available)
    return [rows[i] for i in sorted_indices([row[spec.column] for row in rows], spec)]


def sorted_indices(keys: Sequence[Any], spec: CurriculumSpec, row_numbers: Sequence[int] | None = None) -> list[int]:
    """Positions of `keys` in curriculum order (what `order_rows` applies; `Dataset.select` takes it too).

    `row_numbers` (the source's 1-based row of each key) name the rows in errors.
    """
    # Sort keys of one type, so that they compare: tier ranks, numbers, or strings.
    known: dict[int, int] | dict[int, float] | dict[int, str]
    if spec.order is not None:
        rank = {tier: position for position, tier in enumerate(spec.order)}
        known = {i: rank[str(key)] for i, key in enumerate(keys) if str(key) in rank}
    else:
        present = {i: key for i, key in enumerate(keys) if key is not None and key != ""}
        numeric = all(_is_number(key) for key in present.values())
        known = (
            {i: float(key) for i, key in present.items()} if numeric else {i: str(key) for i, key in present.items()}
        )
    unknown = [i for i in range(len(keys)) if i not in known]
    if unknown and spec.unknown == "error":
        numbers = [row_numbers[i] if row_numbers else i + 1 for i in unknown]
        raise _unknown_keys_error([keys[i] for i in unknown], spec, numbers)
    ordered_known = sorted(known, key=known.__getitem__)
    return unknown + ordered_known if spec.unknown == "first" else ordered_known + unknown


def missing_column_error(column: str, available: Sequence[str]) -> SpecError:
    return SpecError([(COLUMN_PATH, f"no column {column!r} in the dataset; available columns: {', '.join(available)}")])


def _is_number(key: Any) -> bool:
    if isinstance(key, bool):
        return False
    if isinstance(key, int | float):
        return True
    try:
        float(key)
    except (TypeError, ValueError):
        return False
    return True


def _unknown_keys_error(unknown_keys: list[Any], spec: CurriculumSpec, row_numbers: list[int]) -> SpecError:
    examples = ", ".join(f"row {n}: {key!r}" for n, key in list(zip(row_numbers, unknown_keys, strict=False))[:5])
    if spec.order is not None:
        reason = (
            f"{len(unknown_keys)} rows have a {spec.column!r} value not listed in {spec.order} ({examples}); "
            "add them to curriculum.order or set curriculum.unknown to 'first' or 'last'"
        )
        return SpecError([(ORDER_PATH, reason)])
    rows = ", ".join(str(n) for n in row_numbers[:5])
    reason = (
        f"{len(unknown_keys)} rows have no {spec.column!r} value (rows {rows}); "
        "set curriculum.unknown to 'first' or 'last'"
    )
    return SpecError([(UNKNOWN_PATH, reason)])
