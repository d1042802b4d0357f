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

    fig = figure([r for r in read_metrics(metrics_file) if "g2rpo/accuracy" in r], title, reward)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


REWARD_LIMITS = (-0.05, 1.05)


def figure(records: list[dict], title: str, reward: str):
    """Reward on the left axis, l_k on the right; both axes put their 0 at the same height, so the
    lowest l_k is drawn at its own value, not at reward 0. The legend sits below the axes, off the lines."""
    import matplotlib.pyplot as plt

    fig, reward_axis = plt.subplots(figsize=(8, 5), layout="constrained")
    for key, label, style in (
        ("g2rpo/accuracy", f"{reward} (all)", "-"),
        ("g2rpo/accuracy_guided", "guided roll-outs", "--"),
        ("g2rpo/accuracy_unguided", "unguided roll-outs", ":"),
    ):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            reward_axis.plot(*zip(*points, strict=False), style, marker="o", markersize=3, label=label)
    reward_axis.set_xlabel("optimizer step")
    reward_axis.set_ylabel(f"{reward} reward")
    reward_axis.set_ylim(*REWARD_LIMITS)
    length_axis = reward_axis.twinx()
    lengths = [r["g2rpo/guidance_length"] for r in records]
    length_axis.step([r["step"] for r in records], lengths, where="post", color="tab:red", label="guidance length l_k")
    top = max(lengths, default=0) or 1
    length_axis.set_ylim(REWARD_LIMITS[0] * top, REWARD_LIMITS[1] * top)
    length_axis.set_ylabel("guidance length l_k (tokens)", color="tab:red")
    handles, labels = (
        a + b
        for a, b in zip(reward_axis.get_legend_handles_labels(), length_axis.get_legend_handles_labels(), strict=False)
    )
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    reward_axis.set_title(title)
    return fig
