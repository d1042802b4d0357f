"""A cluster trainer restarted after its last step's checkpoint trains no further.

transformers decides that training ends only after a step (DefaultFlowCallback.on_step_end), so
`train(resume_from_checkpoint=...)` from the last step trains one step past the end, saves it and
overwrites final/ (g2rpo.train.build.finished_step). A trainer pod lost between its last checkpoint
and its exit (a node drain, a preemption) is restarted by the Job and resumes from exactly there.
The real entry point (`python -m g2rpo.train`, tiny model) runs against the real controller service
on loopback, as in the cluster; one process stands in for the ranks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from controller_support import controller_service, tiny_cluster_job

from g2rpo.train.checkpoints import COMPLETE_MARKER

TOKEN = "restart-test-token"


@pytest.fixture
def job_file(tiny_model_dir, tmp_path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(tiny_cluster_job(tiny_model_dir, "tiny-restart", max_steps=2))
    return path


@pytest.fixture
def controller(job_file, tmp_path) -> Iterator[str]:
    with controller_service(job_file, tmp_path, TOKEN) as service:
        yield service.url


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_trainer_restarted_after_its_last_checkpoint_exits_0_without_training_and_rebuilds_a_missing_final(
    job_file, controller, tmp_path
):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    def train() -> str:
        env = {
            **os.environ,
            "G2RPO_CONTROLLER_URL": controller,
            "G2RPO_CONTROLLER_TOKEN_FILE": str(tmp_path / "token"),
            "CUDA_VISIBLE_DEVICES": "",
        }
        command = [sys.executable, "-m", "g2rpo.train", "--job", str(job_file), "--run-dir", str(run)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-2"]
        return done.stderr

    train()
    final = _digests(run / "final")
    metrics = (run / "metrics.jsonl").read_text()

    assert "nothing to train or save" in train()
    assert _digests(run / "final") == final
    assert (run / "metrics.jsonl").read_text() == metrics

    # Lost before final/ was saved: final/ is the last checkpoint's model, as the run would have saved it.
    shutil.rmtree(run / "final")
    assert "its model becomes" in train()
    assert _digests(run / "final") == final
    assert (run / "metrics.jsonl").read_text() == metrics
    assert not {COMPLETE_MARKER, "optimizer.pt", "scheduler.pt", "trainer_state.json", "guidance_state.json"} & set(
        final
    )
