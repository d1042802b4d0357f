"""Which roll-outs of a group are guided, and how guidance joins a prompt at the token level.

Rounding: every group of G roll-outs guides its first floor(alpha*G) roll-outs (paper Eq. 3,
|g_i| = l for i <= alpha*G); the job spec refuses an alpha > 0 that floors to no guided roll-out.

TRL lays a generation batch out as consecutive groups over the *global* batch, rank 0's rows
first, so a row's place in its group is (rank * rows_per_rank + i) mod G. Computing it from the
global index makes the same rows guided whatever the number of ranks or the per-device batch.
"""

from __future__ import annotations

from collections.abc import Sequence


def guided_rows(
    num_rows: int,
    global_offset: int,
    num_generations: int,
    guided_per_group: int,
    guided_groups: Sequence[bool] | None = None,
) -> list[bool]:
    """For each local row, whether it is one of the guided roll-outs of its group.

    `guided_groups` (indexed by global group, see g2rpo.guidance.groups) leaves the rows of unflagged
    groups unguided; None guides every group.
    """
    return [
        (j := global_offset + i) % num_generations < guided_per_group
        and (guided_groups is None or guided_groups[j // num_generations])
        for i in range(num_rows)
    ]


def join_guidance(prompt_ids: list[list[int]], guidance_ids: list[list[int]]) -> list[list[int]]:
    """Generation inputs: each prompt's token ids followed by its guidance token ids (never re-tokenised)."""
    return [list(p) + list(g) for p, g in zip(prompt_ids, guidance_ids, strict=True)]


def prepend_guidance(
    guidance_ids: list[list[int]],
    completion_ids: list[list[int]],
    logprobs: list[list[float]] | None,
    eos_token_id: int | None = None,
) -> tuple[list[list[int]], list[list[float | None]] | None]:
    """Completions as trained: guidance ids then generated ids.

    Guidance tokens were not sampled, so they have no sampling log-prob: they get None, which TRL
    reads as "unknown" (NaN) and turns into an importance-sampling ratio of exactly 1.

    A guidance that ends with `eos_token_id` is a whole reference trajectory (l_k reached its end):
    the row is that trajectory and nothing after it, so that a fully guided roll-out teaches the
    policy to stop where the reference stops rather than to ramble on to maxCompletionLength.
    """

    def complete(guidance: list[int]) -> bool:
        return eos_token_id is not None and bool(guidance) and guidance[-1] == eos_token_id

    generated = [[] if complete(g) else list(c) for g, c in zip(guidance_ids, completion_ids, strict=True)]
    completions = [list(g) + c for g, c in zip(guidance_ids, generated, strict=True)]
    if logprobs is None:
        return completions, None
    return completions, [
        [None] * len(g) + ([] if complete(g) else list(lp)) for g, lp in zip(guidance_ids, logprobs, strict=True)
    ]


def generated_token_mask(guidance_lengths: list[int], completion_ids: list[list[int]]) -> list[list[int]]:
    """1 for generated tokens, 0 for guidance tokens: the loss mask of `guidance.loss: mask`."""
    return [[0] * g + [1] * (len(c) - g) for g, c in zip(guidance_lengths, completion_ids, strict=True)]
