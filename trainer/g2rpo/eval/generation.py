"""Sampling k completions per prompt: transformers (CPU or one GPU) or vLLM.

Both backends take prompts as token ids, built by the chat template exactly as TRL builds them
in training (`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`), and return,
per prompt and sample, the completion's token ids (up to and including the first EOS) and
whether it was cut at `max_new_tokens` without an EOS. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampling:
    samples: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # up to and including the first EOS
    truncated: bool  # reached max_new_tokens without an EOS


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the generation config's EOS ids and the tokenizer's (as TRL)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


def transformers_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    sampling: Sampling,
    *,
    batch_size: int,
    progress: bool,
) -> list[list[Completion]]:
    """k completions per prompt with `model.generate`, batched with left padding.

    Rows are (prompt, sample) pairs, longest prompts first so that a batch pads little; batch b
    samples with the torch seed `sampling.seed + b`, so the same call gives the same completions.
    The caller's random state is left as it was (an evaluation inside a training run must not
    reseed the training).
    """
    import torch
    from transformers import GenerationConfig

    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not sampling.greedy,
        temperature=sampling.temperature if not sampling.greedy else None,
        top_p=sampling.top_p if not sampling.greedy else None,
        top_k=sampling.top_k if not sampling.greedy else None,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    rows = [(p, s) for p in range(len(prompt_ids)) for s in range(sampling.samples)]
    rows.sort(key=lambda row: -len(prompt_ids[row[0]]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[list[Completion | None]] = [[None] * sampling.samples for _ in prompt_ids]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        try:
            _generate_batches(model, prompt_ids, batches, results, config, eos, pad, device, sampling, progress)
        finally:
            model.train(was_training)
    return results  # type: ignore[return-value]


def _generate_batches(model, prompt_ids, batches, results, config, eos, pad, device, sampling, progress) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    # Counted in decoding steps, not batches: on a CPU one batch of a 135M model takes minutes, and a bar
    # that moves only when a batch ends looks hung.
    bar = tqdm(total=len(batches) * sampling.max_new_tokens, desc="generating", unit="tok", disable=not progress)
    for index, batch in enumerate(batches):
        bar.set_postfix_str(f"batch {index + 1}/{len(batches)}")
        width = max(len(prompt_ids[p]) for p, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, _) in enumerate(batch):
            ids = prompt_ids[p]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        torch.manual_seed(sampling.seed + index)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([_CountSteps(bar)]),
            )
        bar.update((index + 1) * sampling.max_new_tokens - bar.n)  # a batch that ended early on EOS
        for row, (p, s) in enumerate(batch):
            results[p][s] = _until_eos(output[row, width:].tolist(), eos, sampling.max_new_tokens)
    bar.close()


class _CountSteps:
    """A stopping criterion that never stops: it moves the bar one step per decoded token."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def vllm_generate(model_path: str, prompt_ids: Sequence[list[int]], sampling: Sampling) -> list[list[Completion]]:
    """k completions per prompt with vLLM (one engine, the whole set in one call).

    Untested here: vLLM needs a CUDA GPU, and none of this project's CI machines has one. It uses
    only vLLM's stable offline API (LLM.generate with token-id prompts, SamplingParams(n, seed)).
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_path, seed=sampling.seed)
    params = SamplingParams(
        n=sampling.samples,
        temperature=sampling.temperature,
        top_p=sampling.top_p if not sampling.greedy else 1.0,
        top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else -1,
        max_tokens=sampling.max_new_tokens,
        seed=sampling.seed,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params)
    return [
        [
            Completion(token_ids=list(choice.token_ids), truncated=choice.finish_reason == "length")
            for choice in out.outputs
        ]
        for out in outputs
    ]


def vllm_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _until_eos(generated: list[int], eos: list[int], max_new_tokens: int) -> Completion:
    for index, token in enumerate(generated):
        if token in eos:
            return Completion(token_ids=generated[: index + 1], truncated=False)
    return Completion(token_ids=generated[:max_new_tokens], truncated=True)
