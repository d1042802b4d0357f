"""A tiny Qwen3-architecture model with a character-level tokenizer, built offline.

Tests and benchmarks need a real causal LM and a real tokenizer (chat template, pad and EOS
tokens, batched generation) without downloading anything: this one saves to a folder that
`from_pretrained` loads like any hub model, and a GRPO step on it takes a fraction of a second.
"""

from __future__ import annotations

import string
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]


def build_tiny_model(folder: str | Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a randomly initialised tiny Qwen3 model and its tokenizer to `folder`; returns it."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    folder = Path(folder)
    characters = sorted(set(string.printable))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<|unk|>",
        bos_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=vocab["<|pad|>"],
        eos_token_id=vocab["<|im_end|>"],
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
