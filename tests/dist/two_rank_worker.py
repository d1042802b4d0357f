"""One rank of a real two-process G2RPO-A run (torchrun, gloo on CPU); writes what it saw as JSON.

Rank r's scripted reward is REWARDS[r][k] at step k, so the controller must see their mean:
r_k is the global batch's mean, not one rank's.

With a third argument STEP, rank 1 alone gets SIGTERM at the end of step STEP (as when Kubernetes
preempts one pod): the production stop handling (g2rpo.train.lifecycle) must stop both ranks there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainerCallback  # noqa: E402

from g2rpo.train.lifecycle import (  # noqa: E402
    StopAtStepBoundary,
    StopSignals,
    distributed_teardown,
    exit_code_for,
    exit_process,
)
from trainer_support import ScriptedReward, make_trainer  # noqa: E402

REWARDS = {0: [1.0, 0.0, 0.5, 1.0], 1: [0.0, 0.5, 0.5, 0.5]}


class LengthLog(TrainerCallback):
    def __init__(self, trainer, sink):
        self.trainer, self.sink = trainer, sink

    def on_step_end(self, args, state, control, **kwargs):
        self.sink.append(self.trainer.guidance_length)


class SignalRankOne(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if int(os.environ["RANK"]) == 1 and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main(model_dir: str, out_dir: str, stop_at: int | None = None) -> int:
    rank = int(os.environ["RANK"])
    signals = StopSignals().install()
    reward = ScriptedReward(REWARDS[rank])
    # Every rank runs transformers' TensorBoard callback; only rank 0 may write (tests/test_two_ranks.py).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(out_dir) / "tensorboard")
    trainer, _, tokenizer = make_trainer(
        Path(model_dir),
        Path(out_dir) / "trainer",
        reward=reward,
        num_generations=4,
        per_device_batch_size=2,
        guided_per_group=1,
        schedule="adaptive",
        initial_length=8,
        min_length=1,
        max_length=64,
        max_steps=4,
        report_to=["tensorboard"],
    )
    lengths: list[int] = []
    trainer.add_callback(LengthLog(trainer, lengths))
    if stop_at is not None:
        trainer.add_callback(SignalRankOne(stop_at))
    trainer.add_callback(StopAtStepBoundary(signals))
    trainer.train()
    exit_code = exit_code_for(signals.stopped_by) if signals.stopped_by else 0
    record = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "exit_code": exit_code,
        "lengths_after_each_step": lengths,
        "calls": [
            {
                "completion_ids": c["completion_ids"],
                "guidance_ids": [tokenizer(g, add_special_tokens=False)["input_ids"] for g in c["guidance"]],
            }
            for c in reward.calls
        ],
    }
    if trainer.guidance_client is not None:
        record["controller_rewards"] = [r.reward for r in trainer.guidance_client.controller.history]
        record["controller_lengths"] = [r.length_used for r in trainer.guidance_client.controller.history]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    return exit_code


if __name__ == "__main__":
    # The production entry point's ending (g2rpo.train.__main__): without it a rank can abort at exit.
    with distributed_teardown():
        code = main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
    exit_process(code)
