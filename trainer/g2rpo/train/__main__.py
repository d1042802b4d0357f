"""`python -m g2rpo.train --job FILE`: one rank of a cluster job, started by `accelerate launch`.

The operator mounts the accepted job as FILE and sets the environment:
G2RPO_CONTROLLER_URL and G2RPO_CONTROLLER_TOKEN_FILE (the job's guidance controller; rank 0
talks to it), G2RPO_ROLLOUT_URL and G2RPO_ROLLOUT_GROUP_PORT (the vLLM server and TRL's weight
sync). Without G2RPO_ROLLOUT_URL, ranks generate in process. Checkpoints go to checkpoint.dir
(the job's volume); a restarted trainer resumes from the newest complete one there, guidance state
included (g2rpo.train.checkpoints). One restarted after its last step's checkpoint trains no further:
it exits 0, with final/ made from that checkpoint when the run had not saved it yet.

SIGTERM (Kubernetes, before it kills the pod) or SIGINT: every rank stops after the same step,
a checkpoint is saved, and the process exits 143 (SIGTERM) or 130 (SIGINT) after one line
naming the checkpoint; see g2rpo.train.lifecycle. The process group is destroyed before exit.

`--check` only validates the job for WORLD_SIZE ranks, the node's NVIDIA driver and the checkpoint
folder (g2rpo.train.preflight, g2rpo.train.storage), then exits; every rank runs the same checks
first. A job that cannot run exits with EXIT_INVALID_SPEC (2, as argparse's usage errors); a
too-old driver, a checkpoint folder it cannot write, or a volume with no room for the next
checkpoint exit with their own codes (g2rpo.api.spec.FAILURE_REASONS) after one line saying what
was found and what is needed. The trainer Job's podFailurePolicy turns those exits of the
check-spec init container into an immediate failure instead of a retry; a rank started by
`accelerate launch` exits 1 whatever it returns, so it also writes the line to its termination
message, where the operator reads the reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from g2rpo.api.names import (
    ROLLOUT_GROUP_PORT,
    ROLLOUT_GROUP_PORT_ENV,
    ROLLOUT_URL_ENV,
    TRAINER_CHECK_FLAG,
    TRAINER_JOB_FLAG,
    TRAINER_MODULE,
)
from g2rpo.api.spec import EXIT_INVALID_SPEC, SpecError, check_batch_layout, load_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {TRAINER_MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument(TRAINER_JOB_FLAG, type=Path, required=True, help="the G2RPOJob YAML file")
    parser.add_argument("--run-dir", type=Path, help="metrics and final model (default: beside the checkpoints)")
    parser.add_argument(
        TRAINER_CHECK_FLAG, action="store_true", help="validate the job for WORLD_SIZE ranks, then exit"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from g2rpo.train.lifecycle import StopRequested, StopSignals, distributed_teardown
    from g2rpo.train.preflight import FatalProblem, check_node_driver, report

    job = layout = None
    try:
        check_node_driver()  # before torch: on a too-old driver torch would quietly train on the CPU
        _one_cpu_device_name()
        signals = StopSignals().install()
        job = load_job(args.job)
        check_batch_layout(job.spec, int(os.environ.get("WORLD_SIZE", "1")))
        if args.check and job.spec.checkpoint.uri:
            from g2rpo.train.store import check_backend

            check_backend(job.spec.checkpoint.uri)
        from g2rpo.train.build import RunLayout
        from g2rpo.train.storage import check_writable

        layout = RunLayout.for_job(job, args.run_dir or _default_run_dir(job))
        check_writable(layout.checkpoint_dir)
        if args.check:
            return 0
        with distributed_teardown():
            _train(job, layout, signals)
    except SpecError as exc:
        print(f"{args.job} {'is not a valid G2RPOJob' if job is None else 'cannot run'}: {exc}", file=sys.stderr)
        return EXIT_INVALID_SPEC
    except FatalProblem as problem:
        print(report(problem), file=sys.stderr, flush=True)
        return problem.exit_code
    except StopRequested as stop:
        if os.environ.get("RANK", "0") == "0":
            print(_stopped_line(stop, job, layout), file=sys.stderr, flush=True)
        return stop.exit_code
    return 0


def _train(job, layout, signals) -> None:
    from g2rpo.controller.http_client import HttpGuidanceClient
    from g2rpo.train.build import (
        Generation,
        build_trainer,
        final_from_last_checkpoint,
        finished_step,
        resolve_resume,
        save_final_model,
    )
    from g2rpo.train.lifecycle import StopAtStepBoundary, StopRequested

    generation = Generation(
        vllm_server_url=os.environ.get(ROLLOUT_URL_ENV) or None,
        weight_sync_port=int(os.environ.get(ROLLOUT_GROUP_PORT_ENV, str(ROLLOUT_GROUP_PORT))),
    )
    trainer = build_trainer(
        job,
        layout,
        guidance_client_factory=lambda params: HttpGuidanceClient.from_env(),
        generation=generation,
        extra_callbacks=[StopAtStepBoundary(signals)],
    )
    resume = resolve_resume(job.spec, layout.checkpoint_dir)
    if resume and finished_step(job.spec, Path(resume)) is not None:
        final_from_last_checkpoint(trainer, layout, Path(resume), merge_adapter=job.spec.model.merged_final)
        return
    trainer.train(resume_from_checkpoint=resume)
    if signals.stopped_by:
        raise StopRequested(signals.stopped_by)
    save_final_model(trainer, layout, merge_adapter=job.spec.model.merged_final)


def _stopped_line(stop, job, layout) -> str:
    from g2rpo.train.checkpoints import newest_complete

    checkpoint = newest_complete(layout.checkpoint_dir).checkpoint if layout else None
    if checkpoint is None:
        return f"stopped by {stop.name} before the first complete checkpoint; a restarted trainer starts from step 0"
    how = "resumes from it" if job.spec.checkpoint.resume == "auto" else "resumes from it with checkpoint.resume: auto"
    return f"stopped by {stop.name}; last complete checkpoint: {checkpoint}; a restarted trainer {how}"


def _one_cpu_device_name() -> None:
    """Ranks without a GPU use the device `cpu`, not `cpu:<rank>`.

    accelerate 1.15 names rank r's device `cpu:r` in a multi-process CPU run, transformers 5.17
    loads the optimizer state with map_location=args.device there, and torch.load knows no
    location `cpu:1`: every resume would fail. Set before accelerate's state is first built.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")


def _default_run_dir(job) -> Path:
    if job.spec.checkpoint.dir:
        return Path(job.spec.checkpoint.dir)
    return Path("runs") / job.metadata.name


if __name__ == "__main__":
    from g2rpo.train.lifecycle import exit_process

    exit_process(main())
