"""LoRA (spec.model.lora) through PEFT, handed to TRL's GRPOTrainer as its `peft_config`.

What the libraries do with it, read from their source (trl 1.16.0, transformers 5.17.0, peft 0.21.2):

- trl/trainer/grpo_trainer.py (GRPOTrainer.__init__) wraps the model with `get_peft_model`; with
  beta > 0 the reference log-probs come from the same model with the adapter disabled (no copy).
- trl/generation/vllm_generation.py (VLLMGeneration._iter_named_params, server mode): `merge_adapter()`,
  then every base parameter under the base model's own name ("base_model.model." and ".base_layer"
  removed, the `lora_` tensors left out), then `unmerge_adapter()`. So the vLLM server keeps serving
  the base architecture and receives the merged weights at each sync; it needs no LoRA support.
  tests/test_lora.py holds this contract.
- transformers/trainer.py saves a PEFT model's checkpoint as the adapter (adapter_config.json,
  adapter_model.safetensors) beside the optimizer of the trainable parameters, and resumes it with
  `load_adapter(..., is_trainable=True)` (Trainer._load_from_checkpoint).

g2rpo adds: the spec -> LoraConfig mapping, the merged copy of the final model (lora.saveMerged), and
loading an adapter folder for `g2rpo eval`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from g2rpo.api.spec import ALL_LINEAR, LoraSpec, SpecError

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.constants.CONFIG_NAME
MERGED_SUFFIX = "-merged"
TARGET_MODULES_PATH = ("spec", "model", "lora", "targetModules")


def lora_config(lora: LoraSpec, revision: str | None = None) -> LoraConfig:
    """PEFT's LoraConfig for `lora`; `revision` is the base model's hub revision (None for a folder),
    recorded in the adapter so that loading it later fetches the same base weights."""
    from peft import LoraConfig

    targets: list[str] | str | None = lora.target_modules
    if targets == [ALL_LINEAR]:
        targets = ALL_LINEAR  # PEFT reads the shorthand only as a string
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        revision=revision,
    )


def check_targets_found(error: ValueError) -> None:
    """Re-raise PEFT's "Target modules ... not found in the base model" as a spec error naming the field."""
    message = str(error)
    if "Target module" in message and "not found" in message:
        raise SpecError([(TARGET_MODULES_PATH, message.split(". Please")[0])]) from error


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def merged_folder(final: Path) -> Path:
    return final.with_name(final.name + MERGED_SUFFIX)


def load_merged(adapter: str | Path, **from_pretrained: Any):
    """The base model named in the adapter's config, with the adapter merged in (a plain transformers model)."""
    try:
        from peft import AutoPeftModelForCausalLM
    except ImportError as exc:
        raise ImportError(
            f"{adapter} holds a LoRA adapter ({ADAPTER_CONFIG}); loading it needs peft: pip install 'g2rpo[train]'"
        ) from exc
    return AutoPeftModelForCausalLM.from_pretrained(str(adapter), **from_pretrained).merge_and_unload()


def save_merged(adapter: Path, into: Path, model_card: str | None, dtype: Any) -> None:
    """Write into `into` the base model with the adapter of `adapter` merged in, and the tokenizer.

    Read back from the saved adapter rather than merged in the training model, which stays as it is
    (and, under ZeRO-3, sharded).
    """
    from transformers import AutoTokenizer

    load_merged(adapter, dtype=dtype).save_pretrained(into)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(into)
    if model_card is not None:
        (into / "README.md").write_text(model_card)
