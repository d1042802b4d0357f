"""Trainer callbacks: the per-step metrics file, guidance state in checkpoints, a progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Appends every training log (one line per logged step) to a JSON-lines file, rank 0 only.

    On a resume, records of steps after the checkpoint (trained again now) and a line cut by a
    kill are dropped first, so the file holds each step once, as trained.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not state.global_step or not self.path.is_file():
            return
        from g2rpo.durable import atomic_write_text

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= state.global_step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        record = {"step": state.global_step, "time": time.time()}
        record.update({k: _json_number(v) for k, v in logs.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class GuidanceCheckpointCallback(TrainerCallback):
    """Completes each checkpoint once every rank has written its part (g2rpo.train.checkpoints).

    G2RPOTrainer adds it itself. on_save runs after transformers' and TRL's checkpoint code, so
    on rank 0: the guidance controller's state, then the completion marker, then the checkpoint
    store (g2rpo.train.store: an upload when checkpoint.uri is set), then rotation.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        from g2rpo.train.checkpoints import mark_complete, rotate
        from g2rpo.train.storage import raise_if_out_of_space

        self.trainer.accelerator.wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            try:
                self.trainer.save_guidance(folder)
                mark_complete(folder, state.global_step)
            except OSError as exc:
                raise_if_out_of_space(exc, Path(args.output_dir), state.global_step, main_rank=True)
                raise
            self.trainer.checkpoint_store.publish(folder)
            rotate(Path(args.output_dir), self.trainer.checkpoint_keep)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.trainer.checkpoint_store.wait()  # the last upload, before the run reports its checkpoint


class CheckpointRoomCallback(TrainerCallback):
    """Before each save: stop on every rank alike when the volume has less room than the last checkpoint
    took (g2rpo.train.storage), instead of dying half-way through torch.save. G2RPOTrainer adds it last, so
    it sees the save that any earlier callback asked for."""

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_save:
            return
        from g2rpo.train.storage import room_problem

        problem = room_problem(Path(args.output_dir), state.global_step) if state.is_world_process_zero else None
        if _any_rank(problem is not None):
            from g2rpo.train.storage import CheckpointsFull

            raise problem or CheckpointsFull(
                f"no room for checkpoint-{state.global_step} in {args.output_dir} (rank 0 has the details)",
                secondhand=True,
            )


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (every rank must call it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    from accelerate import PartialState

    tensor = torch.tensor([int(flag)], device=PartialState().device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps showing the driving reward (acc, or the reward's name) and the
    guidance length."""

    def __init__(self, driving_reward: str = "accuracy"):
        self.bar = None
        self.reward_label = "acc" if driving_reward == "accuracy" else driving_reward

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="g2rpo", unit="step")

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if self.bar is None or not logs:
            return
        self.bar.set_postfix(_headline(logs, self.reward_label))

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepLineCallback(TrainerCallback):
    """Instead of a progress bar (g2rpo run --no-progress): one short line per logged step, rank 0 only, in
    place of transformers' PrinterCallback and its dict of every logged value (those are in metrics.jsonl)."""

    def __init__(self, driving_reward: str = "accuracy"):
        self.reward_label = "acc" if driving_reward == "accuracy" else driving_reward

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not state.is_world_process_zero or not logs or "g2rpo/accuracy" not in logs:
            return
        shown = {**_headline(logs, self.reward_label), "loss": _short(logs.get("loss"))}
        seconds = logs.get("step_time")
        line = f"step {state.global_step}/{state.max_steps} " + " ".join(f"{k}={v}" for k, v in shown.items() if v)
        print(line + (f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""), flush=True)


def _headline(logs: dict[str, Any], reward_label: str) -> dict[str, str]:
    """The driving reward (all, guided, unguided roll-outs) and l_k, as the bar and the step lines show them."""
    shown = {
        reward_label: logs.get("g2rpo/accuracy"),
        "guided": logs.get("g2rpo/accuracy_guided"),
        "unguided": logs.get("g2rpo/accuracy_unguided"),
        "l_k": logs.get("g2rpo/guidance_length"),
    }
    return {k: _short(v) for k, v in shown.items() if _short(v)}


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else ""


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
