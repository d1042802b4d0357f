"""A real two-process run (torchrun, gloo on CPU): both ranks use identical l_k, the guided rows
sit at the same global group positions as in one process, and r_k is the global mean."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from g2rpo.guidance.schedule import ScheduleParams, lengths_for

WORKER = Path(__file__).parent / "dist" / "two_rank_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*worker_args: str, worker: Path = WORKER) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(worker),
            *worker_args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # generous: CI machines are shared
    )


@pytest.mark.slow
def test_two_ranks_share_guidance_length_and_rows(tiny_model_dir, tmp_path):
    result = _torchrun(str(tiny_model_dir), str(tmp_path))
    # Exit code 0 on both ranks also proves the clean teardown: without destroying the process
    # group, a rank aborted at exit now and then (SIGABRT, see g2rpo.train.lifecycle).
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # r_k is the mean over both ranks' rows; l_k follows the schedule; both ranks agree.
    rewards = [(a + b) / 2 for a, b in zip([1.0, 0.0, 0.5, 1.0], [0.0, 0.5, 0.5, 0.5], strict=False)]
    assert ranks[0]["controller_rewards"] == rewards
    expected = lengths_for(ScheduleParams("adaptive", 8, 1, 64, window=2), rewards)
    assert ranks[0]["controller_lengths"] == expected[:4]
    assert ranks[0]["lengths_after_each_step"] == ranks[1]["lengths_after_each_step"] == expected[1:]

    # The tracking backends get g2rpo's metrics from rank 0 only, once per step: one TensorBoard writer.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    logged = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("train/g2rpo/guidance_length")
    assert [(p.step, p.value) for p in logged] == [(k + 1, float(length)) for k, length in enumerate(expected[:4])]

    # One group of 4 spans both ranks (2 rows each): only global row 0 (rank 0, row 0) is guided.
    for step in range(4):
        global_rows = ranks[0]["calls"][step]["completion_ids"] + ranks[1]["calls"][step]["completion_ids"]
        global_guidance = ranks[0]["calls"][step]["guidance_ids"] + ranks[1]["calls"][step]["guidance_ids"]
        length = expected[step]
        for row, (ids, guidance) in enumerate(zip(global_rows, global_guidance, strict=False)):
            starts_with_guidance = ids[:length] == guidance[:length]
            assert starts_with_guidance == (row % 4 == 0), f"step {step} row {row}"


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_at_the_same_step_with_a_complete_checkpoint(tiny_model_dir, tmp_path):
    """One preempted pod: only rank 1 gets SIGTERM (end of step 2); both ranks stop after step 2."""
    from g2rpo.train.checkpoints import is_complete

    result = _torchrun(str(tiny_model_dir), str(tmp_path), "2")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [2, 2], result.stderr[-4000:]
    assert [r["exit_code"] for r in ranks] == [143, 143]
    assert [len(r["calls"]) for r in ranks] == [2, 2]
    assert is_complete(tmp_path / "trainer" / "checkpoint-2")
    assert "terminate called" not in result.stderr


@pytest.mark.slow
def test_two_ranks_guide_a_group_only_when_its_rows_on_both_ranks_failed(tiny_model_dir, tmp_path):
    """`guidance.groups: unsolved` across ranks (tests/dist/two_rank_unsolved_worker.py): the group's
    verdict reads both ranks' unguided rewards, and a rank with no row to regenerate still takes part
    in the second generation (TRL's vLLM paths need the same number of rows from every rank)."""
    result = _torchrun(str(tiny_model_dir), str(tmp_path), worker=WORKER.with_name("two_rank_unsolved_worker.py"))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["guided_groups"] == [0.0, 1.0, 1.0]
    for step in range(3):
        probe, final = ranks[0]["calls"][2 * step], ranks[0]["calls"][2 * step + 1]
        guidance = final["guidance_ids"][0][:5]
        assert probe["completion_ids"][0][:5] != guidance
        assert (final["completion_ids"][0][:5] == guidance) == (step > 0), f"step {step}"
        assert final["completion_ids"][1] == probe["completion_ids"][1]
        assert ranks[1]["calls"][2 * step + 1]["completion_ids"] == ranks[1]["calls"][2 * step]["completion_ids"]
