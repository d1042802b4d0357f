"""`g2rpo submit | status | logs | list | delete`: a job on a cluster without kubectl queries.

Each verb takes kubectl's connection flags (`--namespace/-n`, `--context`, `--kubeconfig`; KUBECONFIG
is honoured) and prints a ClusterError as one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from g2rpo.api.spec import SpecError, load_job
from g2rpo.client.api import COMPONENTS, ClusterError, JobClient, JobView, age

VERBS = ("submit", "status", "logs", "list", "delete")
BAR_WIDTH = 30


def add_verbs(verbs: argparse._SubParsersAction) -> None:
    submit = verbs.add_parser("submit", help="validate a G2RPOJob file locally, then create it on the cluster")
    submit.add_argument("file", type=Path, help="the G2RPOJob YAML file")
    submit.add_argument("--watch", "-w", action="store_true", help="then follow its status until it finishes")

    status = verbs.add_parser("status", help="a job's phase, progress, reward, guidance length and conditions")
    status.add_argument("job", help="the G2RPOJob's name")
    status.add_argument("--watch", "-w", action="store_true", help="print each change until the job finishes")

    logs = verbs.add_parser("logs", help="the log of a job's trainer (a rank), rollout or controller pod")
    logs.add_argument("job", help="the G2RPOJob's name")
    logs.add_argument("--rank", type=int, default=0, help="the trainer pod's node rank (default 0: rank 0's pod)")
    logs.add_argument("--component", choices=COMPONENTS, default="trainer", help="which pod (default trainer)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")

    listing = verbs.add_parser("list", help="the namespace's G2RPOJobs, as `kubectl get g2rpojobs` shows them")
    listing.add_argument("--all-namespaces", "-A", action="store_true", help="every namespace")

    delete = verbs.add_parser("delete", help="delete a job (its pods, services and config go with it)")
    delete.add_argument("job", help="the G2RPOJob's name")

    for verb in (submit, status, logs, listing, delete):
        connection = verb.add_argument_group("cluster connection (as kubectl)")
        connection.add_argument("--namespace", "-n", help="namespace (default: the context's, else default)")
        connection.add_argument("--context", help="kubeconfig context (default: the current one)")
        connection.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")


def run(args: argparse.Namespace, client: JobClient | None = None, out: TextIO | None = None) -> int:
    """Run one verb; `client` skips the kubeconfig (tests pass one bound to their API server)."""
    out = out or sys.stdout
    verb: Callable[[JobClient, argparse.Namespace, TextIO], int] = {
        "submit": _submit,
        "status": _status,
        "logs": _logs,
        "list": _list,
        "delete": _delete,
    }[args.verb]
    try:
        if args.verb == "submit":  # the file first: a broken job never needs the cluster
            args.loaded = load_job(args.file)
        client = client or JobClient(namespace=args.namespace, context=args.context, kubeconfig=args.kubeconfig)
        return verb(client, args, out)
    except FileNotFoundError:
        print(f"{args.file}: no such file", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(exc.report(f"{args.file} is not a valid G2RPOJob"), file=sys.stderr)
        return 1
    except ClusterError as exc:
        print(f"g2rpo {args.verb}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _submit(client: JobClient, args: argparse.Namespace, out: TextIO) -> int:
    view = client.submit(args.loaded)
    print(f"g2rpojob/{view.name} created in namespace {view.namespace}", file=out)
    if not args.watch:
        print(f"follow it with: g2rpo status {view.name} -n {view.namespace} --watch", file=out)
        return 0
    client.namespace = view.namespace
    return _follow(client, view.name, out)


def _status(client: JobClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.watch:
        return _follow(client, args.job, out)
    out.write(describe(client.get(args.job)))
    return 0


def _follow(client: JobClient, name: str, out: TextIO) -> int:
    """Each change of the job's status until it finishes: 0 when it succeeded, 1 when it failed."""
    view = None
    for view in client.watch(name):
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        out.write(f"--- {stamp}\n{describe(view)}")
        out.flush()
    return 0 if view is not None and view.phase == "Succeeded" else 1


def _logs(client: JobClient, args: argparse.Namespace, out: TextIO) -> int:
    for line in client.logs(args.job, component=args.component, rank=args.rank, follow=args.follow):
        print(line, file=out, flush=args.follow)
    return 0


def _list(client: JobClient, args: argparse.Namespace, out: TextIO) -> int:
    views = client.list(all_namespaces=args.all_namespaces)
    if not views:
        where = "any namespace" if args.all_namespaces else f"namespace {client.namespace!r}"
        print(f"no G2RPOJobs in {where}", file=sys.stderr)
        return 0
    header = ["NAME", "PHASE", "STEP", "REWARD", "GUIDANCE", "RESTARTS", "AGE"]
    rows = [
        [
            v.name,
            v.phase,
            _step(v),
            _number(v.status.accuracy_reward if v.status else None, "{:.3f}"),
            _number(v.status.guidance_length if v.status else None),
            _number(v.status.restarts if v.status else None),
            age(v.created),
        ]
        for v in views
    ]
    if args.all_namespaces:
        header.insert(0, "NAMESPACE")
        for view, row in zip(views, rows, strict=True):
            row.insert(0, view.namespace)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("   ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
    return 0


def _delete(client: JobClient, args: argparse.Namespace, out: TextIO) -> int:
    client.delete(args.job)
    print(f"g2rpojob/{args.job} deleted from namespace {client.namespace}", file=out)
    return 0


def describe(view: JobView) -> str:
    """The job's status as a block of lines: phase, a progress bar, the last step's numbers, conditions."""
    status = view.status
    lines = [f"g2rpojob/{view.name} in namespace {view.namespace}", f"  phase:      {view.phase}"]
    if status is None:
        lines.append("  (the operator has not reported on this job yet)")
        return "\n".join(lines) + "\n"
    lines.append(f"  step:       {progress_bar(status.step, view.max_steps)}")
    lines.append(f"  reward:     {_number(status.accuracy_reward, '{:.3f}')} (accuracy, last step)")
    lines.append(f"  guidance:   {_number(status.guidance_length)} tokens (l_k, next step)")
    lines.append(f"  restarts:   {status.restarts} (disruptions: {status.disruptions})")
    if status.last_checkpoint:
        lines.append(f"  checkpoint: {status.last_checkpoint}")
    if status.conditions:
        lines.append("  conditions:")
        width = max(len(c.type) for c in status.conditions)
        for c in status.conditions:
            lines.append(f"    {c.type.ljust(width)}  {c.status.ljust(7)}  {c.reason}: {c.message}")
    return "\n".join(lines) + "\n"


def progress_bar(step: int | None, total: int | None) -> str:
    if step is None:
        return "-"
    if not total:
        return f"{step} (training.maxSteps not set: the run ends after training.epochs)"
    done = min(step, total) * BAR_WIDTH // total
    return f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] {step}/{total} ({100 * step // total}%)"


def _step(view: JobView) -> str:
    step = view.status.step if view.status else None
    if step is None:
        return "-"
    return f"{step}/{view.max_steps}" if view.max_steps else str(step)


def _number(value: float | None, form: str = "{}") -> str:
    return "-" if value is None else form.format(value)
