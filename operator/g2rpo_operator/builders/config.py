"""The job's configuration children: a ConfigMap with what the trainer and controller read, a Secret
with the controller's API token.

The ConfigMap's `job.yaml` is also the operator's record of the *accepted* spec: later edits are
compared with it (see admission.spec_changes), so the trainer always reads exactly what was applied.
"""

from __future__ import annotations

import base64

import yaml

from g2rpo.api.names import ACCELERATE_KEY, JOB_KEY, TOKEN_KEY
from g2rpo.api.spec import API_GROUP, API_VERSION, KIND, G2RPOJobSpec
from g2rpo_operator.builders.common import JobContext, Manifest, metadata

# libyaml when PyYAML has it: every reconcile pass renders and reads job.yaml, and the pure-Python
# parser and emitter take most of a pass's time (same documents, same YAML either way).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

_MIXED_PRECISION = {"auto": "bf16", "bfloat16": "bf16", "float16": "fp16", "float32": "no"}


def spec_document(spec: G2RPOJobSpec) -> Manifest:
    """The spec as plain JSON-able data, camelCase, every field present (None included: it can be meaningful)."""
    return spec.model_dump(by_alias=True, mode="json")


def job_document(ctx: JobContext) -> Manifest:
    """The G2RPOJob the trainer and controller read (`--job` / `--schedule-from`)."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": ctx.name, "namespace": ctx.namespace},
        "spec": spec_document(ctx.spec),
    }


def accelerate_config(ctx: JobContext) -> Manifest:
    """accelerate's launcher config: DeepSpeed with the spec's ZeRO stage across replicas x GPUs.

    Rank, master address and port are given on the command line per pod; this file holds what
    every pod shares. The optimiser/batch knobs stay in the trainer's config (TRL passes them to
    DeepSpeed as "auto"), so they are not duplicated here.
    """
    trainer = ctx.spec.trainer
    deepspeed: Manifest = {
        "zero_stage": trainer.zero_stage,
        "offload_optimizer_device": "none",
        "offload_param_device": "none",
        "gradient_accumulation_steps": ctx.spec.training.gradient_accumulation_steps,
        "gradient_clipping": ctx.spec.training.max_grad_norm,
        "deepspeed_multinode_launcher": "standard",
    }
    if trainer.zero_stage == 3:
        deepspeed |= {"zero3_init_flag": True, "zero3_save_16bit_model": True}
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": deepspeed,
        "mixed_precision": _MIXED_PRECISION[ctx.spec.model.dtype],
        "num_machines": trainer.replicas,
        "num_processes": trainer.replicas * trainer.gpus_per_replica,
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "use_cpu": False,
    }


def configmap(ctx: JobContext) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(ctx, "config", ctx.config_name),
        "data": {
            JOB_KEY: yaml.dump(job_document(ctx), Dumper=_DUMPER, sort_keys=False),
            ACCELERATE_KEY: yaml.dump(accelerate_config(ctx), Dumper=_DUMPER, sort_keys=False),
        },
    }


def token_secret(ctx: JobContext, token: str) -> Manifest:
    """The bearer token the trainer and the operator present to the controller.

    `token` is derived by the caller (g2rpo_operator.tokens.job_token: the operator never reads this
    Secret back), which keeps this function pure.
    """
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(ctx, "controller", ctx.token_name),
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def accepted_spec(configmap_body: Manifest) -> Manifest | None:
    """The spec recorded in an existing ConfigMap (None when absent or unreadable)."""
    text = (configmap_body.get("data") or {}).get(JOB_KEY)
    if not text:
        return None
    document = yaml.load(text, Loader=_LOADER)
    spec = document.get("spec") if isinstance(document, dict) else None
    return spec if isinstance(spec, dict) else None
