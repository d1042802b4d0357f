"""Reward functions for TRL's GRPOTrainer, built from the job spec's `rewards` list.

Each function takes TRL's keyword call (`prompts`, `completions`, `completion_ids`, the dataset
columns such as `answer` and `tests`, and TRL's extras), returns one float per completion, and is
named after its reward (`accuracy`, `format`, `code`) because TRL logs `rewards/<__name__>/mean`.
None of them raises on an odd completion: that completion scores 0.0.
"""

from __future__ import annotations

from collections.abc import Callable

from g2rpo.rewards.code import make_code_reward
from g2rpo.rewards.format import format_reward
from g2rpo.rewards.math_answer import accuracy_reward
from g2rpo.spec import RewardSpec

__all__ = ["accuracy_reward", "build_reward_functions", "format_reward", "make_code_reward"]


def build_reward_functions(rewards: list[RewardSpec]) -> list[Callable]:
    """One TRL reward function per spec entry, in order (their weights go to GRPOConfig.reward_weights)."""
    functions: list[Callable] = []
    for reward in rewards:
        if reward.name == "accuracy":
            functions.append(accuracy_reward)
        elif reward.name == "format":
            functions.append(format_reward)
        elif reward.name == "code":
            functions.append(make_code_reward(timeout_s=reward.timeout_seconds, memory_mb=reward.memory_mb))
        else:
            raise ValueError(f"unknown reward {reward.name!r}")
    return functions
