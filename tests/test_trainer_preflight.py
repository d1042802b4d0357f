"""The trainer's fatal problems, each one line and its own exit code: a too-old NVIDIA driver, a checkpoint
folder the pod's uid cannot write, a volume with no room for the next checkpoint.

Real where it can be here: a real tmpfs of a few MB is the full volume (mounted as root; skipped
otherwise), a root-owned folder and a process that dropped to uid 1000 are the unwritable export,
the tiny model trains for real through `g2rpo run`. The NVIDIA driver is the one thing these machines
do not have: its version file is written in the kernel module's own format, and the check is
pointed at it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from g2rpo.api.spec import (
    EXIT_CHECKPOINTS_FULL,
    EXIT_CHECKPOINTS_NOT_WRITABLE,
    EXIT_DRIVER_TOO_OLD,
    FAILURE_REASONS,
)
from g2rpo.train import preflight
from g2rpo.train.checkpoints import is_complete
from g2rpo.train.preflight import DriverTooOld, check_driver, driver_version
from g2rpo.train.storage import CheckpointsNotWritable, check_writable

ROOT = Path(__file__).resolve().parents[1]
# The first line of /proc/driver/nvidia/version, as NVIDIA's proprietary and open kernel modules write it.
PROPRIETARY_535 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
OPEN_570 = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.158.01  Release Build  "
    "(dvs-builder@U16-I3-D08-1-2)  Mon Jun 16 05:11:11 UTC 2025\n"
)
OPEN_580 = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 06:54:38 UTC 2025\n"
)
GCC_LINE = "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"

JOB = """\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: tiny-storage}}
spec:
  model: {{name: "{model}"}}
  dataset:
    name: builtin:arithmetic
    arithmetic: {{numProblems: 24, minSteps: 1, maxSteps: 3}}
    guidanceColumn: solution
  rewards: [{{name: accuracy}}, {{name: format, weight: 0.1}}]
  guidance: {{ratio: 0.5, schedule: adaptive, initialLength: 16, minLength: 2, maxLength: 64}}
  training: {{numGenerations: 4, perDeviceBatchSize: 4, maxSteps: {steps}, maxCompletionLength: 8, learningRate: 1.0e-3}}
  checkpoint: {{everySteps: 1, keep: 10, dir: "{checkpoints}"}}
"""
COMPARED = ("loss", "g2rpo/guidance_length", "g2rpo/accuracy", "reward", "grad_norm")


# --- the driver ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version"),
    [(PROPRIETARY_535 + GCC_LINE, "535.183.01"), (OPEN_570 + GCC_LINE, "570.158.01"), (OPEN_580, "580.65.06")],
)
def test_the_driver_version_is_read_from_the_kernel_modules_file(tmp_path, text, version):
    (tmp_path / "version").write_text(text)
    assert driver_version(tmp_path / "version") == version


def test_no_driver_file_means_no_driver(tmp_path):
    assert driver_version(tmp_path / "absent") is None


@pytest.mark.parametrize("found", ["535.183.01", "550.163.01", "570.158.01"])
def test_a_driver_older_than_r580_cannot_run_cuda_13(found):
    with pytest.raises(DriverTooOld) as caught:
        check_driver(found, cuda_major=13)
    line = str(caught.value)
    assert "\n" not in line
    assert f"NVIDIA driver {found}" in line and "CUDA 13" in line and "R580 or newer" in line
    assert caught.value.exit_code == EXIT_DRIVER_TOO_OLD and caught.value.reason == "DriverTooOld"


@pytest.mark.parametrize(("found", "cuda"), [("580.65.06", 13), ("595.45.04", 13), ("535.183.01", 12), (None, 13)])
def test_a_new_enough_driver_or_none_at_all_passes(found, cuda):
    check_driver(found, cuda_major=cuda)


def test_the_minimum_follows_the_cuda_runtime_the_trainer_image_locks():
    """The image's CUDA comes from the locked nvidia-cuda-runtime wheel: the check reads its major version
    from that distribution, and NVIDIA's table gives CUDA 13.x the R580 minimum."""
    pins = [
        line.split("==")[1]
        for line in (ROOT / "constraints" / "trainer-cuda.txt").read_text().splitlines()
        if line.startswith(f"{preflight.CUDA_RUNTIME_DISTRIBUTION}==")
    ]
    assert len(pins) == 1, "the trainer image's lock pins the CUDA runtime wheel the check reads"
    major = int(pins[0].split(".")[0])
    assert preflight.MINIMUM_DRIVER_BRANCH[major] == 580


def test_the_trainer_entry_point_refuses_an_old_driver_before_anything_else(tmp_path, monkeypatch, capsys):
    """`python -m g2rpo.train --check` (the check-spec init container) exits EXIT_DRIVER_TOO_OLD with one line,
    also written to the termination message as `DriverTooOld: <line>` (what the operator reads)."""
    from g2rpo.train.__main__ import main

    (tmp_path / "version").write_text(PROPRIETARY_535 + GCC_LINE)
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")
    monkeypatch.setattr(preflight, "DRIVER_VERSION_FILE", tmp_path / "version")
    monkeypatch.setattr(preflight, "TERMINATION_LOG", termination_log)
    monkeypatch.setattr(preflight, "image_cuda_major", lambda: 13)
    code = main(["--job", str(tmp_path / "never-read.yaml"), "--check"])
    assert code == EXIT_DRIVER_TOO_OLD
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "NVIDIA driver 535.183.01" in err and "R580" in err
    assert termination_log.read_text() == f"DriverTooOld: {err}"


def test_every_fatal_exit_code_has_its_own_reason():
    assert len(set(FAILURE_REASONS)) == len(set(FAILURE_REASONS.values())) == 4
    assert {EXIT_DRIVER_TOO_OLD, EXIT_CHECKPOINTS_NOT_WRITABLE, EXIT_CHECKPOINTS_FULL} < set(FAILURE_REASONS)


# --- a checkpoint folder uid 1000 cannot write -------------------------------------------------------


@pytest.fixture
def shared_dir():
    """A folder every uid can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="g2rpo-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _check_as_uid_1000(job_file: Path, warm_up_job_file: Path) -> subprocess.CompletedProcess:
    """`python -m g2rpo.train --check` as uid/gid 1000 (the pods' user). The interpreter lives in root's home,
    so the same check first runs once as root on `warm_up_job_file` (importing everything it needs), then the
    process drops to uid 1000 and runs it on `job_file`."""
    script = textwrap.dedent(
        f"""
        import os, sys
        import g2rpo.train.__main__ as entry
        assert entry.main(["--job", {str(warm_up_job_file)!r}, "--check"]) == 0
        os.setgroups([]); os.setgid(1000); os.setuid(1000)
        sys.exit(entry.main(["--job", {str(job_file)!r}, "--check"]))
        """
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{ROOT / 'trainer'}:{ROOT / 'operator'}"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a root-owned folder and drop to uid 1000")
def test_a_root_owned_export_fails_the_check_at_once_naming_owner_and_fix(shared_dir, tiny_model_dir, tmp_path):
    export = shared_dir / "checkpoints"  # as an NFS export whose driver ignored fsGroup: root's, 0755
    export.mkdir(mode=0o755)
    job_file = shared_dir / "job.yaml"
    job_file.write_text(JOB.format(model=tiny_model_dir, steps=1, checkpoints=export / "tiny-storage"))
    job_file.chmod(0o644)
    warm_up = tmp_path / "warm-up.yaml"
    warm_up.write_text(JOB.format(model=tiny_model_dir, steps=1, checkpoints=tmp_path / "root-writes-here"))

    result = _check_as_uid_1000(job_file, warm_up)
    assert result.returncode == EXIT_CHECKPOINTS_NOT_WRITABLE, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert f"checkpoint folder {export}/tiny-storage is not writable by uid 1000 (gid 1000" in line
    assert f"{export} is owned by uid 0 gid 0 with mode 755" in line
    assert "fsGroup" in line and "README: Checkpoint storage" in line

    os.chown(export, 1000, 1000)  # the fix the line names
    fixed = _check_as_uid_1000(job_file, warm_up)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (export / "tiny-storage").is_dir() and not list((export / "tiny-storage").iterdir())


def test_a_read_only_folder_is_not_writable_either(tmp_path, monkeypatch):
    """Root writes through any mode, so this one is read-only by mount flag: EROFS counts like EACCES."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], check=True)
    try:
        with pytest.raises(CheckpointsNotWritable, match=r"is not writable by uid 0 .*Read-only file system"):
            check_writable(folder / "job")
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# --- a full volume ------------------------------------------------------------------------------------


class Tmpfs:
    """A real filesystem of `size` (tmpfs), mounted for one test."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def grow(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def tmpfs_factory(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Tmpfs] = []

    def make(name: str, size: str) -> Tmpfs:
        mounted.append(Tmpfs(tmp_path / name, size))
        return mounted[-1]

    yield make
    for fs in mounted:
        fs.unmount()


def _run(job_file: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "g2rpo.cli", "run", str(job_file), "--output", str(out), "--no-progress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


def _per_step(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"each step once, in order: {steps}"
    return {r["step"]: {k: r.get(k) for k in COMPARED} for r in records if "loss" in r}


@pytest.mark.slow
def test_a_full_volume_stops_before_the_save_in_one_line_and_the_resume_is_exact(
    tmpfs_factory, tiny_model_dir, tmp_path
):
    """3 MB hold two tiny checkpoints (about 1 MB each) and not a third: the run stops before the third save
    (the free space is below the last checkpoint's size), in one line; given room, it resumes from
    checkpoint-2 and trains steps 3-4 exactly as a run that never stopped."""
    volume = tmpfs_factory("volume", "3m")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.format(model=tiny_model_dir, steps=4, checkpoints=volume.path / "run"))
    reference_file = tmp_path / "reference.yaml"
    reference_file.write_text(JOB.format(model=tiny_model_dir, steps=4, checkpoints=tmp_path / "reference-ck"))

    full = _run(job_file, tmp_path / "out")
    assert full.returncode == EXIT_CHECKPOINTS_FULL, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and "basic_ios" not in full.stderr
    line = full.stderr.strip().splitlines()[-1]
    assert line.startswith(f"no room for checkpoint-3 in {volume.path / 'run'}: "), line
    assert "free, the last checkpoint took" in line
    assert f"newest complete checkpoint: {volume.path / 'run' / 'checkpoint-2'} (a restarted trainer resumes" in line
    assert "lower checkpoint.keep" in line and "bigger volume" in line
    folders = sorted(p.name for p in (volume.path / "run").iterdir() if p.is_dir())
    assert folders == ["checkpoint-1", "checkpoint-2"], "nothing of checkpoint-3 was written"
    assert all(is_complete(volume.path / "run" / name) for name in folders)

    volume.grow("20m")
    resumed = _run(job_file, tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {volume.path / 'run' / 'checkpoint-2'}" in resumed.stderr

    reference = _run(reference_file, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    resumed_steps = _per_step(tmp_path / "out")
    assert sorted(resumed_steps) == [1, 2, 3, 4], "step 3 (trained, not saved) was trained again, once"
    assert resumed_steps == _per_step(tmp_path / "reference"), "steps 3-4 as in a run that never stopped"


@pytest.mark.slow
def test_a_save_that_runs_out_of_space_midway_becomes_one_line_and_leaves_no_half_checkpoint(
    tmpfs_factory, tiny_model_dir, tmp_path
):
    """The first save has no earlier checkpoint to measure: on 512 KB it fails inside torch.save. The failure
    becomes the same one line, and the half-written checkpoint-1 is gone (its space is needed)."""
    volume = tmpfs_factory("volume", "512k")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.format(model=tiny_model_dir, steps=1, checkpoints=volume.path / "run"))
    result = _run(job_file, tmp_path / "out")
    assert result.returncode == EXIT_CHECKPOINTS_FULL, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"no room for checkpoint-1 in {volume.path / 'run'}: the save ran out of space; "), line
    assert "free after removing the incomplete checkpoint-1" in line
    assert "newest complete checkpoint: none (a restarted trainer starts over)" in line
    assert not [p for p in (volume.path / "run").iterdir() if p.is_dir()]


def test_the_requirements_are_stated_where_users_read_them_before_installing():
    """README and the chart's NOTES name the driver the check enforces and what the claim needs."""
    driver = f"R{preflight.MINIMUM_DRIVER_BRANCH[13]} or newer"
    readme = (ROOT / "README.md").read_text()
    notes = (ROOT / "charts" / "g2rpo" / "templates" / "NOTES.txt").read_text()
    for text in (readme, " ".join(notes.split())):
        assert (
            driver in text
            and "ReadWriteMany" in text
            and "uid/gid 1000" in text.replace("uid 1000 or gid 1000", "uid/gid 1000")
        )
    assert "### Checkpoint storage" in readme and "### NVIDIA driver" in readme  # what the error lines point to


def test_only_the_rank_that_found_a_problem_writes_the_termination_message(tmp_path):
    """The ranks of a pod share /dev/termination-log: a rank stopped by another's finding must not overwrite it."""
    from g2rpo.train.storage import CheckpointsFull

    log = tmp_path / "termination-log"
    log.write_text("")
    found = CheckpointsFull("no room for checkpoint-3 in /checkpoints/x: 1 MiB free, the last checkpoint took 2 MiB")
    assert preflight.report(found, log) == str(found)
    assert log.read_text() == f"CheckpointsFull: {found}"
    preflight.report(CheckpointsFull("no room (rank 0 has the details)", secondhand=True), log)
    assert log.read_text() == f"CheckpointsFull: {found}"
    absent = tmp_path / "no-termination-log"  # outside Kubernetes: nothing is created
    preflight.report(found, absent)
    assert not absent.exists()
