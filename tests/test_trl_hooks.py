"""Fails loudly when TRL changes what g2rpo relies on: the private GRPOTrainer hooks it overrides.

g2rpo pins trl in pyproject.toml; this test is what makes upgrading that pin a deliberate act.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest
from trl import GRPOTrainer

from g2rpo.train.trainer import PRIVATE_TRL_ATTRIBUTES, PRIVATE_TRL_HOOKS, G2RPOTrainer

PINNED_TRL = "1.16.0"


def test_trl_is_the_pinned_version():
    assert version("trl") == PINNED_TRL, (
        f"g2rpo overrides private GRPOTrainer methods verified against trl=={PINNED_TRL}; "
        f"found trl=={version('trl')}. Re-verify trainer/g2rpo/train/trainer.py, then move the pin."
    )


@pytest.mark.parametrize("name", sorted(PRIVATE_TRL_HOOKS))
def test_overridden_private_hooks_keep_their_signature(name):
    assert hasattr(GRPOTrainer, name), f"TRL's GRPOTrainer no longer has {name}: G2RPOTrainer's override is dead"
    params = tuple(inspect.signature(getattr(GRPOTrainer, name)).parameters)
    assert params == PRIVATE_TRL_HOOKS[name], (
        f"GRPOTrainer.{name}{params} changed; g2rpo expects {PRIVATE_TRL_HOOKS[name]}"
    )
    ours = tuple(inspect.signature(getattr(G2RPOTrainer, name)).parameters)
    assert ours == params, f"G2RPOTrainer.{name} no longer matches TRL's signature"


def _has_private_parameter(method) -> bool:
    return any(p.startswith("_") for p in inspect.signature(method).parameters)


def test_every_private_override_is_declared():
    """Overrides of private methods, and of public ones taking a private parameter, are all listed."""
    overridden = {
        name
        for name, member in vars(G2RPOTrainer).items()
        if not name.startswith("__")
        and callable(member)
        and hasattr(GRPOTrainer, name)
        and (name.startswith("_") or _has_private_parameter(getattr(GRPOTrainer, name)))
    }
    assert overridden == set(PRIVATE_TRL_HOOKS)


def test_private_attributes_used_by_the_hooks_exist(tiny_model_dir, tmp_path):
    from trainer_support import make_trainer

    trainer, _, _ = make_trainer(tiny_model_dir, tmp_path, max_steps=1)
    for attribute in PRIVATE_TRL_ATTRIBUTES:
        assert hasattr(trainer, attribute), f"GRPOTrainer instances no longer have {attribute}"


def test_generate_returns_the_tuple_layout_the_mask_hook_edits():
    """_generate's return order (tool_mask third) is what the guidance-mask hook rewrites."""
    source = inspect.getsource(GRPOTrainer._generate)
    assert (
        "return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images"
        in source
    )
