"""bench/efficacy, issue 9's testbed (kept to reproduce its results; issue 18's redesign is chains.py).

Does guidance help a small model learn what GRPO alone cannot? (issue 9, item 4)

    .venv/bin/python -m bench.efficacy            # the full bench: 4 arms x 3 seeds, writes
                                                  # bench/results/efficacy-issue9.{json,png}
    .venv/bin/python -m bench.efficacy --quick    # a smoke run of the whole pipeline (~2 minutes)

The testbed, seeded end to end, on CPU:

1. A tiny Qwen3-architecture model with a character tokenizer (g2rpo.models.tiny), warm-started
   by a short supervised pass on the easy tiers (1-2 steps) of the compact arithmetic problems
   (g2rpo.data.arithmetic.generate_compact): the stand-in for the pretrained model the paper
   starts from. It can do one step of arithmetic and the answer format; longer chains are new.
2. Reinforcement learning with the real G2RPOTrainer, through `g2rpo run`'s own code path
   (a G2RPOJob YAML per arm and seed, `run_local`), on a mix of tiers 1-4. Every arm gets the
   same steps, prompts per step and roll-outs per step (G per prompt); they differ only in
   `guidance`:
     grpo              alpha = 0 (vanilla GRPO)
     fixed             alpha = 0.5, l_k = l_0 throughout (the paper's "naive guidance")
     g2rpo-a           alpha = 0.5, adaptive l_k (paper Eq. 5)
     g2rpo-a-smoothed  alpha = 0.5, adaptive with guidance.smoothing (EMA of r_k, capped change)
3. Held-out, unguided pass@1 per tier with g2rpo.eval (problems whose arithmetic chain occurs in
   no training set, paper decoding: temperature 0.6, top-p 0.95, top-k 20, 4 samples each).
   Tier 1 is not evaluated: the warm start covers nearly every one-step chain, so no held-out
   one-step problems exist.
4. From each run's metrics.jsonl: advantage std and the fraction of zero-variance groups per step
   (the paper's Figure 5b signal), accuracy reward (all / unguided) and l_k.

Runs go to `--workers` processes (default 2), one torch thread each: on a shared 2-core machine
two single-threaded runs finish sooner than one two-threaded run (thread spinning).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ARMS = ("grpo", "fixed", "g2rpo-a", "g2rpo-a-smoothed")
CURVE_KEYS = {
    "advantage_std": "g2rpo/advantage_std",
    "zero_std_groups": "g2rpo/zero_std_groups",
    "accuracy": "g2rpo/accuracy",
    "accuracy_unguided": "g2rpo/accuracy_unguided",
    "guidance_length": "g2rpo/guidance_length",
}


@dataclass(frozen=True)
class Testbed:
    """Every knob of the bench; written into the results so that a number can be traced to its setup."""

    seeds: tuple[int, ...] = (0, 1, 2)
    max_operand: int = 9
    # warm start (supervised, easy tiers)
    warm_tiers: tuple[int, int] = (1, 2)
    warm_problems: int = 1500
    warm_steps: int = 600
    warm_batch_size: int = 32
    warm_learning_rate: float = 3e-3
    hidden_size: int = 128
    layers: int = 3
    # reinforcement learning (every arm alike)
    rl_tiers: tuple[int, int] = (1, 4)
    rl_problems: int = 1024
    rl_steps: int = 40
    prompts_per_step: int = 4
    num_generations: int = 8
    learning_rate: float = 2e-4
    temperature: float = 1.0
    max_completion_length: int = 80
    # guidance (the arms that have it)
    ratio: float = 0.5
    initial_length: int = 32
    min_length: int = 2
    max_length: int = 64
    smoothing: dict = field(default_factory=lambda: {"rewardEma": 0.7, "maxChangeFactor": 1.5})
    # held-out evaluation
    eval_tiers: tuple[int, ...] = (2, 3, 4)
    eval_problems_per_tier: int = 40
    eval_samples: int = 4

    @classmethod
    def quick(cls) -> Testbed:
        return cls(
            seeds=(0,),
            warm_problems=300,
            warm_steps=30,
            rl_problems=64,
            rl_steps=2,
            prompts_per_step=2,
            num_generations=4,
            eval_problems_per_tier=4,
            eval_samples=2,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one seed, a few steps")
    parser.add_argument("--workers", type=int, default=2, help="arm-seed runs at a time (one torch thread each)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "efficacy", help="models, jobs, logs")
    parser.add_argument(
        "--output", type=Path, default=None, help="results folder (default bench/results; --quick: the run dir)"
    )
    parser.add_argument("--steps", type=int, help="override the RL steps per run")
    parser.add_argument("--seeds", type=int, help="override the number of seeds (0..N-1)")
    parser.add_argument("--learning-rate", type=float, help="override the RL learning rate")
    args = parser.parse_args(argv)

    bed = Testbed.quick() if args.quick else Testbed()
    if args.steps:
        bed = _replace(bed, rl_steps=args.steps)
    if args.seeds:
        bed = _replace(bed, seeds=tuple(range(args.seeds)))
    if args.learning_rate:
        bed = _replace(bed, learning_rate=args.learning_rate)
    output = args.output or (args.run_dir if args.quick else REPO / "bench" / "results")
    started = time.monotonic()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    _single_thread()

    from bench.efficacy.warmstart import WarmStartConfig, warm_start
    from g2rpo.api.spec import ArithmeticDatasetSpec
    from g2rpo.data.arithmetic import generate_compact
    from g2rpo.eval import load_math_problems

    warm_data = ArithmeticDatasetSpec(
        num_problems=bed.warm_problems,
        min_steps=bed.warm_tiers[0],
        max_steps=bed.warm_tiers[1],
        max_operand=bed.max_operand,
        seed=1000,
    )
    rl_data = ArithmeticDatasetSpec(
        num_problems=bed.rl_problems,
        min_steps=bed.rl_tiers[0],
        max_steps=bed.rl_tiers[1],
        max_operand=bed.max_operand,
        seed=2000,
    )
    rl_file = args.run_dir / "rl_problems.jsonl"
    rl_file.write_text("".join(json.dumps(row) + "\n" for row in generate_compact(rl_data)))
    heldout = load_math_problems(
        "builtin:arithmetic",
        split="heldout",
        n=bed.eval_problems_per_tier * len(bed.eval_tiers),
        tiers=list(bed.eval_tiers),
        seed=0,
        train=[warm_data, rl_data],
        generator=generate_compact,
    )
    heldout_file = args.run_dir / "heldout.jsonl"
    heldout_file.write_text("".join(json.dumps(asdict(p)) + "\n" for p in heldout))

    warm_dir = args.run_dir / "warm"
    print(
        f"warm start: {bed.warm_steps} supervised steps on tiers {bed.warm_tiers} ({bed.warm_problems} problems)",
        flush=True,
    )
    warm = warm_start(
        warm_dir,
        generate_compact(warm_data),
        WarmStartConfig(
            hidden_size=bed.hidden_size,
            layers=bed.layers,
            steps=bed.warm_steps,
            batch_size=bed.warm_batch_size,
            learning_rate=bed.warm_learning_rate,
            seed=0,
        ),
    )
    print(f"warm start done in {warm['seconds']:.0f} s, loss {warm['final_loss']:.4f}", flush=True)

    tasks = [("warm-start", None, warm_dir, None)]
    for seed in bed.seeds:
        for arm in ARMS:
            job_file = args.run_dir / "jobs" / f"{arm}-s{seed}.yaml"
            job_file.parent.mkdir(parents=True, exist_ok=True)
            job_file.write_text(yaml.safe_dump(job_document(bed, arm, seed, warm_dir, rl_file), sort_keys=False))
            tasks.append((arm, seed, job_file, args.run_dir / "runs" / f"{arm}-s{seed}"))

    results: list[dict] = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(
                run_one, arm, seed, str(source), str(run_dir) if run_dir else None, str(heldout_file), asdict(bed)
            )
            for arm, seed, source, run_dir in tasks
        ]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            tiers = " ".join(f"t{t}={a:.3f}" for t, a in result["accuracy"].items())
            print(
                f"[{time.monotonic() - started:6.0f} s] {result['arm']} seed {result['seed']}: {tiers} "
                f"(train {result.get('train_seconds', 0):.0f} s, eval {result['eval_seconds']:.0f} s)",
                flush=True,
            )
            # Rewritten after every run: an interrupted bench still leaves the seeds it finished.
            report = build_report(bed, results, warm, time.monotonic() - started, complete=len(results) == len(tasks))
            if report is not None:
                output.mkdir(parents=True, exist_ok=True)
                (output / "efficacy-issue9.json").write_text(json.dumps(report, indent=1) + "\n")
                plot(report, output / "efficacy-issue9.png")
    print(table(report))
    print(
        f"wrote {output / 'efficacy-issue9.json'} and {output / 'efficacy-issue9.png'} in {report['wall_seconds']:.0f} s"
    )
    return 0


def job_document(bed: Testbed, arm: str, seed: int, model_dir: Path, data_file: Path) -> dict:
    """The G2RPOJob of one arm and seed: the same file `g2rpo run` takes."""
    if arm == "grpo":
        guidance = {"ratio": 0.0, "schedule": "fixed", "initialLength": 0, "minLength": 0, "maxLength": 0}
    else:
        guidance = {
            "ratio": bed.ratio,
            "schedule": "fixed" if arm == "fixed" else "adaptive",
            "initialLength": bed.initial_length,
            "minLength": bed.min_length,
            "maxLength": bed.max_length,
            "window": 2,
            "loss": "include",
        }
        if arm == "g2rpo-a-smoothed":
            guidance["smoothing"] = dict(bed.smoothing)
    return {
        "apiVersion": "g2rpo.dev/v1alpha1",
        "kind": "G2RPOJob",
        "metadata": {"name": f"efficacy-{arm}-s{seed}"},
        "spec": {
            "model": {"name": str(model_dir), "dtype": "float32"},
            "dataset": {
                "name": str(data_file),
                "promptColumn": "problem",
                "answerColumn": "answer",
                "guidanceColumn": "solution",
                "difficultyColumn": "steps",
            },
            # Accuracy alone: a zero-variance group then means exactly "all right or all wrong".
            "rewards": [{"name": "accuracy", "weight": 1.0}],
            "guidance": guidance,
            "training": {
                "numGenerations": bed.num_generations,
                "perDeviceBatchSize": bed.prompts_per_step * bed.num_generations,
                "maxSteps": bed.rl_steps,
                "learningRate": bed.learning_rate,
                "maxPromptLength": 128,
                "maxCompletionLength": bed.max_completion_length,
                "temperature": bed.temperature,
                "beta": 0.0,
                "seed": seed,
            },
            "checkpoint": {"everySteps": 100000, "keep": 1, "resume": "never"},
        },
    }


def run_one(arm: str, seed: int | None, source: str, run_dir: str | None, heldout_file: str, bed: dict) -> dict:
    """Train one arm-seed with `run_local` (or take the warm-start model as is), then evaluate it held-out."""
    _single_thread()
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("g2rpo").setLevel(logging.WARNING)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from g2rpo.eval import EvalProblem, evaluate
    from g2rpo.local.plot import read_metrics

    result: dict = {"arm": arm, "seed": seed}
    model_dir = source
    if run_dir is not None:
        from g2rpo.api.spec import load_job
        from g2rpo.local.run import run_local

        started = time.monotonic()
        outcome = run_local(load_job(source), Path(run_dir), progress=False)
        result["train_seconds"] = time.monotonic() - started
        model_dir = str(Path(run_dir) / "final")
        records = [r for r in read_metrics(outcome.layout.metrics_file) if CURVE_KEYS["accuracy"] in r]
        result["curves"] = {name: [r.get(key) for r in records] for name, key in CURVE_KEYS.items()}
    started = time.monotonic()
    problems = [EvalProblem(**json.loads(line)) for line in Path(heldout_file).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    report = evaluate(
        model,
        tokenizer,
        problems,
        task="math",
        samples=bed["eval_samples"],
        temperature=0.6,
        top_p=0.95,
        top_k=20,
        max_new_tokens=bed["max_completion_length"],
        batch_size=64,
        seed=0,
        progress=False,
    )
    result["eval_seconds"] = time.monotonic() - started
    result["accuracy"] = {tier: report.per_tier[tier] for tier in map(str, bed["eval_tiers"])}
    result["pass_at_1"] = report.pass_at_1
    result["truncation_rate"] = report.truncation_rate
    return result


def build_report(bed: Testbed, results: list[dict], warm: dict, wall_seconds: float, complete: bool) -> dict | None:
    """The results JSON; None until the warm-start model and one run of every arm are evaluated."""
    tiers = [str(t) for t in bed.eval_tiers]
    warm_result = next((r for r in results if r["arm"] == "warm-start"), None)
    if warm_result is None or any(not any(r["arm"] == arm for r in results) for arm in ARMS):
        return None
    arms: dict[str, dict] = {}
    for arm in ARMS:
        runs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        accuracy = {tier: [r["accuracy"][tier] for r in runs] for tier in tiers}
        overall = [r["pass_at_1"] for r in runs]
        arms[arm] = {
            "seeds": [r["seed"] for r in runs],
            "accuracy": accuracy,
            "mean": {tier: statistics.fmean(v) for tier, v in accuracy.items()},
            "std": {tier: _std(v) for tier, v in accuracy.items()},
            "pass_at_1": overall,
            "pass_at_1_mean": statistics.fmean(overall),
            "pass_at_1_std": _std(overall),
            "truncation_rate": [r["truncation_rate"] for r in runs],
            "train_seconds": [round(r["train_seconds"], 1) for r in runs],
            "curves": {name: _mean_curve([r["curves"][name] for r in runs]) for name in CURVE_KEYS},
            "run_means": {
                name: statistics.fmean(x for r in runs for x in r["curves"][name] if x is not None)
                for name in ("advantage_std", "zero_std_groups", "accuracy_unguided")
                if any(x is not None for r in runs for x in r["curves"][name])
            },
        }
    return {
        "complete": complete,
        "arms": arms,
        "warm_start": {"accuracy": warm_result["accuracy"], "pass_at_1": warm_result["pass_at_1"], **warm},
        "tiers": tiers,
        "config": asdict(bed),
        "machine": machine(),
        "wall_seconds": wall_seconds,
        "command": " ".join(["python -m bench.efficacy", *sys.argv[1:]]),
    }


def table(report: dict) -> str:
    """Markdown: per arm, held-out unguided pass@1 per tier as mean ± std over seeds."""
    tiers = report["tiers"]
    lines = ["| arm | " + " | ".join(f"tier {t}" for t in tiers) + " | all tiers | adv. std | zero-var groups |"]
    lines.append("|---|" + "---|" * (len(tiers) + 3))
    warm = report["warm_start"]
    lines.append(
        "| warm start (before RL) | "
        + " | ".join(f"{warm['accuracy'][t]:.3f}" for t in tiers)
        + f" | {warm['pass_at_1']:.3f} | | |"
    )
    for arm, data in report["arms"].items():
        cells = [f"{data['mean'][t]:.3f} ± {data['std'][t]:.3f}" for t in tiers]
        cells.append(f"{data['pass_at_1_mean']:.3f} ± {data['pass_at_1_std']:.3f}")
        cells.append(f"{data['run_means'].get('advantage_std', float('nan')):.3f}")
        cells.append(f"{data['run_means'].get('zero_std_groups', float('nan')):.2f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    tiers = report["tiers"]
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    width = 0.8 / len(arms)
    for i, (arm, data) in enumerate(arms.items()):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(tiers))]
        ax.bar(xs, [data["mean"][t] for t in tiers], width, yerr=[data["std"][t] for t in tiers], capsize=3, label=arm)
    ax.plot(
        range(len(tiers)), [report["warm_start"]["accuracy"][t] for t in tiers], "k_", markersize=30, label="warm start"
    )
    ax.set_xticks(range(len(tiers)), [f"tier {t} ({t} steps)" for t in tiers])
    ax.set_ylabel("held-out pass@1 (unguided)")
    ax.set_title(f"held-out accuracy, mean ± std over {len(report['config']['seeds'])} seeds", fontsize=10)
    ax.legend(fontsize=8)
    for ax, (name, label) in zip(
        (axes[0][1], axes[1][0], axes[1][1]),
        (
            ("advantage_std", "advantage std (Fig. 5b)"),
            ("zero_std_groups", "zero-variance group fraction"),
            ("guidance_length", "guidance length l_k (tokens)"),
        ),
        strict=False,
    ):
        for arm, data in arms.items():
            curve = data["curves"][name]
            ax.plot(range(1, len(curve) + 1), _smooth(curve), label=arm)
        ax.set_xlabel("RL step")
        ax.set_title(label, fontsize=10)
    axes[0][1].legend(fontsize=8)
    figure.suptitle("curves: mean over seeds, 5-step moving average", fontsize=9, y=0.005, va="bottom")
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine() -> dict:
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
    }


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_curve(curves: list[list]) -> list[float | None]:
    length = max((len(c) for c in curves), default=0)
    out = []
    for i in range(length):
        values = [c[i] for c in curves if i < len(c) and c[i] is not None]
        out.append(statistics.fmean(values) if values else None)
    return out


def _smooth(curve: list, window: int = 5) -> list[float]:
    values = [v if v is not None else float("nan") for v in curve]
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(statistics.fmean(part) if part else float("nan"))
    return out


def _replace(bed: Testbed, **changes) -> Testbed:
    from dataclasses import replace

    return replace(bed, **changes)


if __name__ == "__main__":
    sys.exit(main())
