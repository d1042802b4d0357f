"""The checkpoint folder's two fatal problems: it cannot be written, or it has no room for the next save.

Not writable. Pods run as uid 1000 with fsGroup 1000, but the kubelet applies fsGroup only where the
volume's driver supports it: a CSI driver's default fsGroupPolicy, ReadWriteOnceWithFSType, applies
it only to a volume with an fsType whose access modes contain ReadWriteOnce (kubernetes
pkg/apis/storage/types.go; pkg/volume/csi/csi_mounter.go, supportsFSGroup: no fsType, or no
ReadWriteOnce, skips it). A ReadWriteMany export owned by root (NFS, Filestore, EFS without an access point) therefore
reaches the pod as root-owned, and the first mkdir of `/checkpoints/<job>` fails. `check_writable`
finds that at start-up, before any model is loaded.

Full. A save that runs out of space fails deep inside torch.save (`RuntimeError: basic_ios::clear:
iostream error`, no errno) with a checkpoint half written. `check_room` runs before each save
(CheckpointRoomCallback): when the volume has less free space than the newest complete checkpoint
took, training stops before writing anything. A save that fails anyway (the first one, whose size
is unknown, or space taken by someone else meanwhile) is recognised by `raise_if_out_of_space`:
the half-written folder is removed (it is incomplete, resume would skip it, and it holds the space
the next save needs) and the failure becomes the same one line.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

from g2rpo.api.spec import EXIT_CHECKPOINTS_FULL, EXIT_CHECKPOINTS_NOT_WRITABLE
from g2rpo.train.checkpoints import DELETING_PREFIX, newest_complete
from g2rpo.train.preflight import FatalProblem

NEARLY_FULL_BYTES = 1 << 20
"""Below this much free space a failed save is taken for a full volume even without ENOSPC (torch.save's
C++ stream error carries no errno)."""
STORAGE_DOCS = "README: Checkpoint storage"


class CheckpointsNotWritable(FatalProblem):
    exit_code = EXIT_CHECKPOINTS_NOT_WRITABLE


class CheckpointsFull(FatalProblem):
    exit_code = EXIT_CHECKPOINTS_FULL


def check_writable(folder: Path) -> None:
    """Create `folder` (with parents) and a file in it, or raise CheckpointsNotWritable naming who owns what."""
    probe = folder / f".g2rpo-write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise CheckpointsNotWritable(
            f"checkpoint folder {folder} is not writable by uid {os.getuid()} (gid {os.getgid()}, groups "
            f"{','.join(map(str, os.getgroups())) or 'none'}): {exc.strerror}; {_owner(folder)}; make the volume "
            f"writable by uid {os.getuid()} or gid {os.getgid()} (its driver did not apply the pod's fsGroup: "
            f"NFS, Filestore and EFS volumes usually do not; see {STORAGE_DOCS})"
        ) from exc


def _owner(folder: Path) -> str:
    """Owner and mode of the deepest existing folder on the way to `folder`."""
    for path in (folder, *folder.parents):
        try:
            st = path.stat()
        except OSError:
            continue
        return f"{path} is owned by uid {st.st_uid} gid {st.st_gid} with mode {st.st_mode & 0o7777:o}"
    return "no part of the path exists"


def checkpoint_size(folder: Path) -> int:
    """Bytes a checkpoint takes on its volume: its files' allocated blocks, which round each file up."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def room_problem(checkpoint_dir: Path, step: int) -> CheckpointsFull | None:
    """CheckpointsFull when the volume has less room than the newest complete checkpoint took (None: room
    enough, or no complete checkpoint to measure yet)."""
    newest = newest_complete(checkpoint_dir).checkpoint
    if newest is None:
        return None
    needed = checkpoint_size(newest)
    free = free_bytes(checkpoint_dir)
    if free >= needed:
        return None
    return full_problem(checkpoint_dir, step, f"{_size(free)} free, the last checkpoint took {_size(needed)}")


def full_problem(checkpoint_dir: Path, step: int, space: str) -> CheckpointsFull:
    newest = newest_complete(checkpoint_dir).checkpoint
    resume = f"{newest} (a restarted trainer resumes from it)" if newest else "none (a restarted trainer starts over)"
    return CheckpointsFull(
        f"no room for checkpoint-{step} in {checkpoint_dir}: {space}; newest complete checkpoint: {resume}; "
        "free space on the volume (delete old checkpoint-N folders, lower checkpoint.keep) or give it more "
        f"(a bigger volume or claim; see {STORAGE_DOCS})"
    )


def raise_if_out_of_space(exc: BaseException, checkpoint_dir: Path, step: int, main_rank: bool) -> None:
    """Turn a save that failed on a full volume into CheckpointsFull, removing the half-written checkpoint-<step>
    first (rank 0); any other failure is left alone."""
    if not _out_of_space(exc, checkpoint_dir):
        return
    partial = checkpoint_dir / f"checkpoint-{step}"
    if main_rank and partial.is_dir():
        doomed = partial.with_name(DELETING_PREFIX + partial.name)
        partial.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    raise full_problem(
        checkpoint_dir,
        step,
        f"the save ran out of space; {_size(free_bytes(checkpoint_dir))} free after removing the incomplete "
        f"checkpoint-{step}",
    ) from exc


def _out_of_space(exc: BaseException, checkpoint_dir: Path) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(checkpoint_dir) < NEARLY_FULL_BYTES
    except OSError:
        return False


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n / 1024:.0f} KiB"
