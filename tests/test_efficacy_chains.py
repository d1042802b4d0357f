"""bench/efficacy/chains.py (issue 18's testbed): the task, the disjoint sets, the strata rule, the statistics
and the results format, checked cheaply (no training here: the stages are bench runs, PROTOCOL.md)."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest

from bench.efficacy.chains import (
    ARMS,
    HIGH,
    LOW,
    MAX_OPERAND,
    Chains,
    ProblemSets,
    chain_row,
    compare,
    gate,
    guidance_of,
    holm,
    job_document,
    one_step_facts,
    paired_sign_flip_p,
    pass_at_k,
    random_chain,
    results_document,
    results_table,
    reward_rises,
    stratify,
    warm_start_rows,
    wins,
)
from bench.efficacy.chains import main as chains_main
from g2rpo.api.spec import G2RPOJob
from g2rpo.rewards import accuracy_reward

ROOT = Path(__file__).resolve().parents[1]


def test_every_one_step_fact_is_a_warm_start_problem_and_values_stay_bounded():
    facts = one_step_facts()
    assert len(facts) == len(set(facts)) == 774
    assert all(LOW <= v <= HIGH and LOW <= r <= HIGH and 1 <= a <= MAX_OPERAND for v, _, a, r in facts)
    warm = warm_start_rows(Chains(warm_two_step=10, warm_longer=((3, 4), (4, 2))))
    one_step = {row["problem"] for row in warm if row["steps"] == 1}
    assert one_step == {f"Start at {v}. Apply {op}{a}." for v, op, a, _ in facts}
    assert [sum(row["steps"] == t for row in warm) for t in (2, 3, 4, 5)] == [10, 4, 2, 0]
    assert len({row["problem"] for row in warm}) == len(warm)


def test_chains_compute_their_answer_and_the_reward_scores_the_reference():
    rng = random.Random(0)
    rows = [random_chain(rng, steps) for steps in (2, 5, 8) for _ in range(20)]
    for row in rows:
        lines = row["solution"].split("\n")[1:-2]
        assert len(lines) == row["steps"]
        for line in lines:
            a, op, b, result = re.fullmatch(r"(\d+)([-+])(\d+)=(\d+)", line).groups()
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert LOW <= int(result) <= HIGH
        assert row["answer"] == result
    completions = [[{"role": "assistant", "content": r["solution"]}] for r in rows]
    assert accuracy_reward(completions=completions, answer=[r["answer"] for r in rows]) == [1.0] * len(rows)
    assert accuracy_reward(completions=completions, answer=[str(int(r["answer"]) + 1) for r in rows]) == [0.0] * len(
        rows
    )
    with pytest.raises(ValueError, match=r"49\+1=50 leaves \[2, 49\]"):
        chain_row(49, [("+", 1)])


def test_sets_are_disjoint_sized_seeded_and_the_stream_never_repeats():
    bed = Chains(warm_two_step=200, strata_problems_per_tier=8)
    sets = ProblemSets.build(bed)
    strata = {"L": [3, 4], "H": [7, 8]}
    with pytest.raises(RuntimeError, match="before a stream"):
        sets.stream(0, [3], 1)
    validation, test = sets.splits(strata, bed)
    assert all(len(rows) == bed.validation_problems_per_stratum for rows in validation.values())
    assert bed.test_problems_per_stratum >= 200 and bed.samples == 8
    assert all(len(rows) == 200 for rows in test.values())
    assert {r["steps"] for r in test["L"]} == {3, 4} and {r["steps"] for r in test["H"]} == {7, 8}
    groups = {
        "warm": sets.warm,
        "strata": sets.strata,
        "validation": validation["L"] + validation["H"],
        "test": test["L"] + test["H"],
    }
    stream = sets.stream(0, [3, 4, 7, 8], 480)
    groups["stream"] = stream
    keys = {name: [r["problem"] for r in rows] for name, rows in groups.items()}
    assert all(len(k) == len(set(k)) for k in keys.values()), "no problem twice within a set (nor in the stream)"
    for a, b in [(a, b) for a in keys for b in keys if a < b]:
        assert not set(keys[a]) & set(keys[b]), f"{a} and {b} share problems"
    assert sets.stream(0, [3, 4, 7, 8], 480) == stream, "a seed fixes its stream"
    assert sets.stream(1, [3, 4, 7, 8], 480) != stream
    assert ProblemSets.build(bed).splits(strata, bed) == (validation, test), "the sets are fixed"


def test_strata_follow_the_pre_registered_rule():
    pass8 = {2: 0.95, 3: 0.8, 4: 0.55, 5: 0.3, 6: 0.12, 7: 0.1, 8: 0.0}
    assert stratify(pass8) == {"L": [3, 4, 5], "H": [7, 8]}


def test_pass_at_k_and_the_paired_sign_flip_test():
    assert pass_at_k([1, 0, 0, 0, 0, 0, 0, 0], 1) == pytest.approx(1 / 8)
    assert pass_at_k([1, 0, 0, 0, 0, 0, 0, 0], 8) == 1.0
    assert pass_at_k([0] * 8, 8) == 0.0
    assert pass_at_k([1, 1, 0, 0], 2) == pytest.approx(1 - 1 / 6)
    assert paired_sign_flip_p([0.05] * 6) == pytest.approx(1 / 64)
    assert paired_sign_flip_p([0.05, -0.05, 0.05, -0.05, 0.05, -0.05]) > 0.5
    assert paired_sign_flip_p([0.04, 0.05, 0.03, 0.06, 0.02, -0.01]) == pytest.approx(2 / 64)


def test_gate_and_win_conditions():
    warm = [0.30] * 6
    assert gate([0.36, 0.35, 0.34, 0.37, 0.33, 0.35], warm, [True] * 6)["passed"]
    assert not gate([0.31, 0.32, 0.31, 0.33, 0.32, 0.31], warm, [True] * 6)["passed"], "under +0.03"
    assert not gate([0.36] * 6, warm, [False] * 6)["passed"], "the training reward must rise"
    grpo = {"pass1": {"L": [0.5] * 6, "H": [0.05] * 6}}
    better = {"pass1": {"L": [0.49] * 6, "H": [0.09, 0.08, 0.1, 0.09, 0.07, 0.09]}}
    assert wins(better, grpo)
    assert not wins({"pass1": {"L": [0.47] * 6, "H": better["pass1"]["H"]}}, grpo), "L more than 0.02 worse"
    assert compare([0.1, 0.2], [0.0, 0.1])["differences"] == pytest.approx([0.1, 0.1])
    assert reward_rises([0.1] * 10 + [0.2] * 10) and not reward_rises([0.2] * 10 + [0.1] * 10)
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


def test_every_arm_is_a_valid_job_differing_only_in_guidance(tmp_path):
    bed = Chains()
    jobs = {arm: G2RPOJob.model_validate(job_document(bed, arm, 3, tmp_path, tmp_path / "s3.jsonl")) for arm in ARMS}
    trainings = {arm: job.spec.training.model_dump() for arm, job in jobs.items()}
    assert all(t == trainings["grpo"] for t in trainings.values())
    assert trainings["grpo"]["seed"] == 3 and trainings["grpo"]["lr_scheduler_type"] == "cosine"
    g = {arm: job.spec.guidance for arm, job in jobs.items()}
    assert g["grpo"].ratio == 0
    assert {g[a].ratio for a in ARMS if a != "grpo"} == {bed.ratio}
    assert (g["fixed"].schedule, g["g2rpo-a"].schedule) == ("fixed", "adaptive")
    assert (g["g2rpo-a-unsolved"].schedule, g["g2rpo-a-unsolved"].groups) == ("adaptive", "unsolved")
    assert (g["anneal"].schedule, g["anneal"].min_length, g["anneal"].total_steps) == ("cosine", 0, bed.rl_steps)
    assert g["g2rpo-a-mask"].loss == "mask" and g["g2rpo-a"].loss == "include"
    with pytest.raises(ValueError, match="unknown arm"):
        guidance_of(bed, "g2rpo-b")


def test_results_document_has_the_issue_format_with_per_seed_values_in_seed_order():
    bed = Chains()

    def run(arm, seed, l1, h1):
        curves = {"accuracy": [0.1, 0.3], "zero_std_groups": [0.5, 0.4], "guided_groups": [None, None]}
        scores = {"L": {"pass1": l1, "pass8": l1 + 0.2}, "H": {"pass1": h1, "pass8": h1 + 0.1}}
        return {"arm": arm, "seed": seed, "scores": scores, "curves": curves}

    runs = [run("grpo", s, 0.4 + s / 100, 0.02) for s in (1, 0)] + [run("fixed", s, 0.4, 0.05) for s in (0, 1)]
    warm = [{"seed": s, "scores": {"L": {"pass1": 0.3}, "H": {"pass1": 0.01}}} for s in (0, 1)]
    strata = {"L": {"tiers": [3, 4], "warm_pass8": 0.5}, "H": {"tiers": [7, 8], "warm_pass8": 0.05}}
    doc = results_document(bed, strata, warm, runs, "abc", {})
    assert doc["protocol"] == "bench/efficacy/PROTOCOL.md" and doc["protocol_commit"] == "abc"
    assert doc["strata"] == strata
    assert doc["warm_start"] == {"L": [0.3, 0.3], "H": [0.01, 0.01]}
    assert doc["arms"]["grpo"]["seeds"] == [0, 1] and doc["arms"]["grpo"]["pass1"]["L"] == pytest.approx([0.4, 0.41])
    assert doc["arms"]["fixed"]["pass8"]["H"] == pytest.approx([0.15, 0.15])
    assert doc["gate"]["grpo_minus_warm_L"] == pytest.approx([0.1, 0.11])
    assert doc["comparisons"]["fixed"]["H_pass1_vs_grpo"]["differences"] == pytest.approx([0.03, 0.03])
    assert (
        doc["comparisons"]["fixed"]["H_pass1_vs_grpo"]["p_holm"] == doc["comparisons"]["fixed"]["H_pass1_vs_grpo"]["p"]
    )


def test_results_table_reports_every_arm_with_its_paired_difference_and_the_gate():
    bed = Chains()

    def run(arm, seed, l1, h1, guided):
        curves = {"accuracy": [0.1, 0.3], "zero_std_groups": [0.5, 0.3], "guided_groups": [guided, guided]}
        scores = {"L": {"pass1": l1, "pass8": 0.9}, "H": {"pass1": h1, "pass8": 0.2}}
        return {"arm": arm, "seed": seed, "scores": scores, "curves": curves}

    runs = [run("grpo", s, 0.5, 0.02, None) for s in range(6)]
    runs += [run("fixed", s, 0.49, 0.02 + 0.04 + s / 1000, 1.0) for s in range(6)]
    runs += [run("anneal", s, 0.4, 0.03, 0.5) for s in range(6)]
    warm = [{"seed": s, "scores": {"L": {"pass1": 0.4}, "H": {"pass1": 0.01}}} for s in range(6)]
    strata = {"L": {"tiers": [4], "warm_pass8": 0.7}, "H": {"tiers": [7], "warm_pass8": 0.06}}
    table = results_table(results_document(bed, strata, warm, runs, "abc", {}))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert table.startswith("Sanity gate: **passed** — GRPO minus warm start on L, pass@1 +0.100 (p = 0.016)")
    assert "rises in 6 of 6 seeds" in table
    assert rows["warm start"] == "| warm start | 0.010 |  |  |  | 0.400 |" + "  |" * 7
    assert rows["grpo"] == "| grpo | 0.020 |  |  |  | 0.500 |  |  | 0.200 | 0.900 | 0.40 |  |  |"
    # fixed: +0.0425 on H in every seed (p = 1/64), 0.01 worse on L: a win; anneal loses 0.1 on L
    assert rows["fixed"].split(" | ")[1:5] == ["0.062", "+0.043", "0.016", "0.031"]
    assert rows["fixed"].endswith("| 0.40 | 1.00 | **yes** |")
    assert rows["anneal"].split(" | ")[5:8] == ["0.400", "-0.100", "1.000"]
    assert rows["anneal"].endswith("| 0.50 | no |")


def test_the_stages_run_end_to_end_at_toy_sizes_and_a_repeated_stage_reuses_its_trained_runs(tmp_path):
    """strata -> main -> report with --quick (real warm start, real `run_local`, real evaluation; sizes
    that measure nothing). The second main run finds every run folder trained and only evaluates."""
    common = ["--quick", "--run-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "results"), "--workers", "1"]
    assert chains_main(["strata", *common]) == 0
    strata = json.loads((tmp_path / "results" / "efficacy-strata-quick.json").read_text())
    # the strata of a 20-step warm start are whatever they are; the stages need both non-empty
    strata["L"]["tiers"], strata["H"]["tiers"] = [3], [5]
    (tmp_path / "results" / "efficacy-strata-quick.json").write_text(json.dumps(strata))
    arms = ["--arms", "grpo,g2rpo-a-unsolved", "--seeds", "1", "--learning-rate", "1e-4"]
    assert chains_main(["main", *common, *arms]) == 0
    first = json.loads((tmp_path / "results" / "efficacy-quick.json").read_text())
    assert set(first["arms"]) == {"grpo", "g2rpo-a-unsolved"} and first["arms"]["grpo"]["seeds"] == [0]
    trained = sorted((tmp_path / "runs" / "runs").glob("*/trained.json"))
    assert len(trained) == 2
    stamps = [p.stat().st_mtime_ns for p in trained]
    assert chains_main(["main", *common, *arms]) == 0
    assert [p.stat().st_mtime_ns for p in trained] == stamps
    second = json.loads((tmp_path / "results" / "efficacy-quick.json").read_text())
    assert second["arms"]["grpo"]["pass1"] == first["arms"]["grpo"]["pass1"]  # same model, same sampling seed
    assert (tmp_path / "results" / "efficacy-quick.png").is_file()


def test_readme_reports_the_committed_main_run_as_rendered_from_its_json():
    """README's issue 18 table is `results_table(bench/results/efficacy.json)` exactly, and the JSON names the
    commit that added PROTOCOL.md, which is in this history before the results (the pre-registration)."""
    document = json.loads((ROOT / "bench" / "results" / "efficacy.json").read_text())
    readme = (ROOT / "README.md").read_text()
    begin, end = (
        "<!-- efficacy-chains:begin (python -m bench.efficacy.chains report) -->\n",
        "<!-- efficacy-chains:end -->",
    )
    assert readme.count(begin) == 1 and readme.count(end) == 1
    assert readme.split(begin)[1].split(end)[0] == results_table(document)
    assert document["protocol"] == "bench/efficacy/PROTOCOL.md"
    assert set(document["arms"]) >= {"grpo", "fixed", "g2rpo-a", "g2rpo-a-unsolved", "anneal"}
    assert all(len(arm["seeds"]) >= 6 for arm in document["arms"].values())
    if _git("rev-parse", "--is-shallow-repository") == "false":
        added = _git("log", "--diff-filter=A", "--format=%H", "--", "bench/efficacy/PROTOCOL.md").split()
        assert document["protocol_commit"] == added[-1]
        # the newest addition: issue 9 once had its results under this name (now efficacy-issue9.json)
        results_added = _git("log", "--diff-filter=A", "--format=%H", "--", "bench/results/efficacy.json").split()
        ancestor = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", added[-1], results_added[0]])
        assert ancestor.returncode == 0, "PROTOCOL.md must be committed before the results"


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()
