"""Checkpoints carry the guidance state; resuming continues with exactly l_k and the history."""

from __future__ import annotations

import json
import logging

import pytest
from torch.nn.modules.module import _IncompatibleKeys

from g2rpo.guidance.schedule import ScheduleParams, lengths_for
from g2rpo.train.trainer import GUIDANCE_STATE_FILE

from trainer_support import ScriptedReward, make_trainer

REWARDS = [0.5, 0.25, 0.75, 0.5]
SCHEDULE = {"schedule": "adaptive", "initial_length": 8, "min_length": 1, "max_length": 40}


def test_resume_restores_guidance_length_and_reward_history(tiny_model_dir, tmp_path, caplog):
    full, _, _ = make_trainer(
        tiny_model_dir, tmp_path / "a", reward=ScriptedReward(REWARDS), max_steps=4, save_steps=1, **SCHEDULE
    )
    full.train()
    expected = lengths_for(ScheduleParams(window=2, **SCHEDULE), REWARDS)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = json.loads((checkpoint / GUIDANCE_STATE_FILE).read_text())
    assert saved["state"]["step"] == 2 and saved["state"]["rewards"] == REWARDS[:2]

    resumed, reward, _ = make_trainer(
        tiny_model_dir, tmp_path / "b", reward=ScriptedReward(REWARDS[2:]), max_steps=4, **SCHEDULE
    )
    resumed.restore_guidance(checkpoint)
    assert (resumed.guidance_step, resumed.guidance_length) == (2, expected[2])
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.model.config.tie_word_embeddings
    assert "missing keys" not in caplog.text, "lm_head.weight is tied to the embeddings, not missing"
    assert len(reward.calls) == 2, "only steps 2 and 3 were trained after the resume"
    controller = resumed.guidance_client.controller
    assert [r.reward for r in controller.history] == REWARDS
    assert [r.length_used for r in controller.history] == expected[:4]
    assert resumed.guidance_length == expected[4] == full.guidance_length


def test_resume_from_an_incomplete_checkpoint_fails_clearly(tiny_model_dir, tmp_path):
    trainer, _, _ = make_trainer(tiny_model_dir, tmp_path, max_steps=1)
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "model.safetensors").write_bytes(b"cut")
    with pytest.raises(
        ValueError,
        match=r"checkpoint-1: no g2rpo_checkpoint_complete.json \(the save was interrupted\); it holds: model.safetensors",
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_a_missing_key_that_is_not_a_tied_weight_is_still_reported(tiny_model_dir, tmp_path, caplog):
    trainer, _, _ = make_trainer(tiny_model_dir, tmp_path, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight", "model.norm.weight"], []))
    assert "There were missing keys in the checkpoint model loaded: ['model.norm.weight']" in caplog.text


def test_resume_with_unsolved_groups_and_a_cosine_schedule_continues_exactly(tiny_model_dir, tmp_path):
    """A resumed run of `guidance.groups: unsolved` with `schedule: cosine` uses the same l_k and guides
    the same rows as the uninterrupted run (both beyond the paper, same exactness as its rule)."""
    from test_guidance_groups import SolvedByPrompt

    SOLVED = {0, 2, 5}  # problems 2k and 2k+1 make step k's two groups
    setup = {
        "schedule": "cosine",
        "total_steps": 4,
        "initial_length": 8,
        "min_length": 0,
        "guided_per_group": 2,
        "groups_per_step": 2,
        "guidance_groups": "unsolved",
        "max_steps": 4,
    }
    full, full_reward, tokenizer = make_trainer(
        tiny_model_dir, tmp_path / "a", reward=SolvedByPrompt(SOLVED), save_steps=1, **setup
    )
    full.train()
    expected = lengths_for(
        ScheduleParams(schedule="cosine", initial_length=8, min_length=0, max_length=64, total_steps=4), [0.0] * 4
    )
    assert [r.length_used for r in full.guidance_client.controller.history] == expected[:4] == [8, 7, 4, 1]

    resumed, reward, _ = make_trainer(tiny_model_dir, tmp_path / "b", reward=SolvedByPrompt(SOLVED), **setup)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    history = resumed.guidance_client.controller.history
    assert [r.length_used for r in history] == expected[:4]
    assert [r.metrics["guided_groups"] for r in history] == [0.5, 0.5, 0.5, 1.0]
    # steps 2 and 3 (probe + trained batch each): the unsolved group's first two rows carry l_k ids
    for step, (probe, final) in enumerate(zip(reward.calls[::2], reward.calls[1::2], strict=True), start=2):
        unsolved = [g for g in range(2) if 2 * step + g not in SOLVED]
        for row, ids in enumerate(final["completion_ids"]):
            guided = row // 4 in unsolved and row % 4 < 2 and expected[step] > 0
            head = tokenizer(final["guidance"][row], add_special_tokens=False)["input_ids"][: expected[step]]
            assert (ids[: expected[step]] == head) if guided else (ids == probe["completion_ids"][row])
        assert full_reward.calls[2 * step + 1]["guidance"] == final["guidance"]
