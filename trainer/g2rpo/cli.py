"""The `g2rpo` command: validate, run, eval, crd, controller."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from g2rpo.eval.command import add_arguments as add_eval_arguments
from g2rpo.spec import SpecError, load_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="g2rpo", description="G2RPO-A training, locally or on Kubernetes.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    validate = verbs.add_parser("validate", help="check a G2RPOJob file without running it")
    validate.add_argument("file", type=Path)

    run = verbs.add_parser("run", help="run a G2RPOJob on this machine (CPU or one GPU)")
    run.add_argument("file", type=Path)
    run.add_argument("--output", type=Path, help="run folder (default: runs/<job name>)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = verbs.add_parser("eval", help="pass@1 of a model, checkpoint or job's final model (math, HumanEval)")
    add_eval_arguments(evaluate)

    verbs.add_parser("crd", help="print the G2RPOJob CustomResourceDefinition (YAML)")
    verbs.add_parser("controller", help="serve a job's guidance controller", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.verb == "controller":
        from g2rpo.controller.__main__ import main as controller_main

        return controller_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.verb == "eval":
        from g2rpo.eval.command import run as run_eval

        return run_eval(args)
    if args.verb == "crd":
        from g2rpo_operator.crd import render_crd_yaml

        sys.stdout.write(render_crd_yaml())
        return 0
    try:
        job = load_job(args.file)
    except FileNotFoundError:
        print(f"{args.file}: no such file", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(f"{args.file} is not a valid G2RPOJob:", file=sys.stderr)
        for line in exc.lines():
            print(f"  {line}", file=sys.stderr)
        return 1
    if args.verb == "validate":
        print(f"{args.file}: valid G2RPOJob {job.metadata.name!r}")
        return 0
    return _run(job, args)


def _run(job, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # TRL 1.16 still calls transformers' renamed gradient-checkpointing API on every step.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    from g2rpo.local.run import run_local

    run_dir = args.output or Path("runs") / job.metadata.name
    try:
        result = run_local(job, run_dir, progress=not args.no_progress)
    except SpecError as exc:
        print(f"{args.file} cannot run:", file=sys.stderr)
        for line in exc.lines():
            print(f"  {line}", file=sys.stderr)
        return 1
    layout = result.layout
    print(f"\nfinished {job.metadata.name!r}: {result.final_step} steps in {result.seconds:.0f} s")
    for key, value in result.summary.items():
        print(f"  {key:>24}: {value:.3f}")
    print(f"  metrics:     {layout.metrics_file}")
    print(f"  plot:        {layout.plot_file}")
    print(f"  checkpoints: {layout.checkpoint_dir}")
    print(f"  final model: {layout.run_dir / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
