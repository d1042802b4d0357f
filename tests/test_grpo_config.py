"""The job spec as TRL's GRPOConfig: every field is mapped or deliberately left out, and the examples keep
the configs they had when the mapping moved out of build_trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch

from g2rpo.spec import CheckpointSpec, SpecError, TrainingSpec, load_job, parse_spec
from g2rpo.train.config import DELIBERATELY_UNMAPPED, Generation, grpo_config, grpo_config_arguments
from g2rpo_operator.builders import JobContext, rollout
from g2rpo_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name": "m"}, "dataset": {"name": "builtin:arithmetic"}}
CHECKED_SECTIONS = {"training": TrainingSpec, "checkpoint": CheckpointSpec}


def arguments(spec) -> dict[str, Any]:
    return grpo_config_arguments(
        spec, output_dir=Path("/ckpt"), dtype=torch.float32, use_cpu=True, generation=Generation()
    )


def _literal_choices(annotation) -> list:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [choice for arg in get_args(annotation) for choice in _literal_choices(arg)]


def _candidates(field, default) -> list:
    if isinstance(default, bool):
        return [not default]
    numeric = [default + 1, default / 2] if isinstance(default, (int, float)) else []
    return [*_literal_choices(field.annotation), *numeric, 2, 0.5, "1Gi", "elsewhere"]


def spec_with_another_value(section: str, name: str):
    """MINIMAL with `section.name` set to the first valid value other than its default."""
    field = CHECKED_SECTIONS[section].model_fields[name]
    default = field.get_default(call_default_factory=True)
    for value in _candidates(field, default):
        if value == default:
            continue
        try:
            return parse_spec({**MINIMAL, section: {field.alias: value}})
        except SpecError:
            continue
    raise AssertionError(f"{section}.{field.alias}: no valid value besides {default!r} among the candidates; add one")


FIELDS = [(section, name) for section, model in CHECKED_SECTIONS.items() for name in model.model_fields]


@pytest.mark.parametrize(
    ("section", "name"), FIELDS, ids=[f"{s}.{CHECKED_SECTIONS[s].model_fields[n].alias}" for s, n in FIELDS]
)
def test_every_field_reaches_grpo_config_or_is_deliberately_unmapped(section, name):
    path = f"{section}.{CHECKED_SECTIONS[section].model_fields[name].alias}"
    before, after = arguments(parse_spec(MINIMAL)), arguments(spec_with_another_value(section, name))
    changed = sorted(key for key in before if before[key] != after[key])
    if path in DELIBERATELY_UNMAPPED:
        assert not changed, f"{path} is in DELIBERATELY_UNMAPPED but sets {changed}: take it off the list"
    else:
        assert changed, (
            f"{path} sets no GRPOConfig argument: map it in g2rpo.train.config.grpo_config_arguments, "
            "or add it to DELIBERATELY_UNMAPPED with the reason"
        )


def test_deliberately_unmapped_names_only_fields_that_exist():
    paths = {f"{section}.{field.alias}" for section, model in CHECKED_SECTIONS.items() for field in model.model_fields.values()}
    assert set(DELIBERATELY_UNMAPPED) <= paths
    assert all(reason.strip() for reason in DELIBERATELY_UNMAPPED.values())


def test_the_examples_keep_their_configs():
    """Values build_trainer produced before grpo_config existed (real GRPOConfig, CPU)."""
    local = load_job(ROOT / "examples/smollm2-arithmetic.yaml").spec
    config = grpo_config(local, output_dir=Path("/run/ckpt"), dtype=torch.float32, use_cpu=True, generation=Generation())
    assert {key: getattr(config, key) for key in ("per_device_train_batch_size", "num_generations", "max_steps")} == {
        "per_device_train_batch_size": 4, "num_generations": 4, "max_steps": 40
    }
    assert (config.learning_rate, config.temperature, config.max_completion_length) == (6e-05, 0.8, 64)
    assert (config.save_steps, config.save_total_limit, config.reward_weights) == (10, 2, [1.0, 0.1])
    assert (config.shuffle_dataset, config.use_vllm, config.vllm_max_model_length) == (False, False, 384)
    assert (config.output_dir, config.use_cpu, config.bf16, config.fp16) == ("/run/ckpt", True, False, False)

    cluster = load_job(ROOT / "manifests/examples/g2rpojob.yaml").spec
    config = grpo_config(
        cluster, output_dir=Path("/ckpt"), dtype=torch.float32, use_cpu=True,
        generation=Generation(vllm_server_url="http://rollout:8000"),
    )
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.num_generations) == (12, 4, 12)
    assert (config.learning_rate, config.num_train_epochs, config.max_steps) == (1e-06, 5.0, -1)
    assert (config.lr_scheduler_type, config.warmup_steps, config.gradient_checkpointing) == ("cosine", 0.1, True)
    assert (config.loss_type, config.scale_rewards, config.epsilon, config.beta) == ("dapo", "group", 0.2, 0.0)
    assert (config.save_steps, config.save_total_limit, config.vllm_max_model_length) == (50, 3, 512 + 3072 + 4096)
    assert (config.use_vllm, config.vllm_server_base_url, config.vllm_group_port) == (True, "http://rollout:8000", 51216)
    assert config.vllm_server_timeout == 1200.0


@pytest.mark.parametrize("rollout_section", [{}, {"maxModelLen": 2048}])
def test_the_trainer_and_the_rollout_server_agree_on_the_context_length(rollout_section):
    spec = parse_spec({**MINIMAL, "rollout": rollout_section})
    command = rollout.vllm_serve_command(JobContext.resolve("j", "ml", spec, OperatorSettings()))
    served = int(command[command.index("--max_model_len") + 1])
    assert served == arguments(spec)["vllm_max_model_length"] == rollout_section.get("maxModelLen", 512 + 3072 + 1024)
