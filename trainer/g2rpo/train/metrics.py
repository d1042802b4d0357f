"""Per-step statistics of G2RPO-A, computed from the global batch (all ranks gathered).

- accuracy, accuracy_guided, accuracy_unguided: mean of the driving reward (r_k) over all,
  guided and unguided roll-outs. Guided/unguided are left out when a step has none of them.
- reward_mean, reward_std: the weighted reward sum that GRPO normalises.
- advantage_std: the paper's Figure 5b signal; near zero means GRPO has nothing to learn from.
- zero_std_groups: fraction of groups whose rewards are all equal (zero advantage everywhere).
- guidance_length: l_k used this step; guided_fraction: roll-outs that got guidance tokens;
  guided_groups: groups with at least one such roll-out (below 1 with `guidance.groups: unsolved`).
- completion_length: trained tokens per roll-out (guidance + generated);
  decoded_tokens: generated tokens per roll-out (what the policy wrote).
"""

from __future__ import annotations

import torch


def step_statistics(
    *,
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    driving_index: int,
    guided: torch.Tensor,
    guidance_lengths: torch.Tensor,
    completion_lengths: torch.Tensor,
    advantages: torch.Tensor,
    num_generations: int,
    guidance_length: int,
) -> dict[str, float]:
    driving = rewards_per_func[:, driving_index].float()
    total = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1).float()
    guided = guided.bool()
    stats = {
        "accuracy": torch.nanmean(driving).item(),
        "reward_mean": total.mean().item(),
        "reward_std": _std(total),
        "advantage_std": _std(advantages.float()),
        "zero_std_groups": _zero_std_fraction(total, num_generations),
        "guidance_length": float(guidance_length),
        "guided_fraction": (guidance_lengths > 0).float().mean().item(),
        "guided_groups": (guidance_lengths > 0).view(-1, num_generations).any(dim=1).float().mean().item(),
        "completion_length": completion_lengths.float().mean().item(),
        "decoded_tokens": (completion_lengths - guidance_lengths).float().mean().item(),
    }
    if guided.any():
        stats["accuracy_guided"] = torch.nanmean(driving[guided]).item()
    if (~guided).any():
        stats["accuracy_unguided"] = torch.nanmean(driving[~guided]).item()
    return stats


def _std(values: torch.Tensor) -> float:
    return values.std().item() if values.numel() > 1 else 0.0


def _zero_std_fraction(total: torch.Tensor, num_generations: int) -> float:
    groups = total.view(-1, num_generations)
    spread = groups.max(dim=1).values - groups.min(dim=1).values
    return (spread.abs() < 1e-6).float().mean().item()
