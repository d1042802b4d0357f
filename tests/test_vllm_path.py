"""The vLLM server path of G2RPOTrainer, with a stand-in for TRL's vLLM client.

vLLM cannot run on a CPU, so `trainer.vllm_generation` is replaced by a fake that records what
TRL would send to the server and answers like it (completion ids and sampled-token log-probs).
Everything around it is real TRL: the log-prob alignment, the importance-sampling correction
against the training model, and the loss. What this shows: guided rows are sent one by one
(n=1) as prompt+guidance token ids, and guidance tokens get an importance ratio of exactly 1.
"""

from __future__ import annotations

import pytest
import torch

from g2rpo.train.trainer import G2RPOTrainer

from trainer_support import ScriptedReward, make_trainer

SAMPLED_LOGPROB = -0.25  # what the fake "server" claims for every token it generated


class FakeVLLMGeneration:
    def __init__(self, eos_token_id: int, tokens: list[int]):
        self.eos_token_id, self.tokens = eos_token_id, tokens
        self.requests: list[dict] = []

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler=None):
        self.requests.append({"prompts": [list(p) for p in prompts], "num_generations": num_generations})
        completions = [[*self.tokens, self.eos_token_id] for _ in prompts]
        logprobs = [[[SAMPLED_LOGPROB] for _ in c] for c in completions]
        return prompts, completions, logprobs, None


class Recording(G2RPOTrainer):
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded = output
        return output


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_guided_rows_go_to_the_server_one_by_one_and_guidance_is_not_importance_weighted(
    tiny_model_dir, tmp_path, mode
):
    length = 5
    trainer, reward, tokenizer = make_trainer(
        tiny_model_dir,
        tmp_path,
        guided_per_group=2,
        initial_length=length,
        max_steps=1,
        trainer_class=Recording,
        reward=ScriptedReward([1.0]),
    )
    generated = tokenizer("42", add_special_tokens=False)["input_ids"]
    fake = FakeVLLMGeneration(tokenizer.eos_token_id, generated)
    trainer.use_vllm = True
    trainer.vllm_generation = fake
    trainer._last_loaded_step = -1
    trainer.vllm_importance_sampling_mode = mode
    trainer.train()

    request = fake.requests[0]
    assert request["num_generations"] == 1, "rows of a group no longer share a prefix: one request each"
    call = reward.calls[0]
    for row, prompt in enumerate(request["prompts"]):
        guidance = tokenizer(call["guidance"][row], add_special_tokens=False)["input_ids"][:length]
        if row % 4 < 2:
            assert prompt[-length:] == guidance, "the server got prompt ids + the first l_k guidance ids"
            assert call["completion_ids"][row] == guidance + generated + [tokenizer.eos_token_id]
        else:
            assert prompt[-length:] != guidance
            assert call["completion_ids"][row] == [*generated, tokenizer.eos_token_id]

    output = trainer.recorded
    ratio, sampling, old = (
        output["importance_sampling_ratio"],
        output["sampling_per_token_logps"],
        output["old_per_token_logps"],
    )
    mask = output["completion_mask"].bool()
    assert not torch.isnan(sampling).any(), "guidance positions carry a real log-prob, not NaN"
    for row in range(ratio.size(0)):
        first_generated = length if row % 4 < 2 else 0
        assert torch.all(sampling[row, :first_generated] == old[row, :first_generated])
        if mode == "token_truncate":
            assert torch.all(ratio[row, :first_generated] == 1.0), "guidance tokens were not sampled: ratio exactly 1"
            assert ratio[row, first_generated] != 1.0, "generated tokens get TRL's real correction"
        else:
            generated = mask[row].clone()
            generated[:first_generated] = False
            expected = (old[row][generated] - SAMPLED_LOGPROB).sum()
            assert torch.log(ratio[row, 0]).item() == pytest.approx(expected.item(), rel=1e-4), (
                "the sequence ratio counts generated tokens only"
            )
