"""bench/efficacy's pieces that can be checked cheaply: its compact problems, and the README's Results table."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path

from g2rpo.api.spec import ArithmeticDatasetSpec
from g2rpo.data.arithmetic import generate_compact, value_limit
from g2rpo.eval.problems import arithmetic_chain
from g2rpo.rewards import accuracy_reward

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("grpo", "fixed", "g2rpo-a", "g2rpo-a-smoothed")


def test_compact_problems_are_seeded_balanced_and_their_solutions_compute_the_answer():
    params = ArithmeticDatasetSpec(num_problems=90, min_steps=1, max_steps=4, max_operand=9, seed=3)
    rows = generate_compact(params)
    assert rows == generate_compact(params)
    assert rows != generate_compact(params.model_copy(update={"seed": 4}))
    assert sorted(Counter(r["steps"] for r in rows).values()) == [22, 22, 23, 23]
    for row in rows:
        start = int(re.match(r"Start at (\d+)\. Apply ", row["problem"]).group(1))
        moves = re.findall(r"([-+*/])(\d+)", row["problem"].split("Apply ", 1)[1])
        chain = arithmetic_chain(row)  # g2rpo eval reads the chain from the solution: same format
        assert [(op, int(b)) for _, op, b in chain] == [(op, int(b)) for op, b in moves]
        value = start
        for (a, op, b), line in zip(chain, row["solution"].splitlines()[1:], strict=False):
            assert a == value
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert op != "/" or a % b == 0
            assert 1 <= value <= value_limit(9)
            assert line == f"{a}{op}{b}={value}"
        assert row["answer"] == str(value)
    # The training reward scores the reference solution right, and a wrong answer wrong.
    completions = [[{"role": "assistant", "content": r["solution"]}] for r in rows[:5]]
    assert accuracy_reward(completions=completions, answer=[r["answer"] for r in rows[:5]]) == [1.0] * 5
    assert accuracy_reward(completions=completions, answer=[str(int(r["answer"]) + 1) for r in rows[:5]]) == [0.0] * 5


def test_readme_results_table_holds_the_numbers_of_the_committed_json():
    """Every arm's row in README's Results: mean ± std over seeds, recomputed from the per-seed values."""
    results = json.loads((ROOT / "bench" / "results" / "efficacy-issue9.json").read_text())
    tiers = list(results["arms"]["grpo"]["accuracy"])
    assert tiers == sorted(tiers, key=int), "tiers in increasing difficulty"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### bench/efficacy: G2RPO-A against GRPO on a tiny model (issue 9)", 1)[1]
    section = section.split("\n## ", 1)[0].split("\n### ", 1)[0]  # issue 18's table names the same arms
    rows = {
        cells[0]: cells[1:]
        for cells in (
            [c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines()
            if line.startswith("| ")
        )
    }
    for arm in ARMS:
        data = results["arms"][arm]
        assert len(data["seeds"]) >= 3
        expected = [
            f"{statistics.fmean(data['accuracy'][t]):.3f} ± {statistics.stdev(data['accuracy'][t]):.3f}" for t in tiers
        ]
        assert rows[arm][: len(tiers)] == expected, arm
