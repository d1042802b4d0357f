"""What G2RPO-A costs over TRL's GRPOTrainer: step time, and the tokens each step decodes.

    .venv/bin/python bench/overhead.py [--steps 12] [--repeats 2] [--hidden 64] [--cuda]

The variants of bench/step_time.py (same tiny Qwen3, data, reward and config; G = 4, 8 roll-outs
per step, maxCompletionLength 32): TRL's GRPOTrainer, G2RPOTrainer at alpha = 0, at alpha = 0.5
(2 of 4 guided, adaptive l from 16) and at alpha = 1. Runs alternate within one process.

Guidance must be prefilled, never decoded: a guided roll-out starts generation from
`prompt + l guidance tokens` and then decodes at most maxCompletionLength tokens of its own,
exactly like an unguided one. This is measured, not assumed: the model's `generate` is wrapped
and a forward pre-hook sees every forward pass inside it. The first pass of a call is the
prefill (its width is the padded prompt, guidance included); every further pass decodes one
token per row. Per row we count the tokens the call produced up to and including the first EOS
(what TRL keeps), the prefilled tokens (attention mask), and the guidance tokens that the trainer
put in front (its guidance plan). The script fails if any call decodes more than
maxCompletionLength tokens.

Writes bench/results/overhead.json and prints two tables: the median step time (wall, and this
process's CPU time, which a shared machine disturbs less) as a ratio of TRL's, and decoded /
prefilled tokens per step and per row, guided rows apart.

The random tiny model's next-token distribution is close to uniform, so with one seed every
variant samples EOS at nearly the same positions and decodes nearly the same number of tokens
per step; what the counts show is where the guidance goes (the prefill) and the per-row bound.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from step_time import INITIAL_GUIDANCE_LENGTH, MAX_COMPLETION_LENGTH, build

from g2rpo.models.tiny import build_tiny_model

VARIANTS = {  # name -> (trainer, guided roll-outs per group of 4)
    "trl GRPOTrainer": ("trl", 0),
    "g2rpo alpha=0": ("g2rpo", 0),
    "g2rpo alpha=0.5": ("g2rpo", 2),
    "g2rpo alpha=1": ("g2rpo", 4),
}
RESULTS = Path(__file__).parent / "results" / "overhead.json"


@dataclass
class RowCount:
    guided: bool
    guidance: int  # guidance tokens put in front of the prompt for this row
    prefilled: int  # prompt + guidance tokens the prefill pass read (padding excluded)
    decoded: int  # tokens produced by this generate call for this row, up to and including the first EOS
    ended: bool  # produced an EOS (else it was cut at maxCompletionLength)


@dataclass
class GenerateCall:
    run: int  # which training run (variant repeat) made the call
    step: int
    forwards: int  # forward passes inside the call: 1 prefill + one per further decoded token
    new_positions: int  # output width - input width: tokens decoded per row, padding included
    rows: list[RowCount] = field(default_factory=list)


class DecodeCounter(TrainerCallback):
    """Wraps `trainer.model.generate` and counts what each call prefills and decodes."""

    def __init__(self, trainer, run: int):
        self.trainer = trainer
        self.run = run
        self.calls: list[GenerateCall] = []
        self.step = 0
        self._widths: list[int] | None = None
        model = trainer.model
        model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        original = model.generate

        def counting_generate(*args, **kwargs):
            self._widths = []
            try:
                output = original(*args, **kwargs)
            finally:
                widths, self._widths = self._widths, None
            self._record(kwargs["input_ids"], kwargs.get("attention_mask"), output, widths)
            return output

        model.generate = counting_generate

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def _on_forward(self, module, args, kwargs):
        if self._widths is not None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._widths.append(ids.shape[1])

    def _record(self, input_ids, attention_mask, output, widths: list[int]) -> None:
        width = input_ids.shape[1]
        assert widths[0] == width and all(w == 1 for w in widths[1:]), f"unexpected forward widths {widths}"
        plan = getattr(self.trainer, "_guidance_plan", None)
        eos = set(self.trainer.eos_token_ids)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        call = GenerateCall(run=self.run, step=self.step, forwards=len(widths), new_positions=output.shape[1] - width)
        for row in range(input_ids.shape[0]):
            new = output[row, width:].tolist()
            ended_at = next((i + 1 for i, token in enumerate(new) if token in eos), None)
            guided = bool(plan.guided[row]) if plan is not None else False
            guidance = plan.lengths[row] if plan is not None else 0
            decoded = ended_at if ended_at is not None else len(new)
            call.rows.append(RowCount(guided, guidance, int(mask[row].sum()), decoded, ended_at is not None))
        if call.forwards > MAX_COMPLETION_LENGTH or call.new_positions > MAX_COMPLETION_LENGTH:
            raise AssertionError(
                f"a generate call decoded {call.new_positions} tokens per row in {call.forwards} passes, "
                f"more than maxCompletionLength = {MAX_COMPLETION_LENGTH}: guidance is being decoded"
            )
        self.calls.append(call)


def measure(kind: str, guided: int, model_dir: Path, steps: int, out: Path, cuda: bool, run: int):
    trainer, timer = build(kind, model_dir, steps, out, guided, cuda)
    counter = DecodeCounter(trainer, run)
    trainer.add_callback(counter)
    trainer.train()
    warm = 2  # the first steps warm up allocators and caches
    return timer.times[warm:], timer.cpu_times[warm:], [call for call in counter.calls if call.step >= warm]


def summarise(calls: list[GenerateCall]) -> dict[str, float | int | None]:
    rows = [row for call in calls for row in call.rows]
    guided = [row for row in rows if row.guided]
    unguided = [row for row in rows if not row.guided]
    steps = len({(call.run, call.step) for call in calls})

    def mean(values):
        return statistics.fmean(values) if values else None

    return {
        "steps_measured": steps,
        "rows_per_step": len(rows) / steps,
        "guided_rows_per_step": len(guided) / steps,
        "decoded_tokens_per_step": sum(row.decoded for row in rows) / steps,
        "decode_passes_per_step": sum(call.forwards for call in calls) / steps,
        "prefilled_tokens_per_step": sum(row.prefilled for row in rows) / steps,
        "decoded_per_guided_row": mean([row.decoded for row in guided]),
        "decoded_per_unguided_row": mean([row.decoded for row in unguided]),
        "max_decoded_per_row": max(row.decoded for row in rows),
        "max_decode_passes_per_call": max(call.forwards for call in calls),
        "guidance_per_guided_row": mean([row.guidance for row in guided]),
        "prefilled_per_guided_row": mean([row.prefilled for row in guided]),
        "prefilled_per_unguided_row": mean([row.prefilled for row in unguided]),
        "trained_completion_per_guided_row": mean([row.guidance + row.decoded for row in guided]),
        "eos_rate": mean([float(row.ended) for row in rows]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cuda", action="store_true", help="bf16 on the GPU instead of float32 on the CPU")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the random Qwen3")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    calls: dict[str, list[GenerateCall]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", hidden_size=args.hidden)
        for repeat in range(args.repeats):
            # Every other repeat runs the variants in reverse order, so that a machine getting busier
            # or quieter during the run does not favour the variants that run later.
            order = list(VARIANTS.items()) if repeat % 2 == 0 else list(reversed(VARIANTS.items()))
            for name, (kind, guided) in order:
                out = Path(tmp) / f"{kind}{guided}-{repeat}"
                step_times, step_cpu_times, step_calls = measure(
                    kind, guided, model_dir, args.steps, out, args.cuda, run=repeat
                )
                times[name] += step_times
                cpu_times[name] += step_cpu_times
                calls[name] += step_calls

    baseline = statistics.median(times["trl GRPOTrainer"])
    cpu_baseline = statistics.median(cpu_times["trl GRPOTrainer"])
    where = (
        f"bf16 on {torch.cuda.get_device_name(0)}"
        if args.cuda
        else f"float32 on CPU ({torch.get_num_threads()} threads)"
    )
    results = {
        "setup": {
            "model": f"random Qwen3, hidden {args.hidden}, character tokenizer",
            "where": where,
            "machine": platform.platform(),
            "num_generations": 4,
            "rollouts_per_step": 8,
            "max_completion_length": MAX_COMPLETION_LENGTH,
            "initial_guidance_length": INITIAL_GUIDANCE_LENGTH,
            "steps": args.steps,
            "repeats": args.repeats,
            "torch": torch.__version__,
        },
        "variants": {},
    }
    for name in VARIANTS:
        median = statistics.median(times[name])
        cpu_median = statistics.median(cpu_times[name])
        results["variants"][name] = {
            "median_step_s": median,
            "step_time_ratio_vs_trl": median / baseline,
            "median_step_cpu_s": cpu_median,
            "step_cpu_time_ratio_vs_trl": cpu_median / cpu_baseline,
            **summarise(calls[name]),
        }
    trl_decoded = results["variants"]["trl GRPOTrainer"]["decoded_tokens_per_step"]
    for summary in results["variants"].values():
        summary["decoded_tokens_ratio_vs_trl"] = summary["decoded_tokens_per_step"] / trl_decoded

    print(f"\nstep time ({where}; G=4, 8 roll-outs x {MAX_COMPLETION_LENGTH} tokens)")
    print(f"{'variant':<17} {'median step (ms)':>17} {'ratio vs TRL':>13} {'CPU time (ms)':>14} {'ratio vs TRL':>13}")
    for name, s in results["variants"].items():
        print(
            f"{name:<17} {s['median_step_s'] * 1000:>17.1f} {s['step_time_ratio_vs_trl']:>13.3f} "
            f"{s['median_step_cpu_s'] * 1000:>14.1f} {s['step_cpu_time_ratio_vs_trl']:>13.3f}"
        )
    print(f"\ntokens per step (maxCompletionLength {MAX_COMPLETION_LENGTH})")
    print(
        f"{'variant':<17} {'guided rows':>11} {'decoded':>8} {'vs TRL':>7} {'decoded/guided row':>19} "
        f"{'decoded/unguided row':>21} {'max/row':>8} {'guidance/guided row':>20} {'prefill guided':>15} {'prefill unguided':>17}"
    )
    for name, s in results["variants"].items():
        print(
            f"{name:<17} {s['guided_rows_per_step']:>11.1f} {s['decoded_tokens_per_step']:>8.1f} "
            f"{s['decoded_tokens_ratio_vs_trl']:>7.3f} {_fmt(s['decoded_per_guided_row']):>19} "
            f"{_fmt(s['decoded_per_unguided_row']):>21} {s['max_decoded_per_row']:>8} "
            f"{_fmt(s['guidance_per_guided_row']):>20} {_fmt(s['prefilled_per_guided_row']):>15} "
            f"{_fmt(s['prefilled_per_unguided_row']):>17}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults: {args.output}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
