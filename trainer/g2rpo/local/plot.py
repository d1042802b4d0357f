"""The local run's picture: the driving reward (all, guided, unguided) and guidance length per step."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(metrics_file: Path, out: Path, title: str, reward: str = "accuracy") -> Path:
    """`reward`: the reward that drives the schedule, whose means the metrics file holds as g2rpo/accuracy*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_file) if "g2rpo/accuracy" in r]
    steps = [r["step"] for r in records]
    fig, reward_axis = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (
        ("g2rpo/accuracy", f"{reward} (all)", "-"),
        ("g2rpo/accuracy_guided", "guided roll-outs", "--"),
        ("g2rpo/accuracy_unguided", "unguided roll-outs", ":"),
    ):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            reward_axis.plot(*zip(*points), style, marker="o", markersize=3, label=label)
    reward_axis.set_xlabel("optimizer step")
    reward_axis.set_ylabel(f"{reward} reward")
    reward_axis.set_ylim(-0.05, 1.05)
    length_axis = reward_axis.twinx()
    length_axis.step(steps, [r["g2rpo/guidance_length"] for r in records], where="post", color="tab:red", label="guidance length l_k")
    length_axis.set_ylabel("guidance length (tokens)", color="tab:red")
    handles = reward_axis.get_legend_handles_labels()[0] + length_axis.get_legend_handles_labels()[0]
    labels = reward_axis.get_legend_handles_labels()[1] + length_axis.get_legend_handles_labels()[1]
    reward_axis.legend(handles, labels, loc="upper left", fontsize=8)
    reward_axis.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
