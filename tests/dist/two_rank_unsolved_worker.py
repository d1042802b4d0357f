"""One rank of a real two-process run with `guidance.groups: unsolved` (torchrun, gloo on CPU).

One group of 4 spans both ranks (2 rows each); its guided row (floor(0.25*4) = 1: global row 0) is on
rank 0. Rank 0's roll-outs always score 0; rank 1's score 1 at step 0 and 0 from step 1 on, per call
(a probe and the trained batch per step). So at step 0 the group is solved by rank 1's rows alone and
rank 0 must guide nothing: the decision reads the gathered rewards. From step 1 the group is
unsolved: rank 0 regenerates its row and rank 1, with nothing to regenerate, still takes part.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2rpo.train.lifecycle import distributed_teardown, exit_process

from trainer_support import ScriptedReward, make_trainer

SCRIPTS = {0: [0.0] * 6, 1: [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]}


def main(model_dir: str, out_dir: str) -> int:
    rank = int(os.environ["RANK"])
    reward = ScriptedReward(SCRIPTS[rank])
    trainer, _, tokenizer = make_trainer(
        Path(model_dir),
        Path(out_dir) / "trainer",
        reward=reward,
        num_generations=4,
        per_device_batch_size=2,
        guided_per_group=1,
        schedule="fixed",
        initial_length=5,
        max_steps=3,
        guidance_groups="unsolved",
    )
    trainer.train()
    record = {
        "calls": [
            {
                "completion_ids": c["completion_ids"],
                "guidance_ids": [tokenizer(g, add_special_tokens=False)["input_ids"] for g in c["guidance"]],
            }
            for c in reward.calls
        ],
    }
    if trainer.guidance_client is not None:
        record["guided_groups"] = [r.metrics["guided_groups"] for r in trainer.guidance_client.controller.history]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    with distributed_teardown():
        code = main(sys.argv[1], sys.argv[2])
    exit_process(code)
