"""G2RPOTrainer: TRL's GRPOTrainer with guided roll-outs and an adaptive guidance length.

Per training step k (one generation batch; one optimizer step when numIterations = 1):

1. In every group of G roll-outs the first floor(alpha*G) are guided (g2rpo.guidance.rows), in
   the groups that the job's group rule picks (g2rpo.guidance.groups: every group, or, after an
   unguided generation of the whole batch, only the groups none of whose roll-outs succeeded).
2. A guided roll-out is generated from `prompt ids + the first l_k ids of the reference
   trajectory`, joined at the token level: what the model was conditioned on is exactly what it
   is trained on (the official code decodes and re-tokenises, which can differ).
3. The trained completion is `guidance ids + generated ids`. Guidance tokens have no sampling
   log-prob: TRL gets None for them, i.e. an importance ratio of 1. With `guidance.loss: mask`
   they leave the loss (through TRL's tool mask, the mechanism TRL uses for tokens the model
   did not write).
4. After scoring, rank 0 reports r_k (the global batch's mean of the driving reward, guided and
   unguided rows alike) to the guidance controller, receives l_{k+1} and broadcasts it, so
   every rank uses the same length.

Every override of a private TRL method is in this class and listed in `PRIVATE_TRL_HOOKS`;
tests/test_trl_hooks.py fails when TRL changes one of their signatures. TRL is pinned in
pyproject.toml for the same reason.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from accelerate.utils import broadcast_object_list
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from g2rpo.controller.client import GuidanceClient
from g2rpo.durable import atomic_write_text
from g2rpo.guidance.groups import GROUP_RULES
from g2rpo.guidance.rows import generated_token_mask, guided_rows, join_guidance, prepend_guidance
from g2rpo.train.callbacks import CheckpointRoomCallback, GuidanceCheckpointCallback
from g2rpo.train.checkpoints import incomplete_reason, newest_complete
from g2rpo.train.metrics import step_statistics
from g2rpo.train.storage import raise_if_out_of_space
from g2rpo.train.store import CheckpointStore, LocalFolder

GUIDANCE_STATE_FILE = "guidance_state.json"
# Test-only: "STEP:DIR" pauses the save of checkpoint-STEP right after the model weights are written
# (optimizer, scheduler, RNG, trainer state, guidance state and completion marker still missing):
# writes DIR/paused, then waits until DIR/release exists. Tests kill the run while it waits
# (tests/test_interrupt.py); nothing else reads it.
PAUSE_IN_CHECKPOINT_ENV = "G2RPO_TEST_PAUSE_IN_CHECKPOINT"

# name -> the parameters our override relies on (checked against TRL by tests/test_trl_hooks.py).
PRIVATE_TRL_HOOKS: dict[str, tuple[str, ...]] = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_generate": ("self", "prompts"),
    "_generate_single_turn": (
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    # transformers' Trainer: a save that fails on a full volume becomes one line (g2rpo.train.storage).
    "_save_checkpoint": ("self", "model", "trial"),
    # Public, but with transformers' private `_internal_call`; the test-only pause hook lives here.
    "save_model": ("self", "output_dir", "_internal_call"),
    # transformers' Trainer: quiets the missing key of a tied weight on resume.
    "_issue_warnings_after_load": ("self", "load_result"),
}
# Private attributes of GRPOTrainer that the hooks read.
PRIVATE_TRL_ATTRIBUTES = ("_metrics", "_tokenizer", "num_generations", "num_iterations", "use_vllm")

T = TypeVar("T")


class _GuidancePlan:
    """The guidance of one generation batch on this rank: token ids per row and which rows are guided.

    `candidate_ids`: the guidance each row gets if it is guided. A plan whose group rule reads the
    unguided roll-outs' rewards starts with no row guided (`awaiting_probe`) and is completed by
    `choose` once those rewards are known.
    """

    def __init__(
        self,
        candidate_ids: list[list[int]],
        length: int,
        inputs: list[dict[str, Any]],
        global_offset: int,
        guided: list[bool] | None,
    ):
        self.candidate_ids = candidate_ids
        self.length = length
        self.inputs = inputs
        self.global_offset = global_offset
        self.awaiting_probe = guided is None
        self.choose(guided or [False] * len(candidate_ids))

    def choose(self, guided: list[bool]) -> None:
        self.guided = guided
        self.guidance_ids = [ids if g else [] for ids, g in zip(self.candidate_ids, guided, strict=True)]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.guidance_ids]


class G2RPOTrainer(GRPOTrainer):
    def __init__(
        self,
        *args: Any,
        guidance_client: GuidanceClient | None,
        guided_per_group: int,
        guidance_loss: str,
        driving_reward: str,
        guidance_groups: str = "all",
        sandbox_layers: dict[str, bool] | None = None,
        model_card: str | None = None,
        checkpoint_store: CheckpointStore | None = None,
        **kwargs: Any,
    ):
        """`guidance_client` is needed on rank 0 only (other ranks receive lengths by broadcast).

        `driving_reward` names the reward function whose per-step mean is r_k. `guidance_groups` names
        the rule picking the guided groups (g2rpo.guidance.groups.GROUP_RULES). `sandbox_layers`
        (jobs with a code reward) goes with every step report, so the controller, and the job's
        status on a cluster, show how strong the code sandbox's wall is. `model_card` (README.md text,
        g2rpo.train.model_card) replaces the card TRL writes beside the checkpoints. `checkpoint_store`
        (rank 0; default: the local folder alone) receives each complete checkpoint (g2rpo.train.store).
        """
        super().__init__(*args, **kwargs)
        # transformers rotates (save_total_limit) before a new checkpoint is complete; a crash
        # then can leave no complete checkpoint. GuidanceCheckpointCallback rotates after the marker.
        self.checkpoint_keep = self.args.save_total_limit
        self.args.save_total_limit = None
        self.checkpoint_store = checkpoint_store or LocalFolder()
        self.add_callback(GuidanceCheckpointCallback(self))
        self.add_callback(CheckpointRoomCallback())
        if guidance_loss not in ("include", "mask"):
            raise ValueError(f"guidance_loss must be 'include' or 'mask', got {guidance_loss!r}")
        self.guidance_client = guidance_client
        self.model_card = model_card
        self.guided_per_group = guided_per_group
        self.guidance_loss = guidance_loss
        self.driving_reward_index = self.reward_func_names.index(driving_reward)
        if guidance_groups not in GROUP_RULES:
            raise ValueError(f"guidance_groups must be one of {sorted(GROUP_RULES)}, got {guidance_groups!r}")
        self.group_rule = GROUP_RULES[guidance_groups]
        driving_func = self.reward_funcs[self.driving_reward_index]
        if self.group_rule.needs_probe and (
            isinstance(driving_func, torch.nn.Module) or inspect.iscoroutinefunction(driving_func)
        ):
            raise ValueError(
                f"guidance.groups: {guidance_groups} scores unguided roll-outs with the driving reward "
                f"{driving_reward!r}, which must be a plain (synchronous) reward function"
            )
        self._sandbox_report = {f"sandbox_{layer}": float(held) for layer, held in (sandbox_layers or {}).items()}
        self._guidance_ids_cache: OrderedDict[str, list[int]] = OrderedDict()
        self._guidance_plan: _GuidancePlan | None = None
        self._last_rewards_per_func: torch.Tensor | None = None
        self.guidance_step, self.guidance_length = self._from_rank_zero(lambda: self._client().current())

    # --- public ----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):  # type: ignore[override]  # trial and ignore_keys_for_eval pass through **kwargs
        """Train, restoring the guidance schedule's state when resuming from a (complete) checkpoint.

        `True` takes the newest complete checkpoint in output_dir (see g2rpo.train.checkpoints).
        """
        if resume_from_checkpoint is True:
            point = newest_complete(self._output_dir())
            if point.checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir}")
            resume_from_checkpoint = str(point.checkpoint)
        if resume_from_checkpoint:
            reason = incomplete_reason(Path(resume_from_checkpoint))
            if reason is not None:
                raise ValueError(f"cannot resume from {resume_from_checkpoint}: {reason}")
            self.restore_guidance(Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial):
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            raise_if_out_of_space(exc, self._output_dir(), self.state.global_step, self.is_world_process_zero())
            raise

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        pause = os.environ.get(PAUSE_IN_CHECKPOINT_ENV)
        if pause and output_dir and Path(output_dir).name == f"checkpoint-{self.state.global_step}":
            step, _, folder = pause.partition(":")
            if int(step) == self.state.global_step:
                _pause_for_test(Path(folder))

    def create_model_card(  # type: ignore[override]  # TRL's BaseTrainer signature, not transformers'
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        if self.model_card is None:
            return super().create_model_card(model_name, dataset_name, tags)
        if self.is_world_process_zero():
            atomic_write_text(self._output_dir() / "README.md", self.model_card)

    def _issue_warnings_after_load(self, load_result):
        """Leave out of the resume warning the keys of tied weights (lm_head.weight of a model with tied
        embeddings): a checkpoint stores a tied tensor once, and it is loaded under its other name.
        Every other missing or unexpected key is still reported."""
        loaded_through_a_twin = _tied_names_loaded_through_a_twin(self._model(), load_result.missing_keys)
        missing = [key for key in load_result.missing_keys if key not in loaded_through_a_twin]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def restore_guidance(self, checkpoint: Path) -> None:
        state_file = checkpoint / GUIDANCE_STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{checkpoint} holds no {GUIDANCE_STATE_FILE}: it was not written by g2rpo, so the guidance "
                "schedule's state (l_k and the reward history) cannot be restored"
            )
        snapshot = json.loads(state_file.read_text())
        self.guidance_step, self.guidance_length = self._from_rank_zero(
            lambda: (snapshot["state"]["step"], self._client().restore(snapshot))
        )

    def save_guidance(self, checkpoint: Path) -> None:
        """Write the controller's snapshot into a checkpoint folder (rank 0 only)."""
        if self.guidance_client is None:
            return
        checkpoint.mkdir(parents=True, exist_ok=True)
        atomic_write_text(checkpoint / GUIDANCE_STATE_FILE, json.dumps(self.guidance_client.snapshot()))

    def _client(self) -> GuidanceClient:
        """The controller's client: rank 0 asks the controller and shares the answer (_from_rank_zero)."""
        if self.guidance_client is None:
            raise RuntimeError("rank 0 needs a guidance_client (the controller's client)")
        return self.guidance_client

    def _output_dir(self) -> Path:
        # TrainingArguments types output_dir optional; its __post_init__ sets the default ("trainer_output").
        assert self.args.output_dir is not None, "TrainingArguments.__post_init__ sets output_dir"
        return Path(self.args.output_dir)

    def _model(self) -> torch.nn.Module:
        # Trainer types model optional; GRPOTrainer's __init__ always loads or receives one.
        assert self.model is not None, "GRPOTrainer.__init__ sets the model"
        return self.model

    def _group_size(self) -> int:
        # GRPOConfig types num_generations optional; its __post_init__ fails on None (num_generations < 2).
        assert self.num_generations is not None, "GRPOConfig requires num_generations"
        return self.num_generations

    # --- TRL private hooks -----------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):  # TRL private hook
        if not self._model().training:
            return super()._generate_and_score_completions(inputs)  # evaluation is never guided
        self._guidance_plan = self._plan_guidance(inputs)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            plan, self._guidance_plan = self._guidance_plan, None
        self._fill_guidance_sampling_logps(output, plan)
        self._finish_step(output, plan)
        return output

    def _generate(self, prompts):  # TRL private hook
        result = super()._generate(prompts)
        plan = self._guidance_plan
        if plan is None or self.guidance_loss == "include" or not any(plan.lengths):
            return result
        prompt_ids, completion_ids, tool_mask, *rest = result
        if tool_mask is not None:
            raise RuntimeError("guidance.loss: mask cannot be combined with tool calling")
        return (prompt_ids, completion_ids, generated_token_mask(plan.lengths, completion_ids), *rest)

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):  # TRL private hook
        plan = self._guidance_plan
        if plan is None or plan.length == 0 or self.guided_per_group == 0:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if plan.awaiting_probe:
            return self._generate_then_guide_chosen_groups(
                plan, prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        # Rows of one group no longer share a prefix, so each is its own request: TRL's vLLM server
        # path would otherwise send one prompt per group (`prompts[::num_generations]`) with n=G.
        # The decision depends only on l_k and alpha, which are the same on every rank.
        completion_ids, logprobs = super()._generate_single_turn(
            join_guidance(prompt_ids, plan.guidance_ids), images, multimodal_fields, 1, has_tool_images
        )
        return prepend_guidance(plan.guidance_ids, completion_ids, logprobs, self._tokenizer.eos_token_id)

    def _generate_then_guide_chosen_groups(
        self, plan, prompt_ids, images, multimodal_fields, num_generations, has_tool_images
    ):
        """Generate every row unguided, let the group rule read their driving rewards, then regenerate
        the guided rows of the chosen groups (prompt + guidance ids, n=1) in place of their unguided ones.

        TRL's vLLM paths slice a gathered request by `process_index * len(prompts)` (trl/generation/
        vllm_generation.py, VLLMGeneration.generate), so every rank sends the same number of rows: the
        most any rank regenerates, padded with repeats whose answers are dropped. Every rank reaches the
        same decision from the same gathered rewards, so all or none take part in the second call.
        """
        completion_ids, logprobs = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        if multimodal_fields:
            raise ValueError("guidance.groups: unsolved supports text prompts only (multimodal fields were given)")
        rewards = self._unguided_driving_rewards(plan.inputs, completion_ids)
        group_size, rows = self._group_size(), len(prompt_ids)
        chosen = self.group_rule.select(rewards, len(rewards) // group_size, group_size)
        guided_everywhere = guided_rows(len(rewards), 0, group_size, self.guided_per_group, chosen)
        plan.choose(guided_everywhere[plan.global_offset : plan.global_offset + rows])
        slots = max(sum(guided_everywhere[start : start + rows]) for start in range(0, len(rewards), rows))
        if slots == 0:
            return completion_ids, logprobs
        regenerated = [i for i, is_guided in enumerate(plan.guided) if is_guided]
        request = regenerated + [regenerated[0] if regenerated else 0] * (slots - len(regenerated))
        guidance = [plan.guidance_ids[i] for i in request]
        new_ids, new_logprobs = super()._generate_single_turn(
            join_guidance([prompt_ids[i] for i in request], guidance),
            None if images is None else [images[i] for i in request],
            multimodal_fields,
            1,
            has_tool_images,
        )
        new_ids, new_logprobs = prepend_guidance(guidance, new_ids, new_logprobs, self._tokenizer.eos_token_id)
        completion_ids = list(completion_ids)
        for slot, i in enumerate(regenerated):
            completion_ids[i] = new_ids[slot]
        if logprobs is not None and new_logprobs is not None:
            logprobs = list(logprobs)
            for slot, i in enumerate(regenerated):
                logprobs[i] = new_logprobs[slot]
        return completion_ids, logprobs

    def _unguided_driving_rewards(self, inputs: list[dict[str, Any]], completion_ids: list[list[int]]) -> list[float]:
        """The driving reward of each roll-out, over the global batch (global row order), scored as TRL's
        `_calculate_rewards` scores a plain reward function (the same inputs columns and decoding) but
        without logging: these roll-outs may be replaced and are never trained on as scored here."""
        prompts = [row["prompt"] for row in inputs]
        texts = self._tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions: list[Any] = (
            [[{"role": "assistant", "content": text}] for text in texts]
            if is_conversational({"prompt": prompts[0]})
            else texts
        )
        columns = {
            key: [row[key] for row in inputs]
            for key in inputs[0]
            if key not in ("prompt", "completion", "completion_ids")
        }
        # a plain function: checked in __init__ (TRL types the list loosely, names included)
        reward_func = cast(Callable[..., list[float | None]], self.reward_funcs[self.driving_reward_index])
        values = reward_func(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            trainer_state=self.state,
            log_extra=_ignore,
            log_metric=_ignore,
            **columns,
        )
        local = torch.tensor([math.nan if v is None else float(v) for v in values], device=self.accelerator.device)
        return self.accelerator.gather(local).tolist()

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # TRL private hook
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func  # gathered over all ranks, in global row order
        return rewards_per_func

    # --- guidance --------------------------------------------------------------------------------

    def _plan_guidance(self, inputs: list[dict[str, Any]]) -> _GuidancePlan:
        group_size, rows = self._group_size(), len(inputs)
        offset = self.accelerator.process_index * rows
        length = self.guidance_length
        guided_position = guided_rows(rows, offset, group_size, self.guided_per_group)
        candidate_ids = [
            self._guidance_token_ids(row.get("guidance") or "")[:length] if position and length > 0 else []
            for row, position in zip(inputs, guided_position, strict=True)
        ]
        if self.group_rule.needs_probe:
            return _GuidancePlan(candidate_ids, length, inputs, offset, guided=None)
        num_groups = rows * self.accelerator.num_processes // group_size
        chosen = self.group_rule.select(None, num_groups, group_size)
        guided = guided_rows(rows, offset, group_size, self.guided_per_group, chosen)
        return _GuidancePlan(candidate_ids, length, inputs, offset, guided=guided)

    def _guidance_token_ids(self, text: str) -> list[int]:
        """The trajectory's token ids, tokenised on its own and ended with EOS (a reference answer
        stops there), once per distinct trajectory."""
        ids = self._guidance_ids_cache.get(text)
        if ids is None:
            eos = self._tokenizer.eos_token_id
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"] + (
                [eos] if text and eos is not None else []
            )
            self._guidance_ids_cache[text] = ids
            if len(self._guidance_ids_cache) > 65536:
                self._guidance_ids_cache.popitem(last=False)
        else:
            self._guidance_ids_cache.move_to_end(text)
        return ids

    @staticmethod
    def _fill_guidance_sampling_logps(output: dict[str, Any], plan: _GuidancePlan) -> None:
        """Give guidance tokens the training model's own log-prob as their "sampling" log-prob.

        TRL already treats their unknown (NaN) sampling log-probs as an importance ratio of 1;
        filling them keeps every later consumer (off-policy masking) free of NaN as well.
        """
        sampling = output.get("sampling_per_token_logps")
        old = output.get("old_per_token_logps")
        if sampling is None or old is None or not any(plan.lengths):
            return
        unknown = torch.isnan(sampling)
        output["sampling_per_token_logps"] = torch.where(unknown, old, sampling)

    def _finish_step(self, output: dict[str, Any], plan: _GuidancePlan) -> None:
        """Log the step's G2RPO-A statistics and advance the schedule once, on every rank alike."""
        device = self.accelerator.device
        gather = self.accelerator.gather
        rewards_per_func = self._last_rewards_per_func
        self._last_rewards_per_func = None
        if rewards_per_func is None:
            raise RuntimeError(
                "TRL's _generate_and_score_completions scored no rewards (_calculate_rewards was not called)"
            )
        guided = gather(torch.tensor(plan.guided, device=device))
        guidance_lengths = gather(torch.tensor(plan.lengths, device=device))
        completion_lengths = gather(output["completion_mask"].sum(dim=1))
        advantages = gather(output["advantages"])
        stats = step_statistics(
            rewards_per_func=rewards_per_func,
            reward_weights=self.reward_weights.to(rewards_per_func.device),
            driving_index=self.driving_reward_index,
            guided=guided,
            guidance_lengths=guidance_lengths,
            completion_lengths=completion_lengths,
            advantages=advantages,
            num_generations=self._group_size(),
            guidance_length=plan.length,
        )
        for name, value in stats.items():
            self._metrics["train"][f"g2rpo/{name}"].append(value)
        step = self.guidance_step
        reward = stats["accuracy"]
        if not math.isfinite(reward):
            raise RuntimeError(f"step {step}: the driving reward's batch mean is {reward}; no roll-out was scorable")
        report = {**stats, **self._sandbox_report}
        self.guidance_length = self._from_rank_zero(lambda: self._client().report(step, reward, report))
        self.guidance_step = step + 1

    def _from_rank_zero(self, ask: Callable[[], T]) -> T:
        """Evaluate `ask()` on rank 0 (the one holding the controller client) and share the answer.

        A failure on rank 0 is shared too, so that no rank waits forever in the broadcast.
        """
        if self.accelerator.num_processes == 1:
            return ask()
        message: list[Any] = [None]
        if self.accelerator.is_main_process:
            try:
                message = [("ok", ask())]
            except Exception as exc:
                message = [("error", f"{type(exc).__name__}: {exc}")]
                broadcast_object_list(message, from_process=0)
                raise
        broadcast_object_list(message, from_process=0)
        status, value = message[0]
        if status == "error":
            raise RuntimeError(f"the guidance controller call failed on rank 0: {value}")
        return value


def _tied_names_loaded_through_a_twin(model: torch.nn.Module, missing_keys: list[str]) -> set[str]:
    """The missing keys naming a parameter that another, loaded, key names too."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    missing = set(missing_keys)
    return {
        name
        for names in names_of.values()
        if any(other not in missing for other in names)
        for name in names
        if name in missing
    }


def _ignore(*args: Any, **kwargs: Any) -> None:
    """log_extra/log_metric for reward functions scoring roll-outs that are not logged."""


def _pause_for_test(folder: Path) -> None:
    (folder / "paused").write_text(str(os.getpid()))
    while not (folder / "release").exists():
        time.sleep(0.05)
