"""The redesigned efficacy testbed (issue 18): can guidance teach chaining that GRPO alone cannot?

The protocol (strata, endpoints, arms, n, win condition, analysis) is bench/efficacy/PROTOCOL.md;
this module is its code. Stages, each a command (seeded end to end, CPU):

    python -m bench.efficacy.chains strata              # warm start + its pass@8 per tier -> strata
    python -m bench.efficacy.chains lr-grid             # GRPO only, validation split: pick the LR
    python -m bench.efficacy.chains pilot               # 3 GRPO seeds: the spread that fixes n
    python -m bench.efficacy.chains main --seeds N      # every arm x N paired seeds -> efficacy.json
    python -m bench.efficacy.chains report              # efficacy.json -> the README's results table

The task: bounded-value chains, "Start at 17. Apply +8, -3, +9." (values stay in [2, 49], operands
1..9, + and -). Every one-step fact (v, op, a) of that range is a one-step problem in the warm start,
so each step is within the model's reach and only chaining is hard. Tiers are chain lengths.
Why not the old testbed's tiers: they needed facts (values 10-100) the warm start never saw.

The RL data is a fresh stream: each seed draws steps x prompts_per_step problems no run sees twice,
disjoint from the warm start, the strata set, the validation split and the test sets.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
PROTOCOL = "bench/efficacy/PROTOCOL.md"
LOW, HIGH, MAX_OPERAND = 2, 49, 9
ARMS = ("grpo", "fixed", "g2rpo-a", "g2rpo-a-unsolved", "anneal", "g2rpo-a-mask")
MAIN_ARMS = ARMS[:5]  # g2rpo-a-mask only if the budget allows (PROTOCOL.md)
L_PASS8 = (0.3, 0.8)  # stratum L: the warm start's pass@8 in this range
H_PASS8 = 0.1  # stratum H: pass@8 at most this


@dataclass(frozen=True)
class Chains:
    """Every knob; written into each results file so that a number can be traced to its setup."""

    tiers: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    # warm start: every one-step fact, two-step chains for the chaining format, and a few longer ones
    # (protocol v2: with two-step chains alone, tier 3 fell to pass@8 0.11 and L was empty)
    warm_two_step: int = 1500
    warm_longer: tuple[tuple[int, int], ...] = ((3, 200), (4, 50))
    warm_steps: int = 1500
    warm_batch_size: int = 32
    warm_learning_rate: float = 3e-3
    hidden_size: int = 128
    layers: int = 3
    # strata measurement (warm start only), validation split, test sets
    strata_problems_per_tier: int = 64
    validation_problems_per_stratum: int = 100
    test_problems_per_stratum: int = 200
    samples: int = 8
    temperature: float = 1.0
    max_completion_length: int = 96
    # RL, every arm alike (learning_rate from the lr-grid stage, then frozen)
    rl_steps: int = 80
    prompts_per_step: int = 8
    num_generations: int = 8
    learning_rate: float = 3e-5
    warmup_ratio: float = 0.1
    rl_temperature: float = 1.0
    # guidance, fixed in advance for the guided arms (never tuned per arm)
    ratio: float = 0.25
    initial_length: int = 24
    min_length: int = 2
    max_length: int = 96


# --- the task -------------------------------------------------------------------------------------


def one_step_facts() -> list[tuple[int, str, int, int]]:
    """Every (value, op, operand, result) with value and result in [LOW, HIGH], operand 1..MAX_OPERAND."""
    facts = []
    for value in range(LOW, HIGH + 1):
        for operand in range(1, MAX_OPERAND + 1):
            if value + operand <= HIGH:
                facts.append((value, "+", operand, value + operand))
            if value - operand >= LOW:
                facts.append((value, "-", operand, value - operand))
    return facts


def chain_row(start: int, moves: Sequence[tuple[str, int]]) -> dict:
    """A problem in the compact format of g2rpo.data.arithmetic.generate_compact (the same rewards score it)."""
    value, lines = start, []
    for op, operand in moves:
        result = value + operand if op == "+" else value - operand
        if not LOW <= result <= HIGH:
            raise ValueError(f"{value}{op}{operand}={result} leaves [{LOW}, {HIGH}]")
        lines.append(f"{value}{op}{operand}={result}")
        value = result
    problem = f"Start at {start}. Apply {', '.join(f'{op}{a}' for op, a in moves)}."
    solution = "<think>\n" + "\n".join(lines) + f"\n</think>\n\\boxed{{{value}}}"
    return {"problem": problem, "answer": str(value), "solution": solution, "steps": len(moves)}


def random_chain(rng: random.Random, steps: int) -> dict:
    start = value = rng.randint(LOW, HIGH)
    moves = []
    for _ in range(steps):
        options = [(op, a) for op, a, _ in _moves_from(value)]
        op, operand = rng.choice(options)
        moves.append((op, operand))
        value = value + operand if op == "+" else value - operand
    return chain_row(start, moves)


def _moves_from(value: int) -> list[tuple[str, int, int]]:
    return [(op, a, r) for v, op, a, r in _FACTS_BY_VALUE.get(value, [])]


_FACTS_BY_VALUE: dict[int, list[tuple[int, str, int, int]]] = {}
for _fact in one_step_facts():
    _FACTS_BY_VALUE.setdefault(_fact[0], []).append(_fact)


def warm_start_rows(bed: Chains, seed: int = 1000) -> list[dict]:
    """Every one-step fact as a one-step problem, then `warm_two_step` distinct two-step chains and
    `warm_longer` (tier, count) longer ones, all distinct."""
    rows = [chain_row(v, [(op, a)]) for v, op, a, _ in one_step_facts()]
    seen: set[str] = set()
    rows += draw(random.Random(seed), [2], bed.warm_two_step, exclude=seen)
    for tier, count in bed.warm_longer:
        rows += draw(random.Random(seed + tier), [tier], count, exclude=seen)
    return rows


def draw(rng: random.Random, tiers: Sequence[int], n: int, exclude: set[str]) -> list[dict]:
    """`n` distinct problems, tiers in turn, none of whose text is in `exclude` (which grows by them)."""
    rows: list[dict] = []
    for i in itertools.count():
        if len(rows) == n:
            return rows
        if i > 200 * n + 1000:
            raise RuntimeError(f"cannot draw {n} fresh problems of tiers {list(tiers)}: the space is exhausted")
        row = random_chain(rng, tiers[len(rows) % len(tiers)])
        if row["problem"] not in exclude:
            exclude.add(row["problem"])
            rows.append(row)
    raise AssertionError("unreachable")


@dataclass
class ProblemSets:
    """The fixed, disjoint problem sets; the RL streams are drawn per seed against `used`."""

    warm: list[dict]
    strata: list[dict]
    used: set[str]
    splits_drawn: tuple[dict[str, list[dict]], dict[str, list[dict]]] | None = None

    @classmethod
    def build(cls, bed: Chains) -> ProblemSets:
        warm = warm_start_rows(bed)
        used = {row["problem"] for row in warm}
        per_tier = [draw(random.Random(2000 + t), [t], bed.strata_problems_per_tier, used) for t in bed.tiers]
        return cls(warm=warm, strata=[row for rows in per_tier for row in rows], used=used)

    def splits(self, strata: dict[str, list[int]], bed: Chains) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
        """The validation split and the test sets per stratum (tiers in turn), always drawn in this order, so
        that both are the same in every stage and disjoint from each other and from every set before."""
        if self.splits_drawn is None:
            drawn = []
            for seed, size in ((3000, bed.validation_problems_per_stratum), (4000, bed.test_problems_per_stratum)):
                drawn.append(
                    {
                        s: draw(random.Random(seed + i), tiers, size, self.used)
                        for i, (s, tiers) in enumerate(strata.items())
                    }
                )
            self.splits_drawn = (drawn[0], drawn[1])
        return self.splits_drawn

    def stream(self, seed: int, tiers: Sequence[int], n: int) -> list[dict]:
        """The RL problems of one seed: fresh, and disjoint from every fixed set (not from other seeds)."""
        if self.splits_drawn is None:
            raise RuntimeError("draw the validation and test sets (splits) before a stream, which must avoid them")
        return draw(random.Random(10_000 + seed), tiers, n, set(self.used))


# --- strata and statistics ---------------------------------------------------------------------------


def stratify(pass8_by_tier: dict[int, float]) -> dict[str, list[int]]:
    """L: tiers whose warm-start pass@8 lies in L_PASS8; H: tiers at most H_PASS8 (PROTOCOL.md)."""
    low, high = L_PASS8
    return {
        "L": [t for t, p in sorted(pass8_by_tier.items()) if low <= p <= high],
        "H": [t for t, p in sorted(pass8_by_tier.items()) if p <= H_PASS8],
    }


def pass_at_k(correct: Sequence[float], k: int) -> float:
    """Unbiased pass@k from n >= k samples with c successes: 1 - C(n-c, k) / C(n, k)."""
    n, c = len(correct), sum(1 for x in correct if x > 0)
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def paired_sign_flip_p(differences: Sequence[float]) -> float:
    """One-sided p of mean(differences) > 0: the exact paired sign-flip (permutation) test over seeds.

    Under the null each seed's difference is as likely negated; p is the share of the 2^n sign
    assignments whose mean is at least the observed one (ties count). n = 6 gives p >= 1/64.
    """
    observed = statistics.fmean(differences)
    flips = list(itertools.product((1, -1), repeat=len(differences)))
    at_least = sum(
        1
        for signs in flips
        if statistics.fmean(s * d for s, d in zip(signs, differences, strict=True)) >= observed - 1e-12
    )
    return at_least / len(flips)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1) of a family of tests."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    adjusted, running = {}, 0.0
    for rank, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p))
        adjusted[name] = running
    return adjusted


def gate(grpo_l: Sequence[float], warm_l: Sequence[float], reward_rises: Sequence[bool]) -> dict:
    """The sanity gate: GRPO beats the warm start on L by >= 0.03 pass@1 (paired, one-sided p < 0.05)
    and its training reward rises (in most seeds)."""
    differences = [g - w for g, w in zip(grpo_l, warm_l, strict=True)]
    p = paired_sign_flip_p(differences)
    rises = sum(reward_rises) > len(reward_rises) / 2
    passed = statistics.fmean(differences) >= 0.03 and p < 0.05 and rises
    return {"passed": passed, "grpo_minus_warm_L": differences, "p": p, "reward_rises": list(reward_rises)}


def compare(arm: Sequence[float], grpo: Sequence[float]) -> dict:
    differences = [a - g for a, g in zip(arm, grpo, strict=True)]
    return {"differences": differences, "mean": statistics.fmean(differences), "p": paired_sign_flip_p(differences)}


def wins(arm: dict, grpo: dict) -> bool:
    """The pre-registered win: H pass@1 gain >= 0.03 with p < 0.05, and L no more than 0.02 worse."""
    h = compare(arm["pass1"]["H"], grpo["pass1"]["H"])
    l_loss = statistics.fmean(arm["pass1"]["L"]) - statistics.fmean(grpo["pass1"]["L"])
    return h["mean"] >= 0.03 and h["p"] < 0.05 and l_loss >= -0.02


def reward_rises(curve: Sequence[float | None], window: int = 10) -> bool:
    """Mean training accuracy of the last `window` steps above that of the first `window`."""
    values = [v for v in curve if v is not None]
    if len(values) < 2 * window:
        window = max(1, len(values) // 2)
    return bool(values) and statistics.fmean(values[-window:]) > statistics.fmean(values[:window])


# --- jobs ----------------------------------------------------------------------------------------


def guidance_of(bed: Chains, arm: str) -> dict:
    """Each arm's `guidance` section; the guided arms share ratio and lengths, fixed in advance."""
    if arm == "grpo":
        return {"ratio": 0.0, "schedule": "fixed", "initialLength": 0, "minLength": 0, "maxLength": 0}
    base = {
        "ratio": bed.ratio,
        "initialLength": bed.initial_length,
        "minLength": bed.min_length,
        "maxLength": bed.max_length,
        "window": 2,
        "loss": "include",
        "groups": "all",
    }
    if arm == "fixed":
        return {**base, "schedule": "fixed"}
    if arm == "g2rpo-a":
        return {**base, "schedule": "adaptive"}
    if arm == "g2rpo-a-unsolved":
        return {**base, "schedule": "adaptive", "groups": "unsolved"}
    if arm == "g2rpo-a-mask":
        return {**base, "schedule": "adaptive", "loss": "mask"}
    if arm == "anneal":
        return {**base, "schedule": "cosine", "minLength": 0, "totalSteps": bed.rl_steps}
    raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")


def job_document(bed: Chains, arm: str, seed: int, model_dir: Path, data_file: Path) -> dict:
    """The G2RPOJob of one arm and seed: the same file `g2rpo run` takes."""
    return {
        "apiVersion": "g2rpo.dev/v1alpha1",
        "kind": "G2RPOJob",
        "metadata": {"name": f"chains-{arm}-s{seed}"},
        "spec": {
            "model": {"name": str(model_dir), "dtype": "float32"},
            "dataset": {
                "name": str(data_file),
                "promptColumn": "problem",
                "answerColumn": "answer",
                "guidanceColumn": "solution",
                "difficultyColumn": "steps",
            },
            "rewards": [{"name": "accuracy", "weight": 1.0}],
            "guidance": guidance_of(bed, arm),
            "training": {
                "numGenerations": bed.num_generations,
                "perDeviceBatchSize": bed.prompts_per_step * bed.num_generations,
                "maxSteps": bed.rl_steps,
                "learningRate": bed.learning_rate,
                "warmupRatio": bed.warmup_ratio,
                "lrSchedulerType": "cosine",
                "maxPromptLength": 128,
                "maxCompletionLength": bed.max_completion_length,
                "temperature": bed.rl_temperature,
                "beta": 0.0,
                "seed": seed,
            },
            "checkpoint": {"everySteps": 100000, "keep": 1, "resume": "never"},
        },
    }


# --- running ---------------------------------------------------------------------------------------


def evaluate_model(model_dir: str, rows: list[dict], bed: dict, seed: int) -> list:
    """Per problem (g2rpo.eval ProblemResult), `samples` unguided samples at temperature `temperature`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from g2rpo.eval import EvalProblem, evaluate

    problems = [
        EvalProblem(id=str(i), prompt=row["problem"], answer=row["answer"], tier=str(row["steps"]))
        for i, row in enumerate(rows)
    ]
    report = evaluate(
        AutoModelForCausalLM.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
        problems,
        task="math",
        samples=bed["samples"],
        temperature=bed["temperature"],
        top_p=1.0,
        top_k=0,
        max_new_tokens=bed["max_completion_length"],
        batch_size=64,
        seed=seed,
        progress=False,
    )
    return report.per_problem


def summarise(per_problem: list, samples: int) -> dict:
    return {
        "pass1": statistics.fmean(pass_at_k(p.correct, 1) for p in per_problem),
        f"pass{samples}": statistics.fmean(pass_at_k(p.correct, samples) for p in per_problem),
        "truncation": statistics.fmean(t for p in per_problem for t in p.truncated),
    }


def train_and_evaluate(arm: str, seed: int, job_file: str, run_dir: str, sets_file: str, bed: dict) -> dict:
    """One arm-seed: `run_local` on its stream, then unguided pass@1/pass@k per stratum on `sets_file`.

    A run folder holding `trained.json` is reused: its name carries a hash of the job file, so a main
    run that stops half-way resumes where it stopped, and a stage repeating an earlier stage's job
    (pilot seed 0 is lr-grid's chosen run) does not train it again.
    """
    _quiet_single_thread()
    import shutil

    from g2rpo.api.spec import load_job
    from g2rpo.local.plot import read_metrics
    from g2rpo.local.run import run_local

    run_path = Path(run_dir)
    trained = run_path / "trained.json"
    if not trained.is_file():
        shutil.rmtree(run_path, ignore_errors=True)  # a half-trained run starts over: resume is "never"
        started = time.monotonic()
        outcome = run_local(load_job(job_file), run_path, progress=False, heldout_problems=0)
        records = [r for r in read_metrics(outcome.layout.metrics_file) if "g2rpo/accuracy" in r]
        curves = {
            key: [r.get(f"g2rpo/{key}") for r in records]
            for key in ("accuracy", "accuracy_unguided", "zero_std_groups", "guidance_length", "guided_groups")
        }
        trained.write_text(json.dumps({"train_seconds": time.monotonic() - started, "curves": curves}))
    training = json.loads(trained.read_text())
    result = evaluate_sets(str(run_path / "final"), sets_file, bed, seed)
    return {"arm": arm, "seed": seed, **training, **result}


def evaluate_sets(model_dir: str, sets_file: str, bed: dict, seed: int) -> dict:
    _quiet_single_thread()
    sets = json.loads(Path(sets_file).read_text())
    started = time.monotonic()
    out = {name: summarise(evaluate_model(model_dir, rows, bed, seed), bed["samples"]) for name, rows in sets.items()}
    return {"scores": out, "eval_seconds": time.monotonic() - started}


def _quiet_single_thread() -> None:
    import logging

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("g2rpo").setLevel(logging.WARNING)


def results_document(
    bed: Chains, strata: dict, warm: list[dict], runs: list[dict], protocol_commit: str, extra: dict
) -> dict:
    """bench/results/efficacy.json in the format of issue 18: per-seed values in the order of `seeds`."""
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["arm"], r["seed"]): r for r in runs}
    warm_by_seed = {w["seed"]: w for w in warm}
    k = f"pass{bed.samples}"
    arms = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        if any((arm, s) not in by for s in seeds):
            continue
        arms[arm] = {
            "seeds": seeds,
            "pass1": {s: [by[arm, seed]["scores"][s]["pass1"] for seed in seeds] for s in ("L", "H")},
            "pass8": {s: [by[arm, seed]["scores"][s][k] for seed in seeds] for s in ("L", "H")},
            "truncation": {s: [by[arm, seed]["scores"][s].get("truncation") for seed in seeds] for s in ("L", "H")},
            "zero_std_groups": [_mean_of(by[arm, seed]["curves"]["zero_std_groups"]) for seed in seeds],
            "guided_groups": [_mean_of(by[arm, seed]["curves"]["guided_groups"]) for seed in seeds],
            "train_reward_rises": [reward_rises(by[arm, seed]["curves"]["accuracy"]) for seed in seeds],
            "curves": {seed: by[arm, seed]["curves"] for seed in seeds},
        }
    warm_l = [warm_by_seed[s]["scores"]["L"]["pass1"] for s in seeds]
    document = {
        "protocol": PROTOCOL,
        "protocol_commit": protocol_commit,
        "strata": strata,
        "warm_start": {s: [warm_by_seed[seed]["scores"][s]["pass1"] for seed in seeds] for s in ("L", "H")},
        "arms": arms,
        "config": asdict(bed),
        **extra,
    }
    if "grpo" in arms:
        document["gate"] = gate(arms["grpo"]["pass1"]["L"], warm_l, arms["grpo"]["train_reward_rises"])
        document["comparisons"] = {
            arm: {
                "H_pass1_vs_grpo": compare(data["pass1"]["H"], arms["grpo"]["pass1"]["H"]),
                "L_pass1_vs_grpo": compare(data["pass1"]["L"], arms["grpo"]["pass1"]["L"]),
                "wins": wins(data, arms["grpo"]),
            }
            for arm, data in arms.items()
            if arm != "grpo"
        }
        adjusted = holm({arm: c["H_pass1_vs_grpo"]["p"] for arm, c in document["comparisons"].items()})
        for arm, p in adjusted.items():
            document["comparisons"][arm]["H_pass1_vs_grpo"]["p_holm"] = p
    return document


def results_table(document: dict) -> str:
    """The README's results table, rendered from efficacy.json (a test checks the README against it).

    Means over the paired seeds; "arm - grpo" is the mean of the per-seed differences, p its exact
    one-sided sign-flip p-value, Holm-adjusted over the guided arms beside it.
    """
    arms, comparisons, warm = document["arms"], document.get("comparisons", {}), document["warm_start"]
    gate_result = document["gate"]
    n = len(next(iter(arms.values()))["seeds"])
    lines = [
        f"Sanity gate: **{'passed' if gate_result['passed'] else 'failed'}** — GRPO minus warm start on L, "
        f"pass@1 {_signed(statistics.fmean(gate_result['grpo_minus_warm_L']))} (p = {gate_result['p']:.3f}); "
        f"training accuracy rises in {sum(gate_result['reward_rises'])} of {n} seeds.",
        "",
        "| arm | H pass@1 | H: arm - grpo | p | p (Holm) | L pass@1 | L: arm - grpo | p | H pass@8 | L pass@8 "
        "| zero-variance groups | groups guided | win |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        _row(
            ["warm start", f"{statistics.fmean(warm['H']):.3f}", "", "", "", f"{statistics.fmean(warm['L']):.3f}"]
            + [""] * 7
        ),
    ]
    for arm, data in arms.items():
        cells = [arm, f"{statistics.fmean(data['pass1']['H']):.3f}"]
        if arm in comparisons:
            h, low = comparisons[arm]["H_pass1_vs_grpo"], comparisons[arm]["L_pass1_vs_grpo"]
            cells += [_signed(h["mean"]), f"{h['p']:.3f}", f"{h['p_holm']:.3f}"]
            cells += [f"{statistics.fmean(data['pass1']['L']):.3f}", _signed(low["mean"]), f"{low['p']:.3f}"]
        else:
            cells += ["", "", "", f"{statistics.fmean(data['pass1']['L']):.3f}", "", ""]
        guided = _mean_of(data["guided_groups"])
        cells += [
            f"{statistics.fmean(data['pass8']['H']):.3f}",
            f"{statistics.fmean(data['pass8']['L']):.3f}",
            f"{_mean_of(data['zero_std_groups']):.2f}",
            "" if guided is None else f"{guided:.2f}",
            ("**yes**" if comparisons[arm]["wins"] else "no") if arm in comparisons else "",
        ]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _mean_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("strata", "lr-grid", "pilot", "main", "report"))
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "chains", help="models, jobs, runs")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--seeds", type=int, default=6, help="main: paired seeds 0..N-1 (PROTOCOL.md: n >= 6)")
    parser.add_argument("--arms", default=",".join(MAIN_ARMS), help=f"main: comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--learning-rate", type=float, help="the RL learning rate (main, pilot: from lr-grid)")
    parser.add_argument("--grid", default="2e-5,5e-5,1e-4", help="lr-grid: learning rates to try")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: checks the pipeline, measures nothing")
    args = parser.parse_args(argv)
    if args.stage == "report":
        print(results_table(json.loads((args.output / _name("efficacy", args.quick)).read_text())), end="")
        return 0
    bed = Chains()
    if args.quick:
        bed = replace(
            bed, warm_two_step=50, warm_longer=((3, 4),), warm_steps=20, strata_problems_per_tier=4, validation_problems_per_stratum=4,
            test_problems_per_stratum=4, samples=2, rl_steps=2, prompts_per_step=2, num_generations=4,
        )  # fmt: skip
    if args.learning_rate:
        bed = replace(bed, learning_rate=args.learning_rate)
    elif args.stage in ("pilot", "main"):
        grid_file = args.output / _name("efficacy-lr-grid", args.quick)
        if not grid_file.is_file():
            raise SystemExit(f"{grid_file} is missing: run the lr-grid stage first, or pass --learning-rate")
        bed = replace(bed, learning_rate=json.loads(grid_file.read_text())["chosen_learning_rate"])
    args.run_dir.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _quiet_single_thread()
    sets = ProblemSets.build(bed)
    warm_dir = _warm_start(bed, sets, args.run_dir)
    if args.stage == "strata":
        return _strata(bed, sets, warm_dir, args, started)
    strata = json.loads((args.output / _name("efficacy-strata", args.quick)).read_text())
    tiers = {s: strata[s]["tiers"] for s in ("L", "H")}
    if not tiers["L"] or not tiers["H"]:
        raise SystemExit(f"the strata are empty ({tiers}): the testbed cannot answer its question (PROTOCOL.md)")
    stream_tiers = sorted(set(tiers["L"]) | set(tiers["H"]))
    if args.stage == "lr-grid":
        split, _ = sets.splits(tiers, bed)
        grid = [float(x) for x in args.grid.split(",")]
        runs = _run_arms(bed, sets, split, warm_dir, args, [("grpo", 0, lr) for lr in grid], stream_tiers)
        scores = {str(r["lr"]): r["scores"] for r in runs}
        best = max(grid, key=lambda lr: scores[str(lr)]["L"]["pass1"])
        document = {"grid": grid, "validation": scores, "chosen_learning_rate": best, "config": asdict(bed)}
        _write(args.output / _name("efficacy-lr-grid", args.quick), document, started)
        return 0
    validation, test = sets.splits(tiers, bed)
    if args.stage == "pilot":
        tasks = [("grpo", s, None) for s in range(3)]
        runs = sorted(_run_arms(bed, sets, validation, warm_dir, args, tasks, stream_tiers), key=lambda r: r["seed"])
        pass1 = {s: [r["scores"][s]["pass1"] for r in runs] for s in ("L", "H")}
        document = {
            "validation_pass1": pass1,
            "sd": {s: statistics.stdev(v) for s, v in pass1.items()},
            "train_reward_rises": [reward_rises(r["curves"]["accuracy"]) for r in runs],
            "config": asdict(bed),
        }
        _write(args.output / _name("efficacy-pilot", args.quick), document, started)
        return 0
    arms = [a for a in args.arms.split(",") if a]
    tasks = [(arm, seed, None) for seed in range(args.seeds) for arm in arms]
    runs = _run_arms(bed, sets, test, warm_dir, args, tasks, stream_tiers, warm_seeds=range(args.seeds))
    warm = [r for r in runs if r["arm"] == "warm-start"]
    document = results_document(
        bed,
        {key: strata[key] for key in ("L", "H", "per_tier")},
        warm,
        [r for r in runs if r["arm"] != "warm-start"],
        _protocol_commit(),
        {"machine": _machine()},
    )
    _write(args.output / _name("efficacy", args.quick), document, started)
    plot(document, (args.output / _name("efficacy", args.quick)).with_suffix(".png"))
    return 0


def plot(document: dict, path: Path) -> None:
    """Per stratum, unguided held-out pass@1 of every arm: the seeds as dots, their mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = document["arms"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, stratum in zip(axes, ("L", "H"), strict=True):
        for i, data in enumerate(arms.values()):
            values = data["pass1"][stratum]
            ax.bar(i, statistics.fmean(values), 0.6, alpha=0.6)
            ax.plot([i] * len(values), values, "k.", markersize=4)
        ax.axhline(statistics.fmean(document["warm_start"][stratum]), color="grey", linestyle="--", label="warm start")
        ax.set_xticks(range(len(arms)), list(arms), rotation=20, fontsize=8)
        tiers = document["strata"][stratum]["tiers"]
        ax.set_title(f"stratum {stratum} (tiers {tiers}): held-out pass@1, unguided", fontsize=10)
        ax.legend(fontsize=8)
    gate_line = f"gate {'passed' if document.get('gate', {}).get('passed') else 'FAILED'}"
    figure.suptitle(f"bench/efficacy/chains, {len(next(iter(arms.values()))['seeds'])} paired seeds; {gate_line}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _name(stem: str, quick: bool) -> str:
    return f"{stem}{'-quick' if quick else ''}.json"


def _warm_start(bed: Chains, sets: ProblemSets, run_dir: Path) -> Path:
    from bench.efficacy.warmstart import WarmStartConfig, warm_start

    warm_dir = run_dir / f"warm-{bed.warm_steps}-{len(sets.warm)}"
    if (warm_dir / "model.safetensors").is_file():
        return warm_dir
    config = WarmStartConfig(
        hidden_size=bed.hidden_size,
        layers=bed.layers,
        steps=bed.warm_steps,
        batch_size=bed.warm_batch_size,
        learning_rate=bed.warm_learning_rate,
        seed=0,
    )
    info = warm_start(warm_dir, sets.warm, config)
    print(f"warm start: {len(sets.warm)} problems, {info['seconds']:.0f} s, loss {info['final_loss']:.4f}", flush=True)
    return warm_dir


def _strata(bed: Chains, sets: ProblemSets, warm_dir: Path, args, started: float) -> int:
    _quiet_single_thread()
    per_problem = evaluate_model(str(warm_dir), sets.strata, asdict(bed), seed=0)
    by_tier: dict[int, list[list[float]]] = {}
    for row, result in zip(sets.strata, per_problem, strict=True):
        by_tier.setdefault(row["steps"], []).append(result.correct)
    pass8 = {t: statistics.fmean(pass_at_k(c, bed.samples) for c in cs) for t, cs in by_tier.items()}
    pass1 = {t: statistics.fmean(pass_at_k(c, 1) for c in cs) for t, cs in by_tier.items()}
    tiers = stratify(pass8)
    document = {
        "L": {"tiers": tiers["L"], "warm_pass8": _mean_over(pass8, tiers["L"])},
        "H": {"tiers": tiers["H"], "warm_pass8": _mean_over(pass8, tiers["H"])},
        "per_tier": {str(t): {"pass1": pass1[t], f"pass{bed.samples}": pass8[t]} for t in sorted(pass8)},
        "rule": {"L_pass8": list(L_PASS8), "H_pass8_at_most": H_PASS8, "temperature": bed.temperature},
        "problems_per_tier": bed.strata_problems_per_tier,
        "config": asdict(bed),
        "machine": _machine(),
    }
    _write(args.output / _name("efficacy-strata", args.quick), document, started)
    for t in sorted(pass8):
        print(f"tier {t}: pass@1 {pass1[t]:.3f}  pass@{bed.samples} {pass8[t]:.3f}")
    print(f"strata: L = {tiers['L']}, H = {tiers['H']}")
    return 0


def _mean_over(values: dict[int, float], tiers: list[int]) -> float | None:
    return statistics.fmean(values[t] for t in tiers) if tiers else None


def _run_arms(bed, sets, eval_sets, warm_dir, args, tasks, stream_tiers, warm_seeds=()) -> list[dict]:
    """Each (arm, seed, lr) task trains on seed's stream and is scored on `eval_sets`; warm_seeds: the
    warm start is scored with each seed's evaluation sampling too (the paired baseline)."""
    sets_file = args.run_dir / "eval-sets.json"
    sets_file.write_text(json.dumps(eval_sets))
    pending = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        for seed in warm_seeds:
            future = pool.submit(evaluate_sets, str(warm_dir), str(sets_file), asdict(bed), seed)
            pending.append((future, {"arm": "warm-start", "seed": seed}))
        for arm, seed, lr in tasks:
            task_bed = replace(bed, learning_rate=lr) if lr else bed
            tag = f"{arm}-s{seed}" + (f"-lr{lr:g}" if lr else "")
            data = args.run_dir / "streams" / f"s{seed}.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            rows = sets.stream(seed, stream_tiers, bed.rl_steps * bed.prompts_per_step)
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            job_text = yaml.safe_dump(job_document(task_bed, arm, seed, warm_dir, data), sort_keys=False)
            job_file = args.run_dir / "jobs" / f"{tag}.yaml"
            job_file.parent.mkdir(parents=True, exist_ok=True)
            job_file.write_text(job_text)
            run_path = args.run_dir / "runs" / f"{tag}-{hashlib.sha256(job_text.encode()).hexdigest()[:12]}"
            future = pool.submit(
                train_and_evaluate, arm, seed, str(job_file), str(run_path), str(sets_file), asdict(task_bed)
            )
            pending.append((future, {"lr": lr}))
        results = []
        futures = dict(pending)
        for future in as_completed(futures):
            result = {**future.result(), **futures[future]}
            results.append(result)
            scores = " ".join(f"{s}: {v['pass1']:.3f}" for s, v in result["scores"].items())
            print(f"{result['arm']} seed {result['seed']} {scores}", flush=True)
    return results


def _write(path: Path, document: dict, started: float) -> None:
    document["wall_seconds"] = time.monotonic() - started
    document["command"] = " ".join(["python -m bench.efficacy.chains", *sys.argv[1:]])
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {path} in {document['wall_seconds']:.0f} s")


def _protocol_commit() -> str:
    """The commit that added PROTOCOL.md (the pre-registration the results are read against)."""
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "--", PROTOCOL],
        capture_output=True,
        text=True,
        check=False,
    )
    commits = out.stdout.split()
    return commits[-1] if commits else "uncommitted"


def _machine() -> dict:
    from bench.efficacy.testbed import machine

    return machine()


if __name__ == "__main__":
    sys.exit(main())
