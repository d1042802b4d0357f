"""`guidance.groups: unsolved` (beyond the paper): only groups whose unguided roll-outs all failed are guided.

Real TRL and the tiny model; the rewards are scripted by prompt, so which groups are solved is known.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_vllm_path import FakeVLLMGeneration
from trl import GRPOTrainer

from g2rpo.guidance.groups import GROUP_RULES, unsolved_groups
from g2rpo.guidance.rows import guided_rows
from g2rpo.train.trainer import G2RPOTrainer

from trainer_support import ScriptedReward, make_trainer


def test_unsolved_flags_groups_with_no_success_only():
    rewards = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, float("nan"), 0.0, 0.5, 0.5, 0.5, 0.5]
    assert unsolved_groups(rewards, 3, 4) == [False, True, False]
    assert unsolved_groups([-1.0, 0.0], 1, 2) == [True], "a negative score is no success"
    with pytest.raises(ValueError, match="unguided rewards of all 8 roll-outs"):
        unsolved_groups([*rewards[:8], 0.0], 2, 4)
    assert GROUP_RULES["all"].select(None, 3, 4) == [True, True, True]
    assert not GROUP_RULES["all"].needs_probe and GROUP_RULES["unsolved"].needs_probe


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_guided_rows_of_chosen_groups_do_not_depend_on_the_rank_layout(ranks):
    groups, g, k = [True, False, True, False], 4, 2
    one = guided_rows(16, 0, g, k, groups)
    assert one == [i % g < k and groups[i // g] for i in range(16)]
    per = 16 // ranks
    assert [flag for r in range(ranks) for flag in guided_rows(per, r * per, g, k, groups)] == one
    assert guided_rows(16, 0, g, k, None) == guided_rows(16, 0, g, k)


class SolvedByPrompt(ScriptedReward):
    """1.0 for every roll-out of the prompts named in `solved` (by their number), else 0.0."""

    def __init__(self, solved: set[int]):
        super().__init__()
        self.solved = solved

    def __call__(self, prompts, completions, completion_ids, guidance, **kwargs):
        super().__call__(prompts, completions, completion_ids, guidance, **kwargs)
        return [1.0 if _number(p) in self.solved else 0.0 for p in prompts]


def _number(prompt) -> int:
    return int(prompt[0]["content"].split(":")[0].removeprefix("Problem "))


def _unsolved_trainer(tiny_model_dir, tmp_path, **kwargs):
    # Problems 0 and 1 make step 0 (two groups), 2 and 3 step 1: the even ones are solved.
    reward = SolvedByPrompt({0, 2})
    trainer, _, tokenizer = make_trainer(
        tiny_model_dir,
        tmp_path,
        guided_per_group=2,
        groups_per_step=2,
        initial_length=5,
        guidance_groups="unsolved",
        reward=reward,
        **kwargs,
    )
    return trainer, reward, tokenizer


def test_only_unsolved_groups_get_guided_rows_with_exactly_the_first_l_k_ids(tiny_model_dir, tmp_path):
    trainer, reward, tokenizer = _unsolved_trainer(tiny_model_dir, tmp_path, max_steps=2)
    trainer.train()
    assert len(reward.calls) == 4, "each step scores the unguided generation, then the trained batch"
    for step in range(2):
        probe, final = reward.calls[2 * step], reward.calls[2 * step + 1]
        for row, (ids, guidance) in enumerate(zip(final["completion_ids"], final["guidance"], strict=True)):
            expected = tokenizer(guidance, add_special_tokens=False)["input_ids"][:5]
            assert probe["completion_ids"][row][:5] != expected, "the first generation is unguided"
            if row // 4 == 1 and row % 4 < 2:  # the unsolved group's first floor(alpha*G) roll-outs
                assert ids[:5] == expected and len(ids) > 5
            else:
                assert ids == probe["completion_ids"][row], "every other roll-out is kept as generated"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "g2rpo/guided_groups" in r]
    assert [r["g2rpo/guided_groups"] for r in steps] == [0.5, 0.5]
    assert [r["g2rpo/guided_fraction"] for r in steps] == [0.25, 0.25]
    assert [r["g2rpo/accuracy"] for r in steps] == [0.5, 0.5]
    history = trainer.guidance_client.controller.history
    assert [r.metrics["guided_groups"] for r in history] == [0.5, 0.5]


def test_when_every_group_is_solved_nothing_is_regenerated(tiny_model_dir, tmp_path, monkeypatch):
    reward = SolvedByPrompt(set(range(16)))
    trainer, _, _ = make_trainer(
        tiny_model_dir, tmp_path, groups_per_step=2, guidance_groups="unsolved", reward=reward, max_steps=1
    )
    generated: list[int] = []
    original = GRPOTrainer._generate_single_turn

    def counting(self, prompt_ids, *args, **kwargs):
        generated.append(len(prompt_ids))
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", counting)
    trainer.train()
    assert generated == [8], "one unguided generation, no second call"
    assert reward.calls[0]["completion_ids"] == reward.calls[1]["completion_ids"]


def test_mask_removes_the_guidance_tokens_of_unsolved_groups_only(tiny_model_dir, tmp_path):
    class Recording(G2RPOTrainer):
        def _generate_and_score_completions(self, inputs):
            self.recorded = super()._generate_and_score_completions(inputs)
            return self.recorded

    trainer, _, _ = _unsolved_trainer(
        tiny_model_dir, tmp_path, max_steps=1, guidance_loss="mask", trainer_class=Recording
    )
    trainer.train()
    tool_mask = trainer.recorded["tool_mask"]
    for row in range(tool_mask.size(0)):
        guided = row // 4 == 1 and row % 4 < 2
        assert tool_mask[row, :5].tolist() == ([0] * 5 if guided else [1] * 5)


def test_unsolved_on_the_vllm_server_path(tiny_model_dir, tmp_path):
    """The unguided generation goes as TRL sends it (n=G); the guided rows of unsolved groups follow
    one by one (n=1) as prompt + guidance ids, and their guidance tokens get an importance ratio of 1."""

    class Recording(G2RPOTrainer):
        def _generate_and_score_completions(self, inputs):
            self.recorded = super()._generate_and_score_completions(inputs)
            return self.recorded

    trainer, reward, tokenizer = _unsolved_trainer(tiny_model_dir, tmp_path, max_steps=1, trainer_class=Recording)
    generated = tokenizer("42", add_special_tokens=False)["input_ids"]
    fake = FakeVLLMGeneration(tokenizer.eos_token_id, generated)
    trainer.use_vllm = True
    trainer.vllm_generation = fake
    trainer._last_loaded_step = -1
    trainer.vllm_importance_sampling_mode = "token_truncate"
    trainer.train()

    first, second = fake.requests
    assert first["num_generations"] == 4 and len(first["prompts"]) == 8
    assert second["num_generations"] == 1 and len(second["prompts"]) == 2
    final = reward.calls[1]
    for slot, row in enumerate((4, 5)):
        guidance = tokenizer(final["guidance"][row], add_special_tokens=False)["input_ids"][:5]
        assert second["prompts"][slot] == first["prompts"][row] + guidance
        assert final["completion_ids"][row] == guidance + generated + [tokenizer.eos_token_id]
    ratio = trainer.recorded["importance_sampling_ratio"]
    for row in range(8):
        first_generated = 5 if row in (4, 5) else 0
        assert torch.all(ratio[row, :first_generated] == 1.0)
        assert ratio[row, first_generated] != 1.0


def test_an_async_reward_cannot_drive_unsolved(tiny_model_dir, tmp_path):
    async def accuracy(prompts, completions, **kwargs):
        return [0.0] * len(prompts)

    with pytest.raises(ValueError, match="'accuracy', which must be a plain"):
        make_trainer(tiny_model_dir, tmp_path, guidance_groups="unsolved", reward=accuracy)


@pytest.mark.slow
def test_g2rpo_run_with_unsolved_groups_a_cosine_schedule_mask_and_curriculum(tiny_model_dir, tmp_path):
    """The local path end to end (`g2rpo run`, in-process controller): both options from the job file,
    with `loss: mask`, a curriculum and the format reward beside the driving accuracy reward."""
    from test_local_run import JOB, run

    job = JOB.format(model=tiny_model_dir, schedule="cosine", steps=4).replace(
        "totalSteps: 8}", "totalSteps: 8, groups: unsolved, loss: mask}"
    )
    assert "groups: unsolved, loss: mask" in job
    job_file = tmp_path / "job.yaml"
    job_file.write_text(job)
    result = run(job_file, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "g2rpo/guided_groups" in r]
    # 16 * (1 + cos(pi * k / 8)) / 2 for k = 0..3
    assert [r["g2rpo/guidance_length"] for r in steps] == [16, 15, 14, 11]
    for r in steps:
        # 2 groups per step, 2 of 4 roll-outs guided in each unsolved group
        assert r["g2rpo/guided_groups"] in (0.0, 0.5, 1.0)
        assert r["g2rpo/guided_fraction"] == pytest.approx(r["g2rpo/guided_groups"] / 2)


def test_the_adaptive_rule_with_smoothing_reads_the_trained_batch_under_unsolved(tiny_model_dir, tmp_path):
    """r_k is the mean driving reward of the batch as trained (the guided replacements included), not of
    the unguided generation that chose the groups; the smoothed adaptive rule follows it exactly."""
    from g2rpo.controller.core import GuidanceController
    from g2rpo.guidance.schedule import ScheduleParams, lengths_for

    class GuidedOrEvenSolves(SolvedByPrompt):
        def __call__(self, prompts, completions, completion_ids, guidance, **kwargs):
            by_prompt = super().__call__(prompts, completions, completion_ids, guidance, **kwargs)
            heads = [self.tokenizer(g, add_special_tokens=False)["input_ids"][:3] for g in guidance]
            return [
                max(r, float(list(ids[:3]) == h)) for r, ids, h in zip(by_prompt, completion_ids, heads, strict=True)
            ]

    params = ScheduleParams(
        schedule="adaptive", initial_length=6, min_length=3, max_length=40, window=2, reward_ema=0.5
    )
    reward = GuidedOrEvenSolves({0, 2, 4})
    trainer, _, tokenizer = make_trainer(
        tiny_model_dir,
        tmp_path,
        guided_per_group=2,
        groups_per_step=2,
        guidance_groups="unsolved",
        reward=reward,
        controller=GuidanceController(params),
        max_steps=3,
    )
    reward.tokenizer = tokenizer
    trainer.train()
    history = trainer.guidance_client.controller.history
    assert [r.reward for r in history] == [0.75, 0.75, 0.75], "4 solved + 2 guided successes of 8"
    assert [r.metrics["accuracy_unguided"] for r in history] == pytest.approx([4 / 6] * 3)
    assert [r.length_used for r in history] == lengths_for(params, [0.75] * 3)[:3]
