"""LoRA against full fine-tuning on the same model, in the same run: trainable parameters, peak memory, step time.

    .venv/bin/python -m bench.lora [--steps 6] [--hidden 512] [--layers 4] [--rank 16] [--model DIR] [--cuda]
                                   [--output bench/results/lora.json]

Each variant trains in its own process (G2RPOTrainer, alpha = 0.5, G = 4, the same weights, data,
reward and config; LoRA on every linear layer), so that each peak is its own: on the CPU the peak
resident set (getrusage ru_maxrss, which counts torch's allocations, unlike tracemalloc) and its
growth from the loaded model to the end of training (gradients, optimizer state, activations); on a
GPU torch.cuda.max_memory_allocated. Step time is the median after two warm-up steps. Without
--model the policy is a random Qwen3 (g2rpo.models.tiny) of the given size; --model takes any model
folder (e.g. the bundled SmolLM2's converted folder). Absolute times on a shared machine are noise:
read the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("full", "lora")


def _rss_mb() -> float:
    """This process's current resident set, from /proc (ru_maxrss is the peak only)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def worker(variant: str, model_dir: Path, steps: int, rank: int, cuda: bool, out: Path) -> dict:
    """Train `steps` steps of one variant here and measure it (runs in a process of its own)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig

    from bench.step_time import StepTimer, accuracy
    from g2rpo.api.spec import LoraSpec
    from g2rpo.controller.client import InProcessGuidanceClient
    from g2rpo.controller.core import GuidanceController
    from g2rpo.guidance.schedule import ScheduleParams
    from g2rpo.train.lora import lora_config, trainable_parameters
    from g2rpo.train.trainer import G2RPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model = model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    loaded_mb = _rss_mb()
    data = _dataset()
    config = GRPOConfig(
        output_dir=str(out),
        use_cpu=not cuda,
        bf16=cuda,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=32,
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
    params = ScheduleParams("fixed", initial_length=16, min_length=1, max_length=64)
    peft = (
        lora_config(LoraSpec(rank=rank, alpha=2 * rank, target_modules=["all-linear"])) if variant == "lora" else None
    )
    trainer = G2RPOTrainer(
        model=model,
        reward_funcs=[accuracy],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[timer],
        guidance_client=InProcessGuidanceClient(GuidanceController(params)),
        guided_per_group=2,
        guidance_loss="include",
        driving_reward="accuracy",
        peft_config=peft,
    )
    trainer.remove_callback(PrinterCallback)
    trainable, total = trainable_parameters(trainer.model)
    trainer.train()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {
        "variant": variant,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "median_step_s": statistics.median(timer.times[2:] or timer.times),
        "median_step_cpu_s": statistics.median(timer.cpu_times[2:] or timer.cpu_times),
        "peak_rss_mb": peak_mb,
        "rss_growth_mb": peak_mb - loaded_mb,
    }
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _dataset():
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{i}+{i}=?"}],
                "answer": str(2 * i),
                "guidance": f"{i}+{i} is {2 * i}. " * 4,
            }
            for i in range(64)
        ]
    )


def compare(results: dict[str, dict]) -> dict[str, float]:
    full, lora = results["full"], results["lora"]
    ratios = {
        "trainable_parameters": lora["trainable_parameters"] / full["trainable_parameters"],
        "median_step_s": lora["median_step_s"] / full["median_step_s"],
        "median_step_cpu_s": lora["median_step_cpu_s"] / full["median_step_cpu_s"],
        "peak_rss_mb": lora["peak_rss_mb"] / full["peak_rss_mb"],
        "rss_growth_mb": lora["rss_growth_mb"] / full["rss_growth_mb"],
    }
    if "peak_cuda_mb" in full:
        ratios["peak_cuda_mb"] = lora["peak_cuda_mb"] / full["peak_cuda_mb"]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random Qwen3")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--model", type=Path, help="a model folder instead of the random Qwen3")
    parser.add_argument("--cuda", action="store_true", help="bf16 on the GPU instead of float32 on the CPU")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            result = worker(args.worker, args.model, args.steps, args.rank, args.cuda, Path(tmp))
        print(json.dumps(result))
        return

    from g2rpo.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(Path(tmp) / "tiny", hidden_size=args.hidden, layers=args.layers)
        results = {}
        for variant in VARIANTS:
            command = [sys.executable, "-m", "bench.lora", "--worker", variant, "--model", str(model_dir)]
            command += ["--steps", str(args.steps), "--rank", str(args.rank), *(["--cuda"] if args.cuda else [])]
            done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    ratios = compare(results)
    model = str(args.model) if args.model else f"random Qwen3, hidden {args.hidden}, {args.layers} layers"
    where = "bf16 on the GPU" if args.cuda else "float32 on CPU"
    print(f"{model}; G2RPO alpha=0.5, G=4, 8 roll-outs x 32 tokens, {args.steps} steps, {where}; LoRA r={args.rank}")
    columns = (
        "trainable_parameters",
        "median_step_s",
        "median_step_cpu_s",
        "peak_rss_mb",
        "rss_growth_mb",
        "peak_cuda_mb",
    )
    columns = tuple(c for c in columns if c in results["full"])
    print(f"{'':<8}" + "".join(f"{c:>22}" for c in columns))
    for variant in VARIANTS:
        print(f"{variant:<8}" + "".join(f"{results[variant][c]:>22.4g}" for c in columns))
    print(f"{'lora/full':<8}" + "".join(f"{ratios[c]:>22.3f}" for c in columns))
    if args.output:
        document = {"model": model, "steps": args.steps, "rank": args.rank, "device": where}
        args.output.write_text(json.dumps({**document, "results": results, "ratios": ratios}, indent=1) + "\n")


if __name__ == "__main__":
    main()
