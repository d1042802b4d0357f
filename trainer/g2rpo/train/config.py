"""From the job spec to TRL's GRPOConfig, as a pure function of the spec and where the run happens.

Every field of `training` and `checkpoint` either reaches an argument here or is listed in
DELIBERATELY_UNMAPPED with the reason; tests/test_grpo_config.py changes each field in turn and
fails for one that changes no argument and is not listed, so a new field cannot be forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from g2rpo.api.names import ROLLOUT_GROUP_PORT
from g2rpo.api.spec import G2RPOJobSpec, max_model_len
from g2rpo.train.timeouts import collective_timeout_seconds

if TYPE_CHECKING:
    from trl import GRPOConfig


@dataclass(frozen=True)
class Generation:
    """Where roll-outs are generated: in the training process, or on a vLLM server (TRL's server mode).

    `weight_sync_port` is the port of TRL's NCCL group that pushes weights to the server.
    """

    vllm_server_url: str | None = None
    weight_sync_port: int = ROLLOUT_GROUP_PORT


DELIBERATELY_UNMAPPED: dict[str, str] = {
    "checkpoint.dir": "chooses the output_dir the caller passes in (RunLayout.for_job), beside the run's other files",
    "checkpoint.resume": "picks the checkpoint for trainer.train(resume_from_checkpoint=...) (build.resolve_resume)",
    "checkpoint.volumeClaim": "cluster storage: the operator mounts the claim at checkpoint.dir",
    "checkpoint.volumeSize": "cluster storage: the size of a claim the operator creates",
    "checkpoint.storageClassName": "cluster storage: the class of a claim the operator creates",
    "checkpoint.uri": "the object store that mirrors output_dir (g2rpo.train.store), outside the HF Trainer",
    "checkpoint.credentialsSecret": "cluster only: the operator renders it as the trainer pods' env",
}
"""Spec fields (YAML paths under `spec`) that GRPOConfig does not see, with why.

Of `tracking`, only `backends` (report_to) and the run's name reach GRPOConfig; the rest is the tracking
callbacks' environment (g2rpo.train.tracking)."""


def grpo_config_arguments(
    spec: G2RPOJobSpec,
    *,
    output_dir: Path,
    dtype: torch.dtype,
    use_cpu: bool,
    generation: Generation,
    run_name: str | None = None,
) -> dict[str, Any]:
    """GRPOConfig's keyword arguments for `spec`, training in `dtype` and writing checkpoints to `output_dir`.

    `run_name` names the run in the trackers of spec.tracking (TensorBoard, MLflow, W&B)."""
    training = spec.training
    return {
        "output_dir": str(output_dir),
        "use_cpu": use_cpu,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "per_device_train_batch_size": training.per_device_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "num_generations": training.num_generations,
        "learning_rate": training.learning_rate,
        "num_train_epochs": training.epochs,
        "max_steps": training.max_steps or -1,
        "max_completion_length": training.max_completion_length,
        "temperature": training.temperature,
        "top_p": training.top_p,
        "top_k": training.top_k,
        "beta": training.beta,
        "epsilon": training.epsilon,
        "epsilon_high": training.epsilon_high,
        "loss_type": training.loss_type,
        "scale_rewards": training.scale_rewards,
        "num_iterations": training.num_iterations,
        "mask_truncated_completions": training.mask_truncated_completions,
        "weight_decay": training.weight_decay,
        "warmup_steps": training.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        "lr_scheduler_type": training.lr_scheduler_type,
        "max_grad_norm": training.max_grad_norm,
        "gradient_checkpointing": training.gradient_checkpointing,
        "seed": training.seed,
        "logging_steps": training.logging_steps,
        "save_strategy": "steps",
        "save_steps": spec.checkpoint.every_steps,
        "save_total_limit": spec.checkpoint.keep,
        "reward_weights": [reward.weight for reward in spec.rewards],
        "shuffle_dataset": spec.curriculum is None,  # a curriculum's order is the point
        "report_to": list(spec.tracking.backends),
        "run_name": run_name,
        "disable_tqdm": True,
        "use_vllm": generation.vllm_server_url is not None,
        "vllm_mode": "server",
        "vllm_server_base_url": generation.vllm_server_url,
        "vllm_group_port": generation.weight_sync_port,
        # As long as the rollout's startup probe allows vLLM to come up: a restarted gang meets a new server.
        "vllm_server_timeout": float(spec.rollout.startup_timeout_seconds),
        "vllm_max_model_length": max_model_len(spec),
        # A collective that outlasts a stalled step is a hang: raise instead of waiting forever (timeouts.py).
        "ddp_timeout": collective_timeout_seconds(spec),
    }


def grpo_config(
    spec: G2RPOJobSpec,
    *,
    output_dir: Path,
    dtype: torch.dtype,
    use_cpu: bool,
    generation: Generation,
    run_name: str | None = None,
) -> GRPOConfig:
    """TRL's GRPOConfig for `spec` (see grpo_config_arguments)."""
    from trl import GRPOConfig

    return GRPOConfig(
        **grpo_config_arguments(
            spec, output_dir=output_dir, dtype=dtype, use_cpu=use_cpu, generation=generation, run_name=run_name
        )
    )
