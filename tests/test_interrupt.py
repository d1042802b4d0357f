"""A run killed or interrupted while a checkpoint is being written resumes as if nothing happened.

Each scenario runs the real `g2rpo run` (tiny model) in a subprocess. The trainer's test-only
hook G2RPO_TEST_PAUSE_IN_CHECKPOINT="STEP:DIR" (g2rpo.train.trainer) stops the save of
checkpoint-STEP right after the model weights are written and writes DIR/paused; the test then
sends its signal, so the kill lands inside the save every time, not by luck of timing.
Resumed runs must log the same per-step losses and guidance lengths as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g2rpo.train.checkpoints import COMPLETE_MARKER, is_complete

JOB = """\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: tiny-interrupt}}
spec:
  model: {{name: "{model}"}}
  dataset:
    name: builtin:arithmetic
    arithmetic: {{numProblems: 24, minSteps: 1, maxSteps: 3}}
    guidanceColumn: solution
  rewards: [{{name: accuracy}}, {{name: format, weight: 0.1}}]
  guidance: {{ratio: 0.5, schedule: adaptive, initialLength: 16, minLength: 2, maxLength: 64}}
  training: {{numGenerations: 4, perDeviceBatchSize: 4, maxSteps: 4, maxCompletionLength: 8, learningRate: 1.0e-3}}
  checkpoint: {{everySteps: 2, keep: 3}}
"""
COMPARED = ("loss", "g2rpo/guidance_length", "g2rpo/accuracy", "reward", "grad_norm")


def _command(job_file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "g2rpo.cli", "run", str(job_file), "--output", str(out), "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", **extra}


def _run(job_file: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command(job_file, out), capture_output=True, text=True, timeout=600, env=_env())


class PausedRun:
    """A `g2rpo run` paused inside the save of one checkpoint; its stderr goes to a file we can watch."""

    def __init__(self, job_file: Path, out: Path | None, step: int, hook_dir: Path, cwd: Path | None = None):
        """`out` None: the default run folder (runs/<job name> under `cwd`)."""
        hook_dir.mkdir()
        self.hook_dir = hook_dir
        self.stderr_file = hook_dir / "stderr.txt"
        command = _command(job_file, out) if out else [sys.executable, "-m", "g2rpo.cli", "run", str(job_file)]
        with self.stderr_file.open("w") as stderr:
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=cwd,
                env=_env(G2RPO_TEST_PAUSE_IN_CHECKPOINT=f"{step}:{hook_dir}"),
            )
        self._wait(lambda: (hook_dir / "paused").exists(), "the run never reached the checkpoint save")

    def signal(self, signum: int) -> None:
        """Send `signum` and wait until the run says it will stop (so the handler has run)."""
        self.process.send_signal(signum)
        name = signal.Signals(signum).name
        self._wait(lambda: f"{name}: stopping after the current step" in self.stderr, f"no reaction to {name}")

    def release(self) -> None:
        (self.hook_dir / "release").touch()

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        self.process.wait(timeout=timeout)
        return self.process.returncode, self.stderr

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text()

    def _wait(self, done, message: str) -> None:
        deadline = time.monotonic() + 600
        while not done():
            assert self.process.poll() is None, self.stderr[-3000:]
            assert time.monotonic() < deadline, message
            time.sleep(0.1)


def _per_step(out: Path) -> dict[int, dict]:
    """Each step's logged record; a resumed run first drops the records of the steps it trains again."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"each step once, in order: {steps}"
    return {r["step"]: {k: r.get(k) for k in COMPARED} for r in records if "loss" in r}


@pytest.fixture(scope="module")
def job_file(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job") / "job.yaml"
    path.write_text(JOB.format(model=tiny_model_dir))
    return path


@pytest.fixture(scope="module")
def uninterrupted(job_file, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _run(job_file, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return _per_step(out)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_checkpoint_resumes_from_the_previous_one(job_file, uninterrupted, tmp_path):
    out = tmp_path / "run"
    run = PausedRun(job_file, out, 4, tmp_path / "hook")
    run.process.kill()
    run.finish()
    checkpoints = out / "checkpoints"
    assert is_complete(checkpoints / "checkpoint-2")
    assert (checkpoints / "checkpoint-4" / "model.safetensors").is_file()
    assert not (checkpoints / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert not (checkpoints / "checkpoint-4" / "guidance_state.json").exists()

    resumed = _run(job_file, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping incomplete checkpoint {checkpoints / 'checkpoint-4'}: no {COMPLETE_MARKER}" in resumed.stderr
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in resumed.stderr
    assert _per_step(out) == uninterrupted, "the resumed run must train steps 3-4 exactly as an uninterrupted run"
    # The set-aside incomplete folder is gone once checkpoint-4 was written again, completely.
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    assert is_complete(checkpoints / "checkpoint-4")


@pytest.mark.slow
def test_sigint_in_the_middle_of_a_checkpoint_finishes_it_stops_and_says_how_to_resume(
    job_file, uninterrupted, tmp_path
):
    out = tmp_path / "run"
    run = PausedRun(job_file, out, 2, tmp_path / "hook")
    run.signal(signal.SIGINT)
    run.release()
    code, stderr = run.finish()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    checkpoints = out / "checkpoints"
    assert stderr.rstrip().splitlines()[-1] == (
        f"stopped by SIGINT; last checkpoint: {checkpoints / 'checkpoint-2'}; "
        f"resume with: g2rpo run {job_file} --output {out} --no-progress"
    )
    assert is_complete(checkpoints / "checkpoint-2")
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-2"], "stopped at the boundary"
    assert not (out / "final").exists()

    resumed = _run(job_file, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _per_step(out) == uninterrupted


@pytest.mark.slow
def test_the_printed_resume_command_resumes_from_another_folder(job_file, uninterrupted, tmp_path):
    """Started as `g2rpo run job.yaml` (relative path, default run folder runs/<name> under the current
    folder), interrupted; the command it prints, run from elsewhere, continues the same run (issue 19)."""
    first_folder, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first_folder.mkdir()
    elsewhere.mkdir()
    (first_folder / "job.yaml").write_text(job_file.read_text())
    run = PausedRun(Path("job.yaml"), None, 2, tmp_path / "hook", cwd=first_folder)
    run.signal(signal.SIGINT)
    run.release()
    code, stderr = run.finish()
    assert code == 130, stderr[-3000:]
    out = first_folder / "runs" / "tiny-interrupt"
    printed = stderr.rstrip().splitlines()[-1].split("resume with: ")[1]
    assert printed == f"g2rpo run {first_folder / 'job.yaml'} --output {out}"

    words = shlex.split(printed)
    assert words[0] == "g2rpo"
    resumed = subprocess.run(
        [sys.executable, "-m", "g2rpo.cli", *words[1:]],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in resumed.stderr
    assert "finished 'tiny-interrupt': 4 steps" in resumed.stdout
    assert not (elsewhere / "runs").exists(), "nothing is written under the folder the command ran from"
    assert _per_step(out) == uninterrupted


@pytest.mark.slow
def test_a_second_sigint_aborts_at_once_leaving_the_checkpoint_incomplete(job_file, tmp_path):
    out = tmp_path / "run"
    run = PausedRun(job_file, out, 2, tmp_path / "hook")
    run.signal(signal.SIGINT)
    time.sleep(1.2)  # past the window in which a second SIGINT is the launcher forwarding the first
    run.process.send_signal(signal.SIGINT)
    code, stderr = run.finish(timeout=120)  # never released: only the abort can end it
    assert code == 130
    assert "Traceback" not in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("SIGINT again: aborted at once")
    assert not is_complete(out / "checkpoints" / "checkpoint-2")


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(job_file, tmp_path):
    out = tmp_path / "run"
    run = PausedRun(job_file, out, 2, tmp_path / "hook")
    run.signal(signal.SIGTERM)
    run.release()
    code, stderr = run.finish()
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert (
        stderr.rstrip()
        .splitlines()[-1]
        .startswith(f"stopped by SIGTERM; last checkpoint: {out / 'checkpoints' / 'checkpoint-2'}")
    )
    assert is_complete(out / "checkpoints" / "checkpoint-2")
