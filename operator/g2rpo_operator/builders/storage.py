"""The checkpoint claim the operator creates when the spec asks for one (checkpoint.volumeSize)."""

from __future__ import annotations

from g2rpo_operator.builders import common
from g2rpo_operator.builders.common import JobContext, Manifest


def checkpoint_claim(ctx: JobContext) -> Manifest:
    """The claim the operator creates from checkpoint.volumeSize: ReadWriteMany (every trainer pod and the
    controller mount it), labelled but not owned by the job (checkpoints outlive it)."""
    checkpoint = ctx.spec.checkpoint
    spec: Manifest = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": checkpoint.volume_size}}}
    storage_class = checkpoint.storage_class_name or ctx.settings.storage_class_name
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": checkpoint.volume_claim,
            "namespace": ctx.namespace,
            "labels": common.labels(ctx, "checkpoints"),
        },
        "spec": spec,
    }
