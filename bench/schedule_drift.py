"""The paper's adaptive rule under a reward that does not change: where does l_k go?

    python -m bench.schedule_drift        # -> bench/results/schedule-drift.json (a few seconds)

Eq. 5 (g2rpo.guidance.schedule) multiplies l_k by mean(r_{k-1}, ..., r_{k-T}) / r_k. When r_k is a
noisy step mean with no trend, the log of that ratio has a positive mean (Jensen: the window mean
is less spread than one step's r_k, and 1/r_k is convex), so l_k random-walks upwards. bench/efficacy/chains saw it in every G2RPO-A run (l_k 24 ->
about 70 in 80 steps while the unguided accuracy stayed flat). This replays the schedule, nothing
else: each step's reward is the mean of `rollouts` Bernoulli(p) draws, the same p at every step.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from g2rpo.guidance.schedule import ScheduleParams, lengths_for

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "schedule-drift.json"
STEPS, ROLLOUTS, RUNS, INITIAL = 80, 64, 200, 24  # bench/efficacy/chains: 80 steps of 8 prompts x G 8, l_0 24


def replay(p: float, reward_ema: float, window: int) -> dict:
    params = ScheduleParams(
        schedule="adaptive", initial_length=INITIAL, min_length=2, max_length=96, window=window, reward_ema=reward_ema
    )
    finals = []
    for seed in range(RUNS):
        rng = random.Random(seed)
        rewards = [sum(rng.random() < p for _ in range(ROLLOUTS)) / ROLLOUTS for _ in range(STEPS)]
        finals.append(lengths_for(params, rewards)[-1])
    return {
        "success_rate": p,
        "reward_ema": reward_ema,
        "window": window,
        "final_over_initial_median": statistics.median(finals) / INITIAL,
        "share_of_runs_ending_above_initial": sum(f > INITIAL for f in finals) / RUNS,
    }


def main() -> None:
    rows = [replay(p, ema, window) for p in (0.1, 0.2, 0.4) for ema in (0.0, 0.5, 0.9) for window in (2, 8)]
    for row in rows:
        print(
            f"p {row['success_rate']:.1f}  reward_ema {row['reward_ema']:.1f}  T {row['window']}:  "
            f"median l_80 / l_0 = {row['final_over_initial_median']:.2f}, "
            f"runs ending above l_0: {row['share_of_runs_ending_above_initial']:.2f}"
        )
    config = {"steps": STEPS, "rollouts_per_step": ROLLOUTS, "runs": RUNS, "initial_length": INITIAL}
    RESULTS.write_text(json.dumps({"config": config, "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
