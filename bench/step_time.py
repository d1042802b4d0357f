"""Step time of G2RPO-A vs TRL's GRPOTrainer on the same batches (tiny model, CPU).

    .venv/bin/python bench/step_time.py [--steps 20] [--repeats 3] [--cuda] [--hidden 64]

Both trainers get the same model weights, data, reward and config. G2RPO-A runs with alpha = 0
(no guided roll-outs: the cost of the hooks, the per-step statistics and the controller round
trip) and with alpha = 0.5 (guided roll-outs, l = 16). Runs alternate within one process and the
report is the ratio of median step times against TRL's: absolute times on shared machines are noise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from g2rpo.controller.client import InProcessGuidanceClient
from g2rpo.controller.core import GuidanceController
from g2rpo.guidance.schedule import ScheduleParams
from g2rpo.models.tiny import build_tiny_model
from g2rpo.train.trainer import G2RPOTrainer

MAX_COMPLETION_LENGTH = 32
INITIAL_GUIDANCE_LENGTH = 16


def accuracy(completions, answer, **kwargs):
    return [float(a in c) for c, a in zip(completions, answer, strict=False)]


class StepTimer(TrainerCallback):
    """Wall time per step, and this process's CPU time per step (steadier on a shared machine)."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = self._cpu_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def run(
    kind: str, model_dir: Path, steps: int, out: Path, guided_per_group: int = 0, cuda: bool = False
) -> list[float]:
    trainer, timer = build(kind, model_dir, steps, out, guided_per_group, cuda)
    trainer.train()
    return timer.times[2:]  # the first steps warm up allocators and caches


def build(kind: str, model_dir: Path, steps: int, out: Path, guided_per_group: int = 0, cuda: bool = False):
    """The trainer of one variant and its step timer: TRL's GRPOTrainer, or G2RPOTrainer with G=4."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{i}+{i}=?"}],
                "answer": str(2 * i),
                "guidance": f"{i}+{i} is {2 * i}. " * 4,
            }
            for i in range(64)
        ]
    )
    config = GRPOConfig(
        output_dir=str(out),
        use_cpu=not cuda,
        bf16=cuda,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=MAX_COMPLETION_LENGTH,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        shuffle_dataset=False,
    )
    timer = StepTimer()
    common = {
        "model": model,
        "reward_funcs": [accuracy],
        "args": config,
        "train_dataset": data,
        "processing_class": tokenizer,
        "callbacks": [timer],
    }
    if kind == "trl":
        trainer = GRPOTrainer(**common)
    else:
        params = ScheduleParams("adaptive", initial_length=INITIAL_GUIDANCE_LENGTH, min_length=1, max_length=64)
        trainer = G2RPOTrainer(
            **common,
            guidance_client=InProcessGuidanceClient(GuidanceController(params)),
            guided_per_group=guided_per_group,
            guidance_loss="include",
            driving_reward="accuracy",
        )
    trainer.remove_callback(PrinterCallback)
    return trainer, timer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda", action="store_true", help="bf16 on the GPU instead of float32 on the CPU")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the random Qwen3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", hidden_size=args.hidden)
        variants = {"trl GRPOTrainer": ("trl", 0), "g2rpo alpha=0": ("g2rpo", 0), "g2rpo alpha=0.5": ("g2rpo", 2)}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, (kind, guided) in variants.items():
                samples[name] += run(
                    kind, model_dir, args.steps, Path(tmp) / f"{kind}{guided}-{repeat}", guided, args.cuda
                )
    baseline = statistics.median(samples["trl GRPOTrainer"])
    where = "bf16 on " + torch.cuda.get_device_name(0) if args.cuda else "float32 on CPU"
    print(
        f"{'variant':<18} {'median step (ms)':>17} {'ratio vs TRL':>13}  (Qwen3 hidden {args.hidden}, G=4, 8 roll-outs x 32 tokens, {where})"
    )
    for name, times in samples.items():
        median = statistics.median(times)
        print(f"{name:<18} {median * 1000:>17.1f} {median / baseline:>13.3f}")


if __name__ == "__main__":
    main()
