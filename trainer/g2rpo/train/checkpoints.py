"""Complete checkpoints: a checkpoint folder counts only once its completion marker is written.

Transformers writes `checkpoint-N/` in place (model, optimizer, scheduler, RNG, trainer state;
TRL adds its own files; g2rpo adds guidance_state.json). A process killed in the middle leaves
a folder that looks like a checkpoint and is not one. So g2rpo completes each checkpoint in the
trainer's `on_save` callback, after every other file is written: all ranks meet at a barrier,
then rank 0 fsyncs every file, writes guidance_state.json, and writes `COMPLETE_MARKER` last
(to a temporary name, fsynced, renamed into place, folder fsynced). The marker lists every
file with its size, so a folder whose files were cut or removed later is incomplete too.

Resume (`checkpoint.resume: auto`) takes the newest complete checkpoint and logs every newer
incomplete one it skipped. Those are renamed to `incomplete-checkpoint-N` (by rank 0; instant,
nothing lost): the resumed run will write checkpoint-N again and must not mix with a stale
half, and a user can still look inside. They are deleted when the next checkpoint completes.

Rotation (`checkpoint.keep`) runs after the marker, never before: transformers' own rotation
(save_total_limit) deletes old checkpoints before the new one is complete, which can leave no
complete checkpoint at all; G2RPOTrainer turns it off and uses `rotate` instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from g2rpo.durable import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

COMPLETE_MARKER = "g2rpo_checkpoint_complete.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_PREFIX = "incomplete-"
DELETING_PREFIX = ".deleting-"


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def _numbered(checkpoint_dir: Path) -> dict[Path, int]:
    """The checkpoint folders (checkpoint-<step>) in `checkpoint_dir`, each with its step."""
    return {p: step for p in checkpoint_dir.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None}


def _files(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.endswith(".tmp")
    }


def incomplete_reason(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        try:
            present = sorted(p.name for p in folder.iterdir())
        except FileNotFoundError:  # set aside by rank 0 while another rank looks
            present = []
        return f"no {COMPLETE_MARKER} (the save was interrupted); it holds: {', '.join(present) or 'nothing'}"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {COMPLETE_MARKER}: {exc}"
    actual = _files(folder)
    damaged = sorted(name for name, size in listed.items() if actual.get(name) != size)
    if damaged:
        return f"files missing or of another size than when saved: {', '.join(damaged[:5])}"
    return None


def is_complete(folder: Path) -> bool:
    return incomplete_reason(folder) is None


@dataclass
class ResumePoint:
    """The newest complete checkpoint in a folder (None: start fresh), and the newer incomplete ones skipped."""

    checkpoint: Path | None
    skipped: dict[Path, str] = field(default_factory=dict)


def newest_complete(checkpoint_dir: Path) -> ResumePoint:
    if not checkpoint_dir.is_dir():
        return ResumePoint(None)
    steps = _numbered(checkpoint_dir)
    candidates = sorted(steps, key=steps.__getitem__, reverse=True)
    skipped: dict[Path, str] = {}
    for folder in candidates:
        reason = incomplete_reason(folder)
        if reason is None:
            return ResumePoint(folder, skipped)
        skipped[folder] = reason
    return ResumePoint(None, skipped)


def set_aside(skipped: dict[Path, str]) -> None:
    """Rename skipped incomplete checkpoints to incomplete-checkpoint-N (replacing an older set-aside one)."""
    for folder in skipped:
        target = folder.with_name(INCOMPLETE_PREFIX + folder.name)
        if target.exists():
            shutil.rmtree(target)
        folder.rename(target)
        log.warning(
            "set aside incomplete %s as %s (deleted once the next checkpoint completes)", folder.name, target.name
        )


def mark_complete(folder: Path, step: int) -> None:
    """Make every file durable, then write the marker last, atomically (rank 0, after all ranks saved)."""
    files = _files(folder)
    for name in files:
        _fsync_file(folder / name)
    for directory in {folder, *((folder / name).parent for name in files)}:
        fsync_dir(directory)
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"step": step, "files": files}, indent=1))
    fsync_dir(folder.parent)


def rotate(checkpoint_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints; delete older ones and the set-aside incomplete ones.

    A folder is renamed before it is deleted, so a crash in the middle of a deletion never
    leaves a half-deleted folder under a checkpoint's name.
    """
    leftovers = [
        p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith((INCOMPLETE_PREFIX, DELETING_PREFIX))
    ]
    if keep:
        steps = {p: step for p, step in _numbered(checkpoint_dir).items() if is_complete(p)}
        complete = sorted(steps, key=steps.__getitem__)
        leftovers += complete[:-keep]
    for folder in leftovers:
        doomed = folder if folder.name.startswith(DELETING_PREFIX) else folder.with_name(DELETING_PREFIX + folder.name)
        if doomed != folder:
            folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("deleted %s", folder.name)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
