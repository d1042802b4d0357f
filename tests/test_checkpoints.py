"""Checkpoint completeness, resume choice, setting aside and rotation (g2rpo.train.checkpoints), and the
signal handler's decisions (g2rpo.train.lifecycle), on real folders and real signals; no model needed.
The whole path through a training run is in tests/test_interrupt.py."""

from __future__ import annotations

import os
import signal

import pytest

from g2rpo.api.spec import G2RPOJobSpec, SpecError
from g2rpo.train.build import resolve_resume
from g2rpo.train.checkpoints import COMPLETE_MARKER, is_complete, mark_complete, newest_complete, rotate
from g2rpo.train.lifecycle import StopRequested, StopSignals


def checkpoint(root, step, complete=True, files=("model.safetensors", "optimizer.pt")):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"x" * step)
    if complete:
        mark_complete(folder, step)
    return folder


def spec(resume="auto") -> G2RPOJobSpec:
    return G2RPOJobSpec.model_validate(
        {"model": {"name": "m"}, "dataset": {"name": "builtin:arithmetic"}, "checkpoint": {"resume": resume}}
    )


def test_a_checkpoint_is_complete_only_with_its_marker_and_every_listed_file_intact(tmp_path):
    folder = checkpoint(tmp_path, 3)
    assert is_complete(folder)
    (folder / "optimizer.pt").write_bytes(b"")  # cut short
    assert not is_complete(folder)
    assert not is_complete(checkpoint(tmp_path, 4, complete=False))


def test_auto_resume_takes_the_newest_complete_checkpoint_and_sets_newer_incomplete_ones_aside(tmp_path, caplog):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 4)
    checkpoint(tmp_path, 6, complete=False)
    damaged = checkpoint(tmp_path, 8)
    (damaged / "model.safetensors").unlink()
    assert newest_complete(tmp_path).checkpoint == tmp_path / "checkpoint-4"
    assert resolve_resume(spec(), tmp_path) == str(tmp_path / "checkpoint-4")
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-8'}: files missing" in caplog.text
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-6'}: no {COMPLETE_MARKER}" in caplog.text
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-2", "checkpoint-4", "incomplete-checkpoint-6", "incomplete-checkpoint-8"]


def test_resume_never_starts_fresh_and_an_explicit_incomplete_checkpoint_is_refused(tmp_path):
    checkpoint(tmp_path, 2)
    incomplete = checkpoint(tmp_path, 4, complete=False)
    assert resolve_resume(spec("never"), tmp_path) is None
    with pytest.raises(SpecError, match=r"spec\.checkpoint\.resume: .*checkpoint-4 is not a complete checkpoint"):
        resolve_resume(spec(str(incomplete)), tmp_path)
    assert resolve_resume(spec(), tmp_path / "nothing-here") is None


def test_rotation_keeps_the_newest_complete_ones_and_drops_set_aside_leftovers(tmp_path):
    for step in (2, 4, 6):
        checkpoint(tmp_path, step)
    (tmp_path / "incomplete-checkpoint-8").mkdir()
    rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_first_signal_outside_training_raises_at_once(tmp_path):
    signals = StopSignals().install()
    try:
        with pytest.raises(StopRequested) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
        assert caught.value.exit_code == 143
    finally:
        signals.restore()


def test_first_signal_in_training_is_a_request_and_a_quick_repeat_is_the_same_request(capsys):
    signals = StopSignals(duplicate_window_s=60).install()
    signals.training = True
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher forwarding the same Ctrl-C: not an abort
    finally:
        signals.restore()
    assert signals.signum == signal.SIGINT
    assert "SIGINT: stopping after the current step and saving a checkpoint" in capsys.readouterr().err
