"""Reward functions for TRL's GRPOTrainer, built from the job spec's `rewards` list.

Each function takes TRL's keyword call (`prompts`, `completions`, `completion_ids`, the dataset
columns such as `answer` and `tests`, and TRL's extras), returns one float per completion, and is
named after its reward (`accuracy`, `format`, `code`) because TRL logs `rewards/<__name__>/mean`.
None of them raises on an odd completion: that completion scores 0.0.

The accuracy reward is imported on first use: math_verify brings sympy, and the code reward and
its sandbox child need only the standard library (tests/test_rewards.py holds them to it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from g2rpo.rewards.code import make_code_reward
from g2rpo.rewards.format import format_reward

if TYPE_CHECKING:
    from g2rpo.api.spec import RewardSpec
    from g2rpo.rewards.math_answer import accuracy_reward

__all__ = ["accuracy_reward", "build_reward_functions", "format_reward", "make_code_reward"]


def __getattr__(name: str) -> Any:
    if name == "accuracy_reward":
        from g2rpo.rewards.math_answer import accuracy_reward

        return accuracy_reward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_reward_functions(rewards: list[RewardSpec]) -> list[Callable]:
    """One TRL reward function per spec entry, in order (their weights go to GRPOConfig.reward_weights)."""
    functions: list[Callable] = []
    for reward in rewards:
        if reward.name == "accuracy":
            from g2rpo.rewards.math_answer import accuracy_reward

            functions.append(accuracy_reward)
        elif reward.name == "format":
            functions.append(format_reward)
        elif reward.name == "code":
            functions.append(make_code_reward(timeout_s=reward.timeout_seconds, memory_mb=reward.memory_mb))
        else:
            raise ValueError(f"unknown reward {reward.name!r}")
    return functions
