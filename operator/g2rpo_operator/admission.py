"""Admission: whether a G2RPOJob's spec can run on a cluster, and which edits of a running job apply.

The CRD's CEL rules (g2rpo.api.crd) refuse most of this at `kubectl apply` already; the operator
checks again on every pass, including what CEL cannot see.

Rules worth knowing:
- The ConfigMap's job.yaml is the accepted spec. An edit touching only MUTABLE_FIELDS is applied;
  any other edit is refused as a whole (condition SpecApplied=False naming the fields) and the job
  keeps running the accepted spec. An edit to an invalid spec is refused the same way.
"""

from __future__ import annotations

from typing import Any

from g2rpo.api.names import CHECKPOINT_MOUNT
from g2rpo.api.spec import (
    MUTABLE_FIELDS,
    G2RPOJobSpec,
    SpecError,
    check_batch_layout,
    job_name_errors,
    parse_spec,
)
from g2rpo_operator.builders import JobContext, children, config
from g2rpo_operator.child_names import invalid_child_names
from g2rpo_operator.settings import OperatorSettings


def validate(
    name: str, raw_spec: Any, settings: OperatorSettings | None = None
) -> tuple[G2RPOJobSpec | None, list[str]]:
    """The spec if it can run on a cluster, else every reason why not (`field.path: reason`).

    Beyond the model's own validation (which the CRD schema cannot fully express: cross-field
    rules), a cluster run needs a name that fits its children's names and a checkpoint claim:
    suspend/resume and restarts continue from checkpoints, which must outlive the pods. A linear,
    concave or cosine schedule needs its length up front: the controller pod has no dataset to count.
    """
    errors = [f"metadata.name: {reason}" for reason in job_name_errors(name)]
    try:
        spec = parse_spec(raw_spec)
    except SpecError as exc:
        return None, errors + exc.lines()
    if not errors:
        errors += [f"metadata.name: {reason}" for reason in job_name_errors(name, spec.trainer.replicas)]
    if not spec.checkpoint.volume_claim:
        errors.append(
            "spec.checkpoint.volumeClaim: required on a cluster (restarts and resume continue from checkpoints "
            "on this PersistentVolumeClaim)"
        )
    if spec.guidance.schedule in ("linear", "concave", "cosine") and not (
        spec.guidance.total_steps or spec.training.max_steps
    ):
        errors.append(
            f"spec.guidance.totalSteps: the {spec.guidance.schedule} schedule needs the run's length on a cluster "
            "(set guidance.totalSteps or training.maxSteps): the controller pod computes l_k without the dataset"
        )
    if spec.run_policy.gang_scheduler == "kueue" and not (spec.run_policy.queue or (settings and settings.kueue_queue)):
        errors.append(
            "spec.runPolicy.queue: gangScheduler kueue needs a queue (the Kueue LocalQueue name); the operator "
            "has no default (G2RPO_KUEUE_QUEUE)"
        )
    if spec.run_policy.gang_scheduler == "kueue" and settings and not settings.kueue_enabled:
        errors.append(
            "spec.runPolicy.gangScheduler: kueue needs the operator's Kueue integration, which is off (install "
            "the chart with kueue.enabled=true, G2RPO_KUEUE_ENABLED): it creates and watches the job's Workload"
        )
    try:
        check_batch_layout(spec, spec.trainer.replicas * spec.trainer.gpus_per_replica)
    except SpecError as exc:
        errors += exc.lines()
    directory = spec.checkpoint.dir
    if directory and directory != CHECKPOINT_MOUNT and not directory.startswith(CHECKPOINT_MOUNT + "/"):
        errors.append(
            f"spec.checkpoint.dir: must lie under {CHECKPOINT_MOUNT} (where the claim is mounted), got {directory!r}"
        )
    if not errors:
        errors += _child_name_errors(name, spec, settings or OperatorSettings())
    return (None if errors else spec), errors


def _child_name_errors(name: str, spec: G2RPOJobSpec, settings: OperatorSettings) -> list[str]:
    """The names of the children the builders render for this job, as the API server would check them:
    the backstop behind job_name_errors, so nothing is created for a job one of whose children would be
    refused (the namespace names no child, any one does)."""
    rendered = children(JobContext.resolve(name, "default", spec, settings), token="", active=True)
    return [f"metadata.name: the API server would refuse {line}" for line in invalid_child_names(rendered)]


def spec_changes(accepted: Any, proposed: Any, path: str = "") -> list[str]:
    """Dotted paths where `proposed` differs from `accepted`.

    Keys missing from `accepted` are not changes: they are fields a newer operator added to the
    model, and their defaults must not count as an edit of a job accepted before.
    """
    if isinstance(accepted, dict) and isinstance(proposed, dict):
        found: list[str] = []
        for key, value in accepted.items():
            found += spec_changes(value, proposed.get(key), f"{path}.{key}" if path else key)
        return found
    return [] if accepted == proposed else [path]


def refused_edits(accepted: G2RPOJobSpec, proposed: G2RPOJobSpec) -> list[str]:
    """The fields an edit of the accepted spec changes that may not change after creation (empty: it applies)."""
    changes = spec_changes(config.spec_document(accepted), config.spec_document(proposed))
    return [path for path in changes if path not in MUTABLE_FIELDS]
