"""LoRA (spec.model.lora) on real peft 0.21.2 + TRL 1.16 + the tiny model.

What is real: PEFT's adapters, TRL's GRPOTrainer and its vLLM weight-sync code
(trl/generation/vllm_generation.py, VLLMGeneration._iter_named_params and sync_weights), transformers'
checkpointing and resume of an adapter. What is a stand-in: the vLLM server itself (CUDA only), replaced
by a recorder of what TRL's VLLMClient.update_named_params would stream to it, as in tests/test_vllm_path.py.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil

import pytest
import test_trainer_guidance
import test_vllm_path
import torch
import yaml
from safetensors.torch import load_file
from trl.generation.vllm_generation import VLLMGeneration

from g2rpo.api.spec import G2RPOJob, LoraSpec, SpecError, load_job, parse_spec
from g2rpo.train.lora import lora_config, trainable_parameters
from g2rpo.train.trainer import GUIDANCE_STATE_FILE, G2RPOTrainer

from trainer_support import ScriptedReward, make_trainer

# alpha/rank = 4: a merged update visibly different from the base weights.
LORA = LoraSpec(rank=4, alpha=16, target_modules=["all-linear"])


class ParityReward(ScriptedReward):
    """1 for completions whose token ids sum to an even number: rewards differ inside a group, so every step
    has non-zero advantages and changes the adapter."""

    def __call__(self, prompts, completions, completion_ids, guidance, **kwargs):
        super().__call__(prompts, completions, completion_ids, guidance, **kwargs)
        return [float(sum(ids) % 2 == 0) for ids in completion_ids]


class LengthReward(ScriptedReward):
    """The completion's length in tokens."""

    def __call__(self, prompts, completions, completion_ids, guidance, **kwargs):
        super().__call__(prompts, completions, completion_ids, guidance, **kwargs)
        return [float(len(ids)) for ids in completion_ids]


# --- the spec ------------------------------------------------------------------------------------------


def _spec(**lora):
    return parse_spec({"model": {"name": "m", "lora": lora}, "dataset": {"name": "builtin:arithmetic"}})


def test_lora_fields_map_to_peft_and_absent_means_full_fine_tuning():
    assert parse_spec({"model": {"name": "m"}, "dataset": {"name": "builtin:arithmetic"}}).model.lora is None
    spec = _spec(rank=8, alpha=32, dropout=0.1, targetModules=["q_proj", "v_proj"], saveMerged=True)
    config = lora_config(spec.model.lora, revision="abc")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.1)
    assert config.target_modules == {"q_proj", "v_proj"} and config.revision == "abc"
    assert config.task_type == "CAUSAL_LM" and spec.model.merged_final
    # PEFT reads its all-linear shorthand only as a string (peft/tuners/tuners_utils.py,
    # _maybe_include_all_linear_layers); absent targets leave PEFT's per-architecture default.
    assert lora_config(_spec(targetModules=["all-linear"]).model.lora).target_modules == "all-linear"
    assert lora_config(_spec().model.lora).target_modules is None
    assert not _spec().model.merged_final


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"rank": 0}, "spec.model.lora.rank"),
        ({"alpha": 0}, "spec.model.lora.alpha"),
        ({"dropout": 1}, "spec.model.lora.dropout"),
        ({"targetModules": ["all-linear", "q_proj"]}, "all-linear already names every linear layer"),
        ({"rnak": 8}, "spec.model.lora.rnak"),
    ],
)
def test_bad_lora_fields_are_named(lora, message):
    with pytest.raises(SpecError) as error:
        _spec(**lora)
    assert message in "\n".join(error.value.lines())


def test_target_modules_the_model_lacks_are_a_spec_error(tiny_model_dir, tmp_path):
    from g2rpo.controller.client import InProcessGuidanceClient
    from g2rpo.controller.core import GuidanceController
    from g2rpo.train.build import RunLayout, build_trainer

    job = G2RPOJob.model_validate(
        yaml.safe_load(LOCAL_JOB.format(model=tiny_model_dir, lora="{targetModules: [c_attn]}", steps=1))
    )
    with pytest.raises(SpecError) as error:
        build_trainer(
            job,
            RunLayout.for_job(job, tmp_path),
            guidance_client_factory=lambda params: InProcessGuidanceClient(GuidanceController(params)),
        )
    assert error.value.lines() == [
        "spec.model.lora.targetModules: Target modules {'c_attn'} not found in the base model"
    ], error.value.lines()


# --- what TRL sends to the vLLM server -----------------------------------------------------------------


class RecordingServer:
    """Stand-in for TRL's VLLMClient: records the (metadata, tensors) that update_named_params would stream
    over NCCL to `trl vllm-serve`."""

    def __init__(self):
        self.pushes: list[tuple[list, list[tuple[str, torch.Tensor]]]] = []

    def update_named_params(self, metadata, named_params):
        self.pushes.append((metadata, [(name, tensor.detach().clone()) for name, tensor in named_params]))

    def reset_prefix_cache(self):
        pass


class CapturedSync(VLLMGeneration):
    """TRL's own VLLMGeneration in server mode, with the recorder in place of the network client; before each
    sync it also records what the merged model holds (peft's merge_and_unload of a copy), for comparison."""

    def _init_vllm(self):  # the real one connects to the server
        self.vllm_client = RecordingServer()
        self.expected: list[dict[str, torch.Tensor]] = []

    def sync_weights(self):
        merged = copy.deepcopy(self.model).merge_and_unload()
        self.expected.append({name: p.detach().clone() for name, p in merged.named_parameters()})
        super().sync_weights()

    def generate(self, prompts, images, num_generations, profiler=None):
        return test_vllm_path.FakeVLLMGeneration.generate(self, prompts, images, num_generations, profiler)


def _captured_sync(trainer, tokenizer) -> CapturedSync:
    sync = CapturedSync(model=trainer.model, accelerator=trainer.accelerator, processing_class=tokenizer, mode="server")
    sync.eos_token_id = tokenizer.eos_token_id
    sync.tokens = tokenizer("42", add_special_tokens=False)["input_ids"]
    sync.requests = []
    return sync


def test_a_peft_sync_pushes_the_merged_weights_under_the_base_models_names(tiny_model_dir, tmp_path):
    """TRL merges the adapter, streams every base tensor under the plain model's name, and unmerges."""
    trainer, _, tokenizer = make_trainer(tiny_model_dir, tmp_path, lora=LORA, max_steps=1)
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (merged == base); give the adapter a real update
                parameter.normal_(std=0.05)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sync = _captured_sync(trainer, tokenizer)
    sync.sync_weights()

    (metadata, pushed), expected = sync.vllm_client.pushes[0], sync.expected[0]
    assert [name for name, _ in pushed] == list(expected), "the plain model's parameter names, in its order"
    assert not any(name.startswith("base_model.") or "lora_" in name or "base_layer" in name for name, _ in pushed)
    assert [(n, d, s) for n, d, s in metadata] == [
        (name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in pushed
    ]
    for name, tensor in pushed:
        assert torch.allclose(tensor, expected[name], atol=1e-6, rtol=0), name
    base = AutoBase.load(tiny_model_dir)
    changed = [name for name, tensor in pushed if not torch.equal(tensor, base[name])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.norm.weight" not in changed
    after = dict(model.named_parameters())
    drift = {name: (after[name] - value).abs().max().item() for name, value in before.items()}
    print("largest base-weight change after merge + unmerge:", max(drift.values()))
    assert all(torch.equal(after[name], before[name]) for name in before if "lora_" in name), "the adapter is kept"
    # Unmerging subtracts the update it added: the frozen base weights come back up to float rounding only.
    assert max(drift.values()) < 1e-6, "unmerged after the sync"


class AutoBase:
    @staticmethod
    def load(model_dir) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM

        return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}


def test_lora_on_the_vllm_path_syncs_each_step_and_keeps_guidance_token_exact(tiny_model_dir, tmp_path):
    """Two real training steps through TRL's server-mode generation path: the second sync carries the
    adapter's first update, merged; guided rows still go to the server as prompt + guidance ids, n=1."""
    reward = LengthReward()  # the stand-in server writes the same tokens for every row: guided rows are longer
    trainer, _, tokenizer = make_trainer(
        tiny_model_dir, tmp_path, lora=LORA, guided_per_group=2, initial_length=5, max_steps=2, reward=reward
    )
    sync = _captured_sync(trainer, tokenizer)
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, sync, -1
    trainer.train()

    assert len(sync.vllm_client.pushes) == 2, "one sync per optimizer step"
    first, second = (dict(pushed) for _, pushed in sync.vllm_client.pushes)
    for name, tensor in second.items():
        assert torch.allclose(tensor, sync.expected[1][name], atol=1e-6, rtol=0), name
    assert not torch.equal(
        first["model.layers.0.self_attn.q_proj.weight"], second["model.layers.0.self_attn.q_proj.weight"]
    )
    for request, call in zip(sync.requests, reward.calls, strict=True):
        assert request["num_generations"] == 1
        for row, prompt in enumerate(request["prompts"]):
            if row % 4 < 2:
                assert prompt[-5:] == tokenizer(call["guidance"][row], add_special_tokens=False)["input_ids"][:5]


# --- G2RPO with LoRA -----------------------------------------------------------------------------------

GUIDANCE_TESTS = [
    functools.partial(
        test_trainer_guidance.test_guided_rows_start_with_exactly_the_first_l_k_guidance_ids,
        num_generations=4,
        guided_per_group=2,
        groups_per_step=2,
    ),
    test_trainer_guidance.test_a_whole_trajectory_as_guidance_ends_the_roll_out_with_eos,
    test_trainer_guidance.test_guidance_is_joined_at_token_level_not_retokenised,
    test_trainer_guidance.test_mask_removes_exactly_the_guidance_tokens_from_the_loss,
    test_trainer_guidance.test_masked_guidance_changes_the_loss,
    test_trainer_guidance.test_adaptive_schedule_follows_the_reward_sequence,
    test_trainer_guidance.test_metrics_separate_guided_and_unguided_rewards,
]


@pytest.mark.parametrize("guidance_test", GUIDANCE_TESTS, ids=lambda t: getattr(t, "func", t).__name__)
def test_the_guidance_tests_pass_with_lora(guidance_test, tiny_model_dir, tmp_path, monkeypatch):
    """tests/test_trainer_guidance.py's own tests, run with every trainer they build on a LoRA model."""
    monkeypatch.setattr(test_trainer_guidance, "make_trainer", functools.partial(make_trainer, lora=LORA))
    guidance_test(tiny_model_dir=tiny_model_dir, tmp_path=tmp_path)


def test_alpha_zero_with_lora_is_trls_grpo_trainer_with_the_same_peft_config(tiny_model_dir, tmp_path):
    """guidance.ratio 0: the same roll-outs, losses and adapter weights as TRL's own GRPOTrainer."""
    from trl import GRPOTrainer

    class PlainTRL(GRPOTrainer):
        """TRL's GRPOTrainer, taking (and ignoring) the G2RPO arguments make_trainer passes."""

        def __init__(
            self,
            *args,
            guidance_client,
            guided_per_group,
            guidance_loss,
            driving_reward,
            guidance_groups,
            sandbox_layers,
            **kw,
        ):
            super().__init__(*args, **kw)

    runs = {}
    for name, cls in (("g2rpo", G2RPOTrainer), ("trl", PlainTRL)):
        reward = ParityReward()
        trainer, _, _ = make_trainer(
            tiny_model_dir,
            tmp_path / name,
            lora=LORA,
            guided_per_group=0,
            max_steps=2,
            reward=reward,
            trainer_class=cls,
        )
        trainer.train()
        losses = [(r["loss"], r["grad_norm"]) for r in trainer.state.log_history if "loss" in r]
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[name] = (reward.calls, losses, adapter)
    (g_calls, g_losses, g_adapter), (t_calls, t_losses, t_adapter) = runs["g2rpo"], runs["trl"]
    assert [c["completion_ids"] for c in g_calls] == [c["completion_ids"] for c in t_calls]
    assert g_losses == t_losses and any(grad > 0 for _, grad in g_losses), "a real update, equal to TRL's"
    assert g_adapter.keys() == t_adapter.keys() and all(torch.equal(g_adapter[n], t_adapter[n]) for n in g_adapter)


# --- checkpoints and resume ----------------------------------------------------------------------------


def test_a_lora_checkpoint_holds_the_adapter_optimizer_and_guidance_and_resumes_exactly(tiny_model_dir, tmp_path):
    schedule = {"schedule": "adaptive", "initial_length": 8, "min_length": 1, "max_length": 40}
    full, _, _ = make_trainer(
        tiny_model_dir, tmp_path / "a", lora=LORA, reward=ParityReward(), max_steps=4, save_steps=2, **schedule
    )
    trainable, total = trainable_parameters(full.model)
    assert 0 < trainable < total / 2
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", GUIDANCE_STATE_FILE} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, "the adapter only, not the base model"
    assert set(load_file(checkpoint / "adapter_model.safetensors")) == {
        n.replace(".default", "") for n, p in full.model.named_parameters() if p.requires_grad
    }
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert sum(s["exp_avg"].numel() for s in optimizer_state.values()) == trainable, "AdamW state of the adapter only"

    resumed, _, _ = make_trainer(
        tiny_model_dir, tmp_path / "b", lora=LORA, reward=ParityReward(), max_steps=4, save_steps=2, **schedule
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    compared = ("loss", "grad_norm", "reward", "g2rpo/guidance_length", "g2rpo/accuracy")
    steps = {
        run: {r["step"]: {k: r.get(k) for k in compared} for r in t.state.log_history if "loss" in r and r["step"] > 2}
        for run, t in (("full", full), ("resumed", resumed))
    }
    assert steps["full"] == steps["resumed"] and len(steps["full"]) == 2
    assert any(v["grad_norm"] > 0 for v in steps["full"].values())
    final = dict(full.model.named_parameters())
    assert all(torch.equal(final[n], p) for n, p in resumed.model.named_parameters()), "the same weights"
    assert resumed.guidance_length == full.guidance_length


# --- the local run, final model, merged copy and eval -------------------------------------------------

# Whole reference solutions as guidance: guided roll-outs earn the accuracy reward, unguided ones do not, so
# each step has advantages and changes the adapter.
LOCAL_JOB = """\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: tiny-lora}}
spec:
  model: {{name: "{model}", lora: {lora}}}
  dataset:
    name: builtin:arithmetic
    arithmetic: {{numProblems: 24, minSteps: 1, maxSteps: 3}}
    guidanceColumn: solution
  rewards: [{{name: accuracy}}, {{name: format, weight: 0.1}}]
  guidance: {{ratio: 0.5, schedule: fixed, initialLength: 64, minLength: 2, maxLength: 64}}
  training: {{numGenerations: 4, perDeviceBatchSize: 4, maxSteps: {steps}, maxCompletionLength: 8, learningRate: 1.0e-3}}
  checkpoint: {{everySteps: 2, keep: 2}}
"""


@pytest.mark.slow
def test_local_lora_run_saves_adapter_and_merged_model_and_eval_loads_both(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from g2rpo.cli import main
    from g2rpo.local.run import run_local
    from g2rpo.train.lora import load_merged

    job_file = tmp_path / "job.yaml"
    lora = "{rank: 4, alpha: 16, targetModules: [all-linear], saveMerged: true}"
    job_file.write_text(LOCAL_JOB.format(model=tiny_model_dir, lora=lora, steps=2))
    out = tmp_path / "run"
    # In process, with the held-out check (it generates with the PEFT model) on 4 problems.
    result = run_local(load_job(job_file), out, progress=False, heldout_problems=4)
    assert result.final_step == 2 and "heldout_accuracy_after" in result.summary
    final, merged = out / "final", out / "final-merged"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in final.iterdir()
    }
    assert not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert (merged / "config.json").is_file() and (merged / "README.md").is_file()
    assert not (out / "final-merged.partial").exists()

    ids = torch.tensor([[5, 6, 7, 8]])
    from_adapter = load_merged(final)(ids).logits
    from_merged = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert torch.allclose(from_adapter, from_merged, atol=1e-5)
    assert not torch.allclose(from_merged, base, atol=1e-4), "the merged model carries the trained adapter"

    capsys.readouterr()
    results = {}
    for name, folder in (("adapter", final), ("merged", merged)):
        output = tmp_path / f"{name}.json"
        args = ["eval", str(folder), "--job", str(job_file), "--task", "math", "--limit", "4", "--samples", "1"]
        args += ["--max-new-tokens", "6", "--no-progress", "--backend", "transformers", "--output", str(output)]
        assert main(args) == 0, capsys.readouterr().err
        results[name] = json.loads(output.read_text())
    assert [p["completions"] for p in results["adapter"]["per_problem"]] == [
        p["completions"] for p in results["merged"]["per_problem"]
    ]
    # The job file as MODEL means its final model: the adapter folder.
    args = ["eval", str(job_file), "--run-dir", str(out), "--task", "math", "--limit", "2", "--samples", "1"]
    assert main([*args, "--max-new-tokens", "4", "--no-progress", "--backend", "transformers"]) == 0
    shutil.rmtree(merged)
    assert main([*args, "--backend", "vllm"]) == 2
    assert "is a LoRA adapter and vLLM needs a whole model" in capsys.readouterr().err


def test_the_lora_example_is_the_embedded_default_with_lora():
    """examples/smollm2-arithmetic-lora.yaml starts with the command that runs it and differs from the
    embedded default only by its name, LoRA and a learning rate fit for LoRA."""
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    path = examples / "smollm2-arithmetic-lora.yaml"
    assert path.read_text().splitlines()[0] == "# g2rpo run examples/smollm2-arithmetic-lora.yaml"
    lora, base = load_job(path), load_job(examples / "smollm2-arithmetic.yaml")
    assert lora.spec.model.lora == LoraSpec(rank=16, alpha=32, target_modules=["all-linear"], save_merged=True)
    assert lora.spec.training.learning_rate == pytest.approx(10 * base.spec.training.learning_rate)
    unchanged = lora.spec.model_copy(
        update={
            "model": lora.spec.model.model_copy(update={"lora": None}),
            "training": lora.spec.training.model_copy(update={"learning_rate": base.spec.training.learning_rate}),
        }
    )
    assert unchanged == base.spec


def test_the_model_card_says_what_was_trained():
    from pathlib import Path

    from g2rpo.train.model_card import model_card

    examples = Path(__file__).resolve().parents[1] / "examples"
    lora = model_card(load_job(examples / "smollm2-arithmetic-lora.yaml"))
    assert "- Weights trained: a LoRA adapter (PEFT; rank 16, alpha 32, dropout 0, on all-linear)" in lora
    full = model_card(load_job(examples / "smollm2-arithmetic.yaml"))
    assert "- Weights trained: all (full fine-tuning)" in full
