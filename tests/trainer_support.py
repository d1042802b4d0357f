"""Builds a G2RPOTrainer on the tiny model with scripted rewards, for the trainer tests.

The rewards are scripted (a real reward function that returns chosen values and records what
TRL handed it) so that the tests can assert exact schedules; everything else is real: TRL's
GRPOTrainer, generation, loss and optimizer steps on a real (tiny) model.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig

from g2rpo.api.spec import LoraSpec
from g2rpo.controller.client import InProcessGuidanceClient
from g2rpo.controller.core import GuidanceController
from g2rpo.guidance.schedule import ScheduleParams
from g2rpo.train.callbacks import MetricsFileCallback
from g2rpo.train.lora import lora_config
from g2rpo.train.trainer import G2RPOTrainer


class ScriptedReward:
    """A reward function returning `script[k]` for every roll-out of call k; records its inputs."""

    def __init__(self, script: list[float] | None = None, name: str = "accuracy"):
        self.script = script
        self.calls: list[dict] = []
        self.__name__ = name

    def __call__(self, prompts, completions, completion_ids, guidance, **kwargs):
        k = len(self.calls)
        self.calls.append({"completion_ids": [list(c) for c in completion_ids], "guidance": list(guidance)})
        value = self.script[k] if self.script else 0.0
        return [value] * len(completions)


def toy_dataset(rows: int) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"Problem {i}: add {i} and {i + 1}."}],
                "answer": str(2 * i + 1),
                "guidance": f"<think>Step {i}: {i} + {i + 1} = {2 * i + 1}.</think> The answer is {2 * i + 1}.",
            }
            for i in range(rows)
        ]
    )


def make_trainer(
    model_dir: Path,
    output_dir: Path,
    *,
    num_generations: int = 4,
    guided_per_group: int = 1,
    groups_per_step: int = 1,
    schedule: str = "fixed",
    initial_length: int = 6,
    min_length: int = 0,
    max_length: int = 64,
    guidance_loss: str = "include",
    guidance_groups: str = "all",
    total_steps: int | None = None,
    reward: ScriptedReward | None = None,
    max_steps: int = 2,
    save_steps: int = 100,
    controller: GuidanceController | None = None,
    trainer_class: type[G2RPOTrainer] = G2RPOTrainer,
    seed: int = 0,
    per_device_batch_size: int | None = None,
    sandbox_layers: dict[str, bool] | None = None,
    report_to: list[str] | None = None,
    lora: LoraSpec | None = None,
):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = ScheduleParams(
        schedule=schedule,
        initial_length=initial_length,
        min_length=min_length,
        max_length=max_length,
        window=2,
        total_steps=total_steps,
    )
    controller = controller or GuidanceController(params)
    reward = reward or ScriptedReward()
    config = GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=per_device_batch_size or num_generations * groups_per_step,
        num_generations=num_generations,
        max_completion_length=8,
        max_steps=max_steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        report_to=report_to or [],
        disable_tqdm=True,
        seed=seed,
        shuffle_dataset=False,
    )
    trainer = trainer_class(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=toy_dataset(16),
        processing_class=tokenizer,
        guidance_client=InProcessGuidanceClient(controller),
        guided_per_group=guided_per_group,
        guidance_loss=guidance_loss,
        driving_reward=reward.__name__,
        guidance_groups=guidance_groups,
        sandbox_layers=sandbox_layers,
        callbacks=[MetricsFileCallback(Path(output_dir) / "metrics.jsonl")],
        peft_config=lora_config(lora) if lora else None,
    )
    return trainer, reward, tokenizer
