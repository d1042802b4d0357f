"""The job spec as TRL's GRPOConfig: every field is mapped or deliberately left out, and the examples keep
the configs they had when the mapping moved out of build_trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch

from g2rpo.api.spec import CheckpointSpec, SpecError, TrainingSpec, load_job, parse_spec
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
    return [*_literal_choices(field.annotation), *numeric, 2, 0.5, "1Gi", "elsewhere", "s3://bucket/run"]


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
    raise AssertionError(f"{section}.{field.alias}: no valid value but {default!r} among the candidates; add one")


FIELDS = [
    (f"{section}.{field.alias}", section, name)
    for section, model in CHECKED_SECTIONS.items()
    for name, field in model.model_fields.items()
]


@pytest.mark.parametrize(("path", "section", "name"), FIELDS, ids=[path for path, _, _ in FIELDS])
def test_every_field_reaches_grpo_config_or_is_deliberately_unmapped(path, section, name):
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
    assert set(DELIBERATELY_UNMAPPED) <= {path for path, _, _ in FIELDS}
    assert all(reason.strip() for reason in DELIBERATELY_UNMAPPED.values())


# What build_trainer gave these examples before grpo_config existed, on CPU: the local example generating in
# process, the cluster one with a vLLM server. (The local example has since kept one checkpoint, not two.)
SERVER = "http://rollout:8000"
EXAMPLE_CONFIGS = {
    ("examples/smollm2-arithmetic.yaml", None): {
        "output_dir": "/ckpt",
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_generations": 4,
        "learning_rate": 6e-05,
        "max_steps": 40,
        "max_completion_length": 64,
        "temperature": 0.8,
        "loss_type": "dapo",
        "scale_rewards": "group",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0.0,
        "save_steps": 10,
        "save_total_limit": 1,
        "reward_weights": [1.0, 0.1],
        "shuffle_dataset": False,
        "use_vllm": False,
        "vllm_max_model_length": 384,
    },
    ("manifests/examples/g2rpojob.yaml", SERVER): {
        "per_device_train_batch_size": 12,
        "gradient_accumulation_steps": 4,
        "num_generations": 12,
        "learning_rate": 1e-06,
        "num_train_epochs": 5.0,
        "max_steps": -1,
        "max_completion_length": 4096,
        "temperature": 0.7,
        "epsilon": 0.2,
        "beta": 0.0,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
        "gradient_checkpointing": True,
        "save_steps": 50,
        "save_total_limit": 3,
        "reward_weights": [1.0, 0.1],
        "use_vllm": True,
        "vllm_server_base_url": SERVER,
        "vllm_group_port": 51216,
        "vllm_server_timeout": 1200.0,
        "vllm_max_model_length": 7680,
    },
}


@pytest.mark.parametrize(("example", "server"), list(EXAMPLE_CONFIGS), ids=[path for path, _ in EXAMPLE_CONFIGS])
def test_the_examples_keep_their_configs(example, server):
    config = grpo_config(
        load_job(ROOT / example).spec,
        output_dir=Path("/ckpt"),
        dtype=torch.float32,
        use_cpu=True,
        generation=Generation(vllm_server_url=server),
    )
    expected = EXAMPLE_CONFIGS[example, server]
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize("rollout_section", [{}, {"maxModelLen": 2048}])
def test_the_trainer_and_the_rollout_server_agree_on_the_context_length(rollout_section):
    spec = parse_spec({**MINIMAL, "rollout": rollout_section})
    command = rollout.vllm_serve_command(JobContext.resolve("j", "ml", spec, OperatorSettings()))
    served = int(command[command.index("--max_model_len") + 1])
    expected = rollout_section.get("maxModelLen", 512 + 3072 + 1024)  # default: prompt + guidance + completion
    assert served == arguments(spec)["vllm_max_model_length"] == expected
