"""G2RPOTrainer on real TRL + the tiny model: where guidance goes, what it is, how it is trained."""

from __future__ import annotations

import json
import math

import pytest
import torch

from g2rpo.guidance.schedule import ScheduleParams, lengths_for

from trainer_support import ScriptedReward, make_trainer


def _guidance_ids(tokenizer, text, length):
    return tokenizer(text, add_special_tokens=False)["input_ids"][:length]


@pytest.mark.parametrize(
    ("num_generations", "guided_per_group", "groups_per_step"),
    [(4, 1, 1), (4, 2, 2), (6, 2, 1), (3, 3, 1), (5, 3, 2), (4, 0, 1)],
)
def test_guided_rows_start_with_exactly_the_first_l_k_guidance_ids(
    tiny_model_dir, tmp_path, num_generations, guided_per_group, groups_per_step
):
    length = 6
    trainer, reward, tokenizer = make_trainer(
        tiny_model_dir,
        tmp_path,
        num_generations=num_generations,
        guided_per_group=guided_per_group,
        groups_per_step=groups_per_step,
        initial_length=length,
        max_steps=2,
    )
    trainer.train()
    assert len(reward.calls) == 2
    for call in reward.calls:
        assert len(call["completion_ids"]) == num_generations * groups_per_step
        for row, (ids, guidance) in enumerate(zip(call["completion_ids"], call["guidance"], strict=False)):
            expected = _guidance_ids(tokenizer, guidance, length)
            if row % num_generations < guided_per_group:
                assert ids[:length] == expected, f"row {row} should start with the guidance ids"
                assert len(ids) > length, "a guided roll-out still generates after its guidance"
            else:
                assert ids[:length] != expected, f"row {row} is unguided but starts with the guidance"


def test_a_whole_trajectory_as_guidance_ends_the_roll_out_with_eos(tiny_model_dir, tmp_path):
    """l_k beyond the reference's end: the guided roll-out is the reference and its EOS, nothing generated after."""
    trainer, reward, tokenizer = make_trainer(tiny_model_dir, tmp_path, initial_length=64, max_length=64, max_steps=1)
    trainer.train()
    call = reward.calls[0]
    full = tokenizer(call["guidance"][0], add_special_tokens=False)["input_ids"]
    assert len(full) < 64
    assert call["completion_ids"][0] == [*full, tokenizer.eos_token_id]
    assert call["completion_ids"][1][: len(full)] != full  # the unguided rows of the group generate


def test_prepend_guidance_keeps_generation_after_a_partial_guidance_only():
    from g2rpo.guidance.rows import prepend_guidance

    eos = 0
    completions, logprobs = prepend_guidance(
        [[5, 6], [5, 6, 7, eos], []], [[8, eos], [9, 9], [4]], [[-0.1, -0.2], [-0.3, -0.4], [-0.5]], eos_token_id=eos
    )
    assert completions == [[5, 6, 8, eos], [5, 6, 7, eos], [4]]
    assert logprobs == [[None, None, -0.1, -0.2], [None] * 4, [-0.5]]


def test_guidance_is_joined_at_token_level_not_retokenised(tiny_model_dir, tmp_path):
    """A guidance cut mid-word stays cut: the ids are the tokeniser's ids of the trajectory alone."""
    trainer, reward, tokenizer = make_trainer(tiny_model_dir, tmp_path, initial_length=3, max_steps=1)
    trainer.train()
    call = reward.calls[0]
    assert call["completion_ids"][0][:3] == tokenizer(call["guidance"][0], add_special_tokens=False)["input_ids"][:3]


def test_code_sandbox_layers_go_with_every_step_report(tiny_model_dir, tmp_path):
    """Jobs with a code reward report the sandbox's layers each step (the controller exports them and the
    operator turns them into the SandboxIsolated condition): the real probe's layer names, as numbers the
    controller's report schema accepts."""
    from g2rpo.controller.core import GuidanceController
    from g2rpo.controller.metrics import REPORT_METRICS, SANDBOX_LAYERS
    from g2rpo.rewards.sandbox import sandbox_layers

    layers = sandbox_layers()
    assert sorted(layers) == sorted(SANDBOX_LAYERS)
    controller = GuidanceController(ScheduleParams(schedule="fixed", initial_length=3, min_length=0, max_length=64))
    trainer, _, _ = make_trainer(
        tiny_model_dir, tmp_path, max_steps=1, controller=controller, sandbox_layers={**layers, "seccomp": False}
    )
    trainer.train()
    reported = controller.history[-1].metrics
    assert {name: reported[f"sandbox_{name}"] for name in layers} == {
        **{k: float(v) for k, v in layers.items()},
        "seccomp": 0.0,
    }
    assert all(REPORT_METRICS[name].low <= value <= REPORT_METRICS[name].high for name, value in reported.items())


class RecordingTrainer:
    """Mixin recording every scored generation batch TRL hands to the loss."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded = [*getattr(self, "recorded", []), output]
        return output


def _recording(loss_mode, tiny_model_dir, tmp_path):
    from g2rpo.train.trainer import G2RPOTrainer

    cls = type("Recording", (RecordingTrainer, G2RPOTrainer), {})
    trainer, _reward, _tokenizer = make_trainer(
        tiny_model_dir,
        tmp_path / loss_mode,
        guided_per_group=2,
        initial_length=5,
        guidance_loss=loss_mode,
        max_steps=1,
        trainer_class=cls,
        reward=ScriptedReward([1.0]),
    )
    trainer.train()
    return trainer


def test_mask_removes_exactly_the_guidance_tokens_from_the_loss(tiny_model_dir, tmp_path):
    masked = _recording("mask", tiny_model_dir, tmp_path).recorded[0]
    included = _recording("include", tiny_model_dir, tmp_path).recorded[0]
    assert "tool_mask" not in included
    tool_mask = masked["tool_mask"]
    completion_mask = masked["completion_mask"]
    for row in range(tool_mask.size(0)):
        guided = row % 4 < 2
        head = tool_mask[row, :5].tolist()
        assert head == ([0] * 5 if guided else [1] * 5)
        assert torch.all(tool_mask[row, 5:][completion_mask[row, 5:].bool()] == 1)


def test_masked_guidance_changes_the_loss(tiny_model_dir, tmp_path):
    trainer = _recording("mask", tiny_model_dir, tmp_path)
    batch = dict(trainer.recorded[0])
    batch["advantages"] = torch.linspace(-1.0, 1.0, batch["advantages"].numel())
    trainer.model.train()
    masked_loss = trainer.compute_loss(trainer.model, batch)
    included_loss = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "tool_mask"})
    assert torch.isfinite(masked_loss) and torch.isfinite(included_loss)
    assert not math.isclose(masked_loss.item(), included_loss.item(), rel_tol=1e-6)


def test_adaptive_schedule_follows_the_reward_sequence(tiny_model_dir, tmp_path):
    rewards = [0.5, 0.25, 0.5, 0.0, 1.0, 0.5]
    trainer, reward, _ = make_trainer(
        tiny_model_dir,
        tmp_path,
        schedule="adaptive",
        initial_length=8,
        min_length=1,
        max_length=40,
        reward=ScriptedReward(rewards),
        max_steps=len(rewards),
    )
    trainer.train()
    params = ScheduleParams(schedule="adaptive", initial_length=8, min_length=1, max_length=40, window=2)
    expected = lengths_for(params, rewards)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    used = [r["g2rpo/guidance_length"] for r in logged if "g2rpo/guidance_length" in r]
    assert used == expected[: len(rewards)]
    assert trainer.guidance_length == expected[-1]
    # The guided rows really carried those lengths.
    for k, call in enumerate(reward.calls):
        guided_ids = call["completion_ids"][0]
        assert len(guided_ids) >= min(expected[k], len(call["guidance"][0]))
    # reward 0 at step 3 grew the guidance instead of freezing it
    assert expected[4] > expected[3]


def test_metrics_separate_guided_and_unguided_rewards(tiny_model_dir, tmp_path):
    class GuidedWins(ScriptedReward):
        def __call__(self, prompts, completions, completion_ids, guidance, **kwargs):
            super().__call__(prompts, completions, completion_ids, guidance, **kwargs)
            g = self._tokenizer(guidance[0], add_special_tokens=False)["input_ids"][:6]
            return [1.0 if list(ids[:6]) == g else 0.0 for ids in completion_ids]

    reward = GuidedWins()
    trainer, _, tokenizer = make_trainer(tiny_model_dir, tmp_path, guided_per_group=1, reward=reward, max_steps=2)
    reward._tokenizer = tokenizer
    trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "g2rpo/accuracy" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["g2rpo/accuracy_guided"] == 1.0
        assert r["g2rpo/accuracy_unguided"] == 0.0
        assert r["g2rpo/accuracy"] == pytest.approx(0.25)
        assert r["g2rpo/guided_fraction"] == pytest.approx(0.25)
        assert r["g2rpo/advantage_std"] > 0.5
        assert r["g2rpo/zero_std_groups"] == 0.0
        assert r["g2rpo/decoded_tokens"] < r["g2rpo/completion_length"]
        assert "loss" in r
