"""`g2rpo render FILE [--namespace NS]`: every object the operator would create for a job, as YAML (as
`helm template` does for a chart), from the operator's own checks and builders.

The verb belongs to the operator, whose code it runs; the `g2rpo` command finds it through the
`g2rpo.verbs` entry point (pyproject.toml, read by g2rpo.cli), so the trainer package never imports
the operator.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

from g2rpo.api.spec import G2RPOJob, SpecError
from g2rpo.cli import JOB_FILE_HELP
from g2rpo_operator.admission import validate
from g2rpo_operator.builders import JobContext, children
from g2rpo_operator.builders.storage import checkpoint_claim
from g2rpo_operator.settings import OperatorSettings

RENDERED_TOKEN = "placeholder-the-operator-derives-the-token"


def add_verb(verbs: argparse._SubParsersAction) -> Callable[[G2RPOJob, argparse.Namespace], int]:
    """Adds `render` to the `g2rpo` command's verbs; returns what runs it on a loaded job."""
    render = verbs.add_parser(
        "render",
        help="print every object the operator would create for a job (YAML), as `helm template` does",
        description="Print the job's children as the operator would create them, with the operator's default "
        "settings; G2RPO_* environment variables override them as they do for the operator (mirror your chart "
        "values). Owner references and the controller token are filled in by the operator at creation.",
    )
    render.add_argument("file", type=Path, help=JOB_FILE_HELP)
    render.add_argument("--namespace", help="namespace of the job (default: its metadata.namespace, else 'default')")
    return run


def run(job: G2RPOJob, args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(render_children(job, args.namespace))
    except ValueError as exc:  # SpecError too
        lines = exc.lines() if isinstance(exc, SpecError) else [str(exc)]
        print(f"{args.file} cannot run on a cluster:", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def render_children(job: G2RPOJob, namespace: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The job's children as multi-document YAML; raises SpecError (a cluster check failed) or ValueError
    (a G2RPO_* setting does not parse)."""
    namespace = namespace or job.metadata.namespace or "default"
    settings = OperatorSettings.from_env(env)
    spec, errors = validate(job.metadata.name, job.spec.model_dump(by_alias=True, mode="json"))
    if spec is None:
        raise SpecError([((line.split(": ", 1)[0],), line.split(": ", 1)[1]) for line in errors])
    ctx = JobContext.resolve(job.metadata.name, namespace, spec, settings)
    block_dumper = _block_dumper()
    out = [
        f"# g2rpo render: the objects the operator creates for G2RPOJob {namespace}/{ctx.name} "
        "(ownerReferences to the job are added at creation)."
    ]
    claim = [checkpoint_claim(ctx)] if spec.checkpoint.volume_size else []
    for manifest in [*claim, *children(ctx, RENDERED_TOKEN, active=not spec.suspend)]:
        out.append("---")
        if manifest["kind"] == "Secret":
            out.append(
                "# Not a secret: the operator derives each job's token (a keyed hash of its uid) at creation; this is a placeholder."
            )
        if manifest["kind"] == "Workload" and spec.run_policy.priority_class_name:
            out.append(
                f"# At creation the operator adds spec.priority, the value of PriorityClass "
                f"{spec.run_policy.priority_class_name!r} (read from the cluster), and the class itself."
            )
        if manifest["kind"] == "PersistentVolumeClaim":
            out.append("# Created only if no claim of this name exists; not owned by the job (checkpoints outlive it).")
        out.append(yaml.dump(manifest, Dumper=block_dumper, sort_keys=False).rstrip("\n"))
    return "\n".join(out) + "\n"


def _block_dumper() -> type[yaml.SafeDumper]:
    class BlockDumper(yaml.SafeDumper):
        """Multi-line strings (the ConfigMap's files) as literal blocks, readable in a review."""

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    BlockDumper.add_representer(str, text)
    return BlockDumper
