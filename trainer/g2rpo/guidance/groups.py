"""Which groups of a generation batch get guided roll-outs: the paper's rule and `unsolved`.

A rule is chosen by the job spec (`guidance.groups`) and answers, for the *global* batch, one flag
per group; within a guided group the first floor(alpha*G) roll-outs are guided (g2rpo.guidance.rows).
The trainer asks the rule "which groups", never for its name.

- all (paper Eq. 3): every group. Decided before generation.
- unsolved (beyond the paper, after Guide-GRPO, BREAD and Scaf-GRPO, which guide only what the model
  cannot solve alone): every roll-out is first generated unguided and scored on the driving reward; a
  group none of whose roll-outs scored above 0 (all failed; an unscorable roll-out, NaN, counts as
  failed) gets its first floor(alpha*G) roll-outs replaced by guided ones. Groups that some roll-out
  solved keep their own roll-outs, so their advantages are plain GRPO's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GroupRule:
    """`select(probe_rewards, num_generations)` flags each group of the global batch as guided.

    `needs_probe`: the rule reads the driving reward of an unguided generation of the whole batch
    (global row order); otherwise `select` gets None and decides before anything is generated.
    """

    needs_probe: bool
    select: Callable[[Sequence[float] | None, int, int], list[bool]]


def every_group(probe_rewards: Sequence[float] | None, num_groups: int, num_generations: int) -> list[bool]:
    return [True] * num_groups


def unsolved_groups(probe_rewards: Sequence[float] | None, num_groups: int, num_generations: int) -> list[bool]:
    if probe_rewards is None or len(probe_rewards) != num_groups * num_generations:
        raise ValueError(f"unsolved needs the unguided rewards of all {num_groups * num_generations} roll-outs")
    return [
        not any(_solved(r) for r in probe_rewards[g * num_generations : (g + 1) * num_generations])
        for g in range(num_groups)
    ]


def _solved(reward: float) -> bool:
    return not math.isnan(reward) and reward > 0.0


GROUP_RULES: dict[str, GroupRule] = {
    "all": GroupRule(needs_probe=False, select=every_group),
    "unsolved": GroupRule(needs_probe=True, select=unsolved_groups),
}
