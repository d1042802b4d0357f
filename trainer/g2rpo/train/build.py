"""From a job spec to a ready G2RPOTrainer: model, tokenizer, data, rewards, config, controller.

Shared by the local run (`g2rpo run`) and the cluster trainer (`python -m g2rpo.train`); they
differ only in where generation happens (in process, or a vLLM server) and where the guidance
controller lives (in process, or the job's controller service).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from g2rpo.api.spec import G2RPOJob, G2RPOJobSpec, SpecError, check_batch_layout
from g2rpo.controller.client import GuidanceClient
from g2rpo.guidance.schedule import ScheduleParams
from g2rpo.train.config import Generation, grpo_config
from g2rpo.train.timeouts import bound_vllm_requests, collective_timeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunLayout:
    """Where a run writes: metrics, plot, and the checkpoints folder (the HF Trainer's output_dir)."""

    run_dir: Path
    checkpoint_dir: Path

    @classmethod
    def for_job(cls, job: G2RPOJob, run_dir: Path) -> RunLayout:
        checkpoint_dir = Path(job.spec.checkpoint.dir) if job.spec.checkpoint.dir else run_dir / "checkpoints"
        return cls(run_dir=run_dir, checkpoint_dir=checkpoint_dir)

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def plot_file(self) -> Path:
        return self.run_dir / "reward_and_guidance.png"


def resolve_resume(spec: G2RPOJobSpec, checkpoint_dir: Path) -> str | None:
    """The checkpoint to resume from, following checkpoint.resume: only ever a complete one.

    With `auto`, newer incomplete checkpoints are logged and set aside by global rank 0
    (g2rpo.train.checkpoints); every rank computes the same answer, since setting aside never
    touches a complete checkpoint. When the folder holds no complete checkpoint and
    checkpoint.uri is set, rank 0 downloads the store's newest complete one into the folder
    first (g2rpo.train.store) while the other ranks wait.
    """
    from g2rpo.train.checkpoints import incomplete_reason, newest_complete, set_aside

    resume = spec.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        point = newest_complete(checkpoint_dir)
        for folder, skipped_because in point.skipped.items():
            log.warning("skipping incomplete checkpoint %s: %s", folder, skipped_because)
        if point.skipped and os.environ.get("RANK", "0") == "0":
            set_aside(point.skipped)
        if point.checkpoint is None and spec.checkpoint.uri:
            return _fetch_from_store(spec, checkpoint_dir)
        return str(point.checkpoint) if point.checkpoint else None
    if not Path(resume).is_dir():
        raise SpecError([(("spec", "checkpoint", "resume"), f"no checkpoint folder at {resume}")])
    reason = incomplete_reason(Path(resume))
    if reason is not None:
        raise SpecError([(("spec", "checkpoint", "resume"), f"{resume} is not a complete checkpoint: {reason}")])
    return resume


def finished_step(spec: G2RPOJobSpec, checkpoint: Path) -> int | None:
    """The checkpoint's step when it is the last step the job asks for (training.maxSteps; without it, as many
    whole epochs as the run that wrote the checkpoint), else None.

    A resume from the last step must not train: transformers decides that training ends only after a step
    (DefaultFlowCallback.on_step_end, transformers/trainer_callback.py), so train(resume_from_checkpoint=...)
    from global_step == max_steps trains one step past the end, saves it and overwrites the final model.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step = state["global_step"]
    if spec.training.max_steps:
        last = spec.training.max_steps
    elif state.get("num_train_epochs") == math.ceil(spec.training.epochs):
        last = state["max_steps"]  # the same epochs over the same data: the same number of steps
    else:
        return None
    return step if step >= last else None


def _fetch_from_store(spec: G2RPOJobSpec, checkpoint_dir: Path) -> str | None:
    """The store's newest complete checkpoint, downloaded into `checkpoint_dir` by rank 0 (a shared folder)."""
    from g2rpo.train.checkpoints import newest_complete
    from g2rpo.train.store import open_store

    world = PartialState()
    if world.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if open_store(spec.checkpoint).fetch_newest(checkpoint_dir) is None:
            log.info("no complete checkpoint in %s or in %s: starting fresh", checkpoint_dir, spec.checkpoint.uri)
    world.wait_for_everyone()
    checkpoint = newest_complete(checkpoint_dir).checkpoint
    return str(checkpoint) if checkpoint else None


def build_trainer(
    job: G2RPOJob,
    layout: RunLayout,
    guidance_client_factory: Callable[[ScheduleParams], GuidanceClient],
    generation: Generation = Generation(),
    extra_callbacks: list | None = None,
):
    """Build the trainer for `job`. The controller client is created on rank 0 only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from g2rpo.data.load import load_training_dataset
    from g2rpo.models.bundled import resolve_model_path
    from g2rpo.rewards import build_reward_functions
    from g2rpo.train.callbacks import MetricsFileCallback
    from g2rpo.train.lora import check_targets_found, lora_config, trainable_parameters
    from g2rpo.train.model_card import model_card
    from g2rpo.train.store import LocalFolder, open_store
    from g2rpo.train.tracking import apply_tracking_environment, check_clients_installed, run_name
    from g2rpo.train.trainer import G2RPOTrainer

    spec = job.spec
    training = spec.training
    check_clients_installed(job)
    world = PartialState(timeout=collective_timeout(spec))  # the first PartialState builds the process group
    _check_batch_layout(spec, world.num_processes)

    model_path = resolve_model_path(spec.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=_revision(spec, model_path))
    dataset = _fit_prompts(load_training_dataset(spec), tokenizer, training.max_prompt_length)
    reward_funcs = build_reward_functions(spec.rewards)

    prompts_per_step = training.per_device_batch_size * training.gradient_accumulation_steps * world.num_processes
    prompts_per_step //= training.num_generations
    total_steps = training.max_steps or max(1, math.floor(training.epochs * (len(dataset) // prompts_per_step)))
    if len(dataset) < prompts_per_step:
        raise SpecError(
            [(("spec", "dataset"), f"{len(dataset)} usable rows, fewer than one step's {prompts_per_step} prompts")]
        )
    params = ScheduleParams.from_spec(spec.guidance, run_total_steps=total_steps)
    guidance_client = guidance_client_factory(params) if world.is_main_process else None

    use_cuda = torch.cuda.is_available()
    dtype = _torch_dtype(spec.model.dtype, use_cuda)
    apply_tracking_environment(job, layout.run_dir)
    config = grpo_config(
        spec,
        output_dir=layout.checkpoint_dir,
        dtype=dtype,
        use_cpu=not use_cuda,
        generation=generation,
        run_name=run_name(job),
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, revision=_revision(spec, model_path), dtype=dtype)
    peft_config = lora_config(spec.model.lora, _revision(spec, model_path)) if spec.model.lora else None
    try:
        trainer = G2RPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            guidance_client=guidance_client,
            guided_per_group=spec.guided_per_group,
            guidance_loss=spec.guidance.loss,
            driving_reward=spec.guidance_reward.name,
            guidance_groups=spec.guidance.groups,
            sandbox_layers=_sandbox_layers(spec),
            model_card=model_card(job),
            checkpoint_store=open_store(spec.checkpoint) if world.is_main_process else LocalFolder(),
            callbacks=[MetricsFileCallback(layout.metrics_file), *(extra_callbacks or [])],
            peft_config=peft_config,
        )
    except ValueError as exc:
        if peft_config is not None:
            check_targets_found(exc)
        raise
    if peft_config is not None:
        trainable, total = trainable_parameters(trainer.model)
        log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    vllm = getattr(getattr(trainer, "vllm_generation", None), "vllm_client", None)  # rank 0 in server mode
    if vllm is not None:
        log.info("vLLM requests time out after %.0f s each", bound_vllm_requests(vllm.session, spec))
    return trainer


def _sandbox_layers(spec: G2RPOJobSpec) -> dict[str, bool] | None:
    if not any(reward.name == "code" for reward in spec.rewards):
        return None
    from g2rpo.rewards.sandbox import sandbox_layers

    return sandbox_layers()  # probed once per process: the code reward has already asked


def save_final_model(trainer, layout: RunLayout, merge_adapter: bool = False) -> Path:
    """Save the trained model and its card as run_dir/final, atomically: into a temporary folder renamed
    into place; then into the checkpoint store (<checkpoint.uri>/final, when set). A LoRA run's final folder
    holds the adapter; with `merge_adapter` (lora.saveMerged), run_dir/final-merged holds the base model with
    the adapter merged in, too.

    Every rank takes part in save_model (DeepSpeed ZeRO-3 gathers the weights); rank 0 renames.
    """
    import shutil

    partial = layout.run_dir / "final.partial"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))
    trainer.accelerator.wait_for_everyone()
    return _publish_final(trainer, layout, partial, merge_adapter)


# The files of a checkpoint that only a resumed run reads; the rest is what save_model wrote there: the model.
_TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "latest")
_TRAINING_STATE_PREFIXES = ("rng_state", "global_step", "zero_to_fp32")


def final_from_last_checkpoint(trainer, layout: RunLayout, checkpoint: Path, merge_adapter: bool = False) -> Path:
    """A restarted run whose newest checkpoint is its last step: the final model without training.

    transformers trains one step past the end when resumed from the last step (see finished_step), so the
    cluster trainer, restarted after its last checkpoint (a pod lost before it saved final/ or exited),
    must not call train(). When final/ exists it is left as it is; otherwise the checkpoint's model files
    (save_model's output at that step; ZeRO-3 saves them gathered, zero3_save_16bit_model) become
    final/, as save_final_model would have written them.
    """
    import shutil

    from g2rpo.train.checkpoints import COMPLETE_MARKER
    from g2rpo.train.trainer import GUIDANCE_STATE_FILE

    final = layout.run_dir / "final"
    if final.is_dir():
        log.info("%s is the run's last step and %s exists: nothing to train or save", checkpoint, final)
        return final
    partial = layout.run_dir / "final.partial"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        training_state = {*_TRAINING_STATE_FILES, COMPLETE_MARKER, GUIDANCE_STATE_FILE}
        shutil.copytree(
            checkpoint,
            partial,
            ignore=lambda _, names: [n for n in names if n in training_state or n.startswith(_TRAINING_STATE_PREFIXES)],
        )
        log.info("%s is the run's last step: its model becomes %s, without training", checkpoint, final)
    trainer.accelerator.wait_for_everyone()
    return _publish_final(trainer, layout, partial, merge_adapter)


def _publish_final(trainer, layout: RunLayout, partial: Path, merge_adapter: bool) -> Path:
    """Rank 0: the card into `partial`, `partial` renamed to final/, the merged copy, the store's copy."""
    import shutil

    final = layout.run_dir / "final"
    if trainer.accelerator.is_main_process:
        if trainer.model_card is not None:
            (partial / "README.md").write_text(trainer.model_card)
        _move_into_place(partial, final)
        if merge_adapter:
            from g2rpo.train.lora import merged_folder, save_merged

            merged = merged_folder(final)
            merged_partial = merged.with_name(merged.name + ".partial")
            shutil.rmtree(merged_partial, ignore_errors=True)
            save_merged(final, merged_partial, trainer.model_card, dtype=trainer.model.dtype)
            _move_into_place(merged_partial, merged)
        trainer.checkpoint_store.publish_final(final)
    trainer.accelerator.wait_for_everyone()
    return final


def _move_into_place(partial: Path, target: Path) -> None:
    """Rename a complete `partial` folder to `target`, replacing an older one (renamed away before deletion)."""
    import shutil

    if target.exists():
        old = target.with_name(".deleting-" + target.name)
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        shutil.rmtree(old)
    partial.rename(target)


def _check_batch_layout(spec: G2RPOJobSpec, num_processes: int) -> None:
    check_batch_layout(spec, num_processes)


def _fit_prompts(dataset, tokenizer, max_prompt_length: int):
    """Drop rows whose chat-formatted prompt is longer than maxPromptLength tokens (and say how many)."""
    lengths = [
        len(
            tokenizer.apply_chat_template(row, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )
        for row in dataset["prompt"]
    ]
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    if len(keep) < len(lengths):
        log.warning(
            "dropped %d of %d rows longer than maxPromptLength=%d tokens",
            len(lengths) - len(keep),
            len(lengths),
            max_prompt_length,
        )
    if not keep:
        raise SpecError(
            [(("spec", "training", "maxPromptLength"), f"every prompt is longer than {max_prompt_length} tokens")]
        )
    return dataset.select(keep) if len(keep) < len(lengths) else dataset


def _torch_dtype(name: str, use_cuda: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name in ("bfloat16", "float16") and not use_cuda:
        log.warning("model.dtype=%s on CPU: training in float32 instead", name)
        return torch.float32
    return getattr(torch, name)


def _revision(spec: G2RPOJobSpec, model_path: str) -> str | None:
    return None if Path(model_path).is_dir() else spec.model.revision
