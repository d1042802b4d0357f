"""`python -m g2rpo.controller` (and `g2rpo controller`): run one job's controller service.

    python -m g2rpo.controller --schedule-from job.yaml --state-dir /state --token-file /token/token
    python -m g2rpo.controller --job demo --params '{"schedule": "adaptive", "initialLength": 512}' ...

The schedule comes from the job's `spec.guidance` (a G2RPOJob YAML, e.g. the operator's
ConfigMap mounted as a file) or from `--params`, a JSON object with the same field names. Once a
state directory holds the job's state, the persisted parameters (operator overrides included)
win over these.

Without --state-dir the state lives in memory only: a restart starts again from step 0, and the
trainer must restore the controller snapshot saved in its checkpoint (`GuidanceClient.restore`);
until then its next report is refused as a step from the future, never silently accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from g2rpo.api.names import (
    CONTROLLER_JOB_FLAG,
    CONTROLLER_PORT,
    CONTROLLER_PORT_FLAG,
    CONTROLLER_SCHEDULE_FROM_FLAG,
    CONTROLLER_STATE_DIR_FLAG,
    CONTROLLER_TOKEN_ENV,
    CONTROLLER_TOKEN_FILE_ENV,
    CONTROLLER_TOKEN_FILE_FLAG,
)
from g2rpo.api.spec import GuidanceSpec, SpecError, load_job
from g2rpo.controller.http_client import read_token
from g2rpo.controller.store import DEFAULT_COMPACT_EVERY, StateError
from g2rpo.guidance.schedule import ScheduleParams

log = logging.getLogger("g2rpo.controller")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="g2rpo controller", description="Serve a job's guidance state over HTTP.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        CONTROLLER_SCHEDULE_FROM_FLAG, metavar="JOB.yaml", type=Path, help="a G2RPOJob file: its spec.guidance"
    )
    source.add_argument("--params", metavar="JSON", help="spec.guidance fields as a JSON object")
    p.add_argument(
        CONTROLLER_JOB_FLAG, help="job name (the metrics' job label); default: metadata.name of --schedule-from"
    )
    p.add_argument(
        "--run-total-steps",
        type=int,
        metavar="N",
        help="the run's length, for linear/concave/cosine schedules without guidance.totalSteps "
        "(default: spec.training.maxSteps of --schedule-from)",
    )
    p.add_argument(
        CONTROLLER_STATE_DIR_FLAG, type=Path, help="volume path for the journal and snapshot (default: memory only)"
    )
    p.add_argument(
        CONTROLLER_TOKEN_FILE_FLAG,
        type=Path,
        help=f"file holding the bearer token (default: ${CONTROLLER_TOKEN_FILE_ENV}, else ${CONTROLLER_TOKEN_ENV})",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument(
        CONTROLLER_PORT_FLAG,
        type=int,
        default=CONTROLLER_PORT,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    p.add_argument(
        "--compact-every",
        type=int,
        default=DEFAULT_COMPACT_EVERY,
        metavar="N",
        help="fold the journal into the snapshot every N records",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def schedule_params(args: argparse.Namespace) -> tuple[str | None, ScheduleParams]:
    """(job name from the file or None, schedule parameters); raises SpecError or ValueError."""
    if args.schedule_from is not None:
        job = load_job(args.schedule_from)
        total = args.run_total_steps or job.spec.training.max_steps
        return job.metadata.name, ScheduleParams.from_spec(job.spec.guidance, run_total_steps=total)
    try:
        guidance = GuidanceSpec.model_validate(json.loads(args.params))
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'guidance'}: {e['msg']}" for e in exc.errors()]
        raise ValueError("--params: " + "; ".join(problems)) from None
    except ValueError as exc:
        raise ValueError(f"--params is not a JSON object: {exc}") from None
    return None, ScheduleParams.from_spec(guidance, run_total_steps=args.run_total_steps)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from g2rpo.controller.service import ServiceConfig, serve  # aiohttp is an extra: import it only to serve

    try:
        job_name, params = schedule_params(args)
        token = read_token(args.token_file)
    except SpecError as exc:
        print(f"error: {args.schedule_from}:", *exc.lines(), sep="\n  ", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job = args.job or job_name
    if not job:
        print("error: --job is required with --params", file=sys.stderr)
        return 2
    if args.state_dir is None:
        log.warning("no --state-dir: job %s's guidance state lives in memory only and is lost on restart", job)
    config = ServiceConfig(job, params, token, args.state_dir, args.compact_every)
    try:
        asyncio.run(serve(config, args.host, args.port))
    except StateError as exc:
        log.critical("cannot load the state: %s", exc)
        return 1
    except OSError as exc:  # the port is taken, the state directory is not writable, ...
        log.critical("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
