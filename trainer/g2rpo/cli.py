"""The `g2rpo` command: validate, run, eval, render, crd, controller, and the cluster verbs (submit, status,
logs, list, delete: g2rpo.client.command)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from g2rpo.api.spec import G2RPOJob, SpecError, load_job
from g2rpo.client import command as cluster_command
from g2rpo.eval.command import add_arguments as add_eval_arguments

VERB_ENTRY_POINTS = "g2rpo.verbs"
"""Verbs that the operator package adds to `g2rpo` (`render`; pyproject.toml): each entry point, named
as its verb, is a function that adds the verb's parser to the verbs it is given and returns what runs
the verb on the loaded job file. The trainer package reaches the operator's code only through them."""

JobVerb = Callable[[G2RPOJob, argparse.Namespace], int]

EXIT_BROKEN_PIPE = 141
"""What a shell reports for a process killed by SIGPIPE: `g2rpo crd | head` ends like `cat ... | head`."""

JOB_FILE_HELP = "the G2RPOJob YAML file"


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows at the last flush too
        return code
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """The reader of stdout went away: send what is still buffered nowhere, so that the interpreter's
    final flush raises no second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2rpo", description="G2RPO-A training, locally or on Kubernetes.")
    parser.set_defaults(run_job=None, unavailable=None)
    verbs = parser.add_subparsers(dest="verb", title="verbs", metavar="VERB")

    validate = verbs.add_parser(
        "validate",
        help="check a G2RPOJob file without running it; local data (files, folders, builtin) is opened and "
        "checked as `run` would (columns, missing values, curriculum tiers, broken JSON lines)",
    )
    validate.add_argument("file", type=Path, help=JOB_FILE_HELP)
    data = validate.add_mutually_exclusive_group()
    data.add_argument("--data", action="store_true", help="also download and check a hub dataset")
    data.add_argument("--no-data", action="store_true", help="check the job file only, not its data")

    run = verbs.add_parser("run", help="run a G2RPOJob on this machine (CPU or one GPU)")
    run.add_argument("file", type=Path, help=f"{JOB_FILE_HELP} (a relative dataset.name is read from its folder)")
    run.add_argument("--output", type=Path, help="run folder (default: runs/<job name>)")
    run.add_argument(
        "--no-progress", action="store_true", help="no progress bar: one short line per step (all in metrics.jsonl)"
    )
    run.add_argument(
        "--no-heldout",
        action="store_true",
        help="skip the held-out check before and after training (builtin:arithmetic jobs)",
    )

    _add_entry_point_verbs(verbs)

    evaluate = verbs.add_parser("eval", help="pass@1 of a model, checkpoint or job's final model (math, HumanEval)")
    add_eval_arguments(evaluate)

    cluster_command.add_verbs(verbs)

    verbs.add_parser("crd", help="print the G2RPOJob CustomResourceDefinition (YAML)")
    verbs.add_parser("controller", help="serve a job's guidance controller", add_help=False)
    return parser


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.verb is None:
        parser.print_help(sys.stderr)
        return 2
    if args.verb == "controller":
        from g2rpo.controller.__main__ import main as controller_main

        return controller_main(rest)
    if args.unavailable:
        print(args.unavailable, file=sys.stderr)
        return 2
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.verb == "eval":
        from g2rpo.eval.command import run as run_eval

        return run_eval(args)
    if args.verb in cluster_command.VERBS:
        return cluster_command.run(args)
    if args.verb == "crd":
        from g2rpo.api.crd import render_crd_yaml

        sys.stdout.write(render_crd_yaml())
        return 0
    try:
        job = load_job(args.file)
    except FileNotFoundError:
        print(f"{args.file}: no such file", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(exc.report(f"{args.file} is not a valid G2RPOJob"), file=sys.stderr)
        return 1
    if args.verb == "validate":
        return _validate(job, args)
    if args.run_job:
        return args.run_job(job, args)
    try:
        _resolve_dataset_name(job, args.file)
    except SpecError as exc:
        print(exc.report(f"{args.file} cannot run"), file=sys.stderr)
        return 1
    try:
        return _run(job, args)
    except KeyboardInterrupt:  # before run_local took over SIGINT: nothing was trained or saved
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130


def _add_entry_point_verbs(verbs: argparse._SubParsersAction) -> None:
    """The verbs of VERB_ENTRY_POINTS; one whose module cannot be imported stays listed and says why."""
    for entry in entry_points(group=VERB_ENTRY_POINTS):
        try:
            add_verb = entry.load()
        except ImportError as exc:
            placeholder = verbs.add_parser(entry.name, help="(needs the operator package)", add_help=False)
            placeholder.add_argument("arguments", nargs=argparse.REMAINDER)
            placeholder.set_defaults(
                unavailable=f"g2rpo {entry.name} needs the operator package: pip install 'g2rpo[operator]' ({exc})"
            )
        else:
            run_job: JobVerb = add_verb(verbs)
            verbs.choices[entry.name].set_defaults(run_job=run_job)


def _resolve_dataset_name(job, job_file: Path) -> None:
    from g2rpo.data.load import resolve_relative_name

    resolve_relative_name(job.spec.dataset, job_file.parent)


def _validate(job, args) -> int:
    """The job file, then (unless --no-data) its data, read by the same code as `run`."""
    what = f"valid G2RPOJob {job.metadata.name!r}"
    if args.no_data:
        print(f"{args.file}: {what} (data not checked)")
        return 0
    from g2rpo.data.load import HubUnreachable, load_training_dataset

    try:
        _resolve_dataset_name(job, args.file)
        if not (args.data or _is_local(job.spec.dataset)):
            print(f"{args.file}: {what}; hub dataset {job.spec.dataset.name!r} not downloaded (add --data)")
            return 0
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
        # Without network, huggingface_hub warns once per retry (twice: its own handler and ours); the
        # failure itself is reported below, in one line.
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        rows = len(load_training_dataset(job.spec))
    except HubUnreachable as exc:
        print(f"{args.file}: data not checked: {exc.lines()[0]}", file=sys.stderr)
        return 1
    except SpecError as exc:
        print(exc.report(f"{args.file} is not a valid G2RPOJob"), file=sys.stderr)
        return 1
    print(f"{args.file}: {what}; {rows} training rows from {job.spec.dataset.name}")
    return 0


def _is_local(dataset) -> bool:
    return dataset.is_builtin_arithmetic or Path(dataset.name).expanduser().exists()


def _run(job, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # TRL 1.16 still calls transformers' renamed gradient-checkpointing API on every step.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    from g2rpo.local.run import HELDOUT_PROBLEMS, AlreadyFinished, run_local
    from g2rpo.train.lifecycle import StopRequested
    from g2rpo.train.preflight import FatalProblem

    run_dir = args.output or Path("runs") / job.metadata.name
    heldout_problems = 0 if args.no_heldout else HELDOUT_PROBLEMS
    try:
        result = run_local(job, run_dir, progress=not args.no_progress, heldout_problems=heldout_problems)
    except StopRequested as stop:
        print(_stopped_line(stop, job, args, run_dir), file=sys.stderr)
        return stop.exit_code
    except FatalProblem as problem:  # e.g. no room for the next checkpoint (g2rpo.train.storage)
        print(problem, file=sys.stderr)
        return problem.exit_code
    except AlreadyFinished as done:
        print(_finished_lines(done, job, args, run_dir))
        return 0
    except SpecError as exc:
        print(exc.report(f"{args.file} cannot run"), file=sys.stderr)
        return 1
    layout = result.layout
    print(f"\nfinished {job.metadata.name!r}: {result.final_step} steps in {result.seconds:.0f} s")
    for key, value in result.summary.items():
        print(f"  {key:>24}: {value:.3f}")
    print(f"  metrics:     {layout.metrics_file}")
    print(f"  plot:        {layout.plot_file}")
    print(f"  checkpoints: {layout.checkpoint_dir}")
    print(f"  final model: {layout.run_dir / 'final'}" + (" (the LoRA adapter)" if job.spec.model.lora else ""))
    if job.spec.model.merged_final:
        print(f"  merged:      {layout.run_dir / 'final-merged'}")
    return 0


def _stopped_line(stop, job, args, run_dir: Path) -> str:
    """One line: where the newest complete checkpoint is and the exact command that resumes from it."""
    from g2rpo.train.build import RunLayout
    from g2rpo.train.checkpoints import newest_complete

    checkpoint = newest_complete(RunLayout.for_job(job, run_dir).checkpoint_dir.resolve()).checkpoint
    command = _run_command(args, run_dir)
    if checkpoint is None:
        return f"stopped by {stop.name} before the first checkpoint; nothing to resume (rerun: {command})"
    if job.spec.checkpoint.resume != "auto":
        return f"stopped by {stop.name}; last checkpoint: {checkpoint}; to resume set checkpoint.resume: auto, then: {command}"
    return f"stopped by {stop.name}; last checkpoint: {checkpoint}; resume with: {command}"


def _finished_lines(done, job, args, run_dir: Path) -> str:
    """A rerun of a finished job: where its model is, and the two ways on (train further, start over)."""
    final = done.layout.run_dir / "final"
    checkpoint = done.checkpoint.resolve()
    model = str(final.resolve()) if final.is_dir() else f"no final/ folder; step {done.step} is in {checkpoint}"
    training = job.spec.training
    limit = f"training.maxSteps (now {training.max_steps})" if training.max_steps else "training.epochs"
    return "\n".join(
        [
            f"{job.metadata.name!r} already finished at step {done.step} ({checkpoint}); nothing was changed",
            f"  final model:   {model}",
            f"  to train on:   raise {limit} in {args.file.resolve()}, then: {_run_command(args, run_dir)}",
            f"  to start over: delete {_folders(done.layout)}, or run with --output NEW_FOLDER",
        ]
    )


def _folders(layout) -> str:
    """The run folder, and the checkpoint folder where checkpoint.dir puts it elsewhere."""
    run_dir, checkpoint_dir = layout.run_dir.resolve(), layout.checkpoint_dir.resolve()
    return f"{run_dir}" if checkpoint_dir.is_relative_to(run_dir) else f"{run_dir} and {checkpoint_dir}"


def _run_command(args, run_dir: Path) -> str:
    """The command that runs this job into this run folder again, from any folder (absolute paths)."""
    words = ["g2rpo", "run", str(args.file.resolve()), "--output", str(run_dir.resolve())]
    words += [flag for flag, on in (("--no-progress", args.no_progress), ("--no-heldout", args.no_heldout)) if on]
    return shlex.join(words)


if __name__ == "__main__":
    sys.exit(main())
