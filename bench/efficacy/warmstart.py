"""Warm start: a tiny character-level Qwen3 model, trained supervised on the easy tiers.

GRPO only sharpens what a policy can already sample; a randomly initialised model samples
nothing that earns a reward. The paper starts from pretrained models. Here the stand-in for
pretraining is a short supervised pass on the easy tiers (reference solutions, loss on the
completion tokens only), which teaches the answer format and one-step arithmetic but leaves the
longer problems of the hard tiers for reinforcement learning.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class WarmStartConfig:
    hidden_size: int = 128
    layers: int = 4
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0


def chat_prompt(tokenizer, problem: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": problem}], add_generation_prompt=True, tokenize=False
    )


def warm_start(folder: Path, rows: list[dict], config: WarmStartConfig, log=print) -> dict:
    """Build the tiny model in `folder`, train it on `rows` (problem, solution) and save it there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from g2rpo.models.tiny import build_tiny_model

    build_tiny_model(folder, hidden_size=config.hidden_size, layers=config.layers, seed=config.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    examples = []
    for row in rows:
        prompt_ids = tokenizer(chat_prompt(tokenizer, row["problem"]), add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt_ids, target_ids))

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = max(1, config.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    started = time.monotonic()
    losses = []
    for step in range(config.steps):
        batch = rng.sample(examples, min(config.batch_size, len(examples)))
        input_ids, labels = _collate(batch, tokenizer.pad_token_id)
        loss = model(
            input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, config.steps // 10) == 0:
            log(f"  warm start step {step + 1}/{config.steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    model.save_pretrained(folder)
    return {"seconds": time.monotonic() - started, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) + len(t) for p, t in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (prompt, target) in enumerate(batch):
        ids = prompt + target
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) : len(ids)] = torch.tensor(target)
    return input_ids, labels
