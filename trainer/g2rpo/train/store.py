"""Where checkpoints are kept: the local folder always, and, with checkpoint.uri, an object store too.

The trainer talks to a `CheckpointStore` and never asks which one it has. `LocalFolder` (the
default) is the checkpoint folder itself, so it has nothing to do. `ObjectStore` mirrors the
folder into `s3://`, `gs://` or `az://` through fsspec (s3fs, gcsfs, adlfs, imported when first
used). One completion rule holds in both places (g2rpo.train.checkpoints): a checkpoint counts
only once its completion marker exists, and the marker is written last and read first.

- Upload: after a checkpoint is complete locally, rank 0 uploads every file the local marker
  lists, then the marker itself. A run killed in between leaves files without a marker, which no
  reader counts. Uploads run in one background thread so training goes on meanwhile; at most one
  is in flight (the next save waits for it: a store slower than training slows the saves instead
  of queueing checkpoints without bound, and local rotation never deletes a folder being read).
  The end of training waits for the last upload; a failed upload fails the run at that point.
- Download: `resume: auto` with no complete checkpoint in the local folder (a pod rescheduled to a
  node without the old volume) takes the newest checkpoint whose marker the store holds, downloads
  the listed files into `.downloading-checkpoint-N`, checks their sizes against the marker, writes
  the marker, and renames the folder to `checkpoint-N`: from there on, resume is the local one.
- Rotation (`keep`): after each upload. Deleting starts with the marker, so a half-deleted
  checkpoint never counts; partial uploads left by a killed run are deleted too.
- The final model goes to `<uri>/final` with a marker listing its files, uploaded last.

One job per uri: the store is read and cleaned as if this run were its only writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from g2rpo.api.spec import CheckpointSpec, SpecError
from g2rpo.durable import atomic_write_bytes, fsync_dir
from g2rpo.train.checkpoints import COMPLETE_MARKER, _files, _fsync_file, checkpoint_step, incomplete_reason

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

FINAL_NAME = "final"
DOWNLOADING_PREFIX = ".downloading-"
# fsspec protocol -> the package that implements it, and the g2rpo extra that installs it.
BACKENDS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "objectstore"),
    "gs": ("gcsfs", "objectstore-gcs"),
    "gcs": ("gcsfs", "objectstore-gcs"),
    "az": ("adlfs", "objectstore-azure"),
    "abfs": ("adlfs", "objectstore-azure"),
}
# Test-only: "STEP:DIR" pauses the upload of checkpoint-STEP after its files and before its marker:
# writes DIR/paused, then waits until DIR/release exists. tests/test_object_store.py kills the run
# while it waits, so the kill lands between the files and the marker every time; nothing else reads it.
PAUSE_BEFORE_MARKER_UPLOAD_ENV = "G2RPO_TEST_PAUSE_BEFORE_MARKER_UPLOAD"


class CheckpointStore(Protocol):
    """What the trainer asks of where checkpoints are kept (rank 0 only, except `fetch_newest`)."""

    def publish(self, folder: Path) -> None:
        """`folder` is a complete local checkpoint (its marker is written): keep it in the store."""

    def publish_final(self, folder: Path) -> None:
        """`folder` is the final model, saved locally: keep it in the store."""

    def fetch_newest(self, checkpoint_dir: Path) -> Path | None:
        """Bring the store's newest complete checkpoint into `checkpoint_dir`; None when it has none."""

    def wait(self) -> None:
        """Return once nothing is being written to the store; raise if a write failed."""


class LocalFolder:
    """The checkpoint folder is the store: everything is there already."""

    def publish(self, folder: Path) -> None:
        pass

    def publish_final(self, folder: Path) -> None:
        pass

    def fetch_newest(self, checkpoint_dir: Path) -> Path | None:
        return None

    def wait(self) -> None:
        pass


class CheckpointUploadError(RuntimeError):
    pass


class ObjectStore:
    """The checkpoints mirrored under `uri` in an object store (see the module docstring)."""

    def __init__(self, uri: str, keep: int | None, fs: AbstractFileSystem, root: str):
        self.uri = uri.rstrip("/")
        self.keep = keep
        self.fs = fs
        self.root = root.rstrip("/")
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None

    @classmethod
    def open(cls, uri: str, keep: int | None) -> ObjectStore:
        """The store at `uri`. Credentials and endpoint come from the backend's own environment
        (s3fs: botocore's AWS_* variables; gcsfs: Google's default credentials; any backend: fsspec's
        FSSPEC_<PROTOCOL>_<ARGUMENT> variables, fsspec/config.py)."""
        import fsspec.core

        check_backend(uri)
        fs, root = fsspec.core.url_to_fs(uri)
        return cls(uri, keep, fs, root)

    # --- CheckpointStore -------------------------------------------------------------------------

    def publish(self, folder: Path) -> None:
        self.wait()
        self._upload = threading.Thread(
            target=self._record_failure, args=(self._upload_checkpoint, folder), name="g2rpo-upload", daemon=True
        )
        self._upload.start()

    def publish_final(self, folder: Path) -> None:
        self.wait()
        files = _files(folder)
        self._put(folder, FINAL_NAME, files, json.dumps({"files": files}, indent=1).encode())
        log.info("uploaded the final model to %s/%s", self.uri, FINAL_NAME)

    def fetch_newest(self, checkpoint_dir: Path) -> Path | None:
        for name in sorted(self._checkpoints(), key=lambda n: checkpoint_step(Path(n)) or 0, reverse=True):
            try:
                marker = self.fs.cat_file(self._path(name, COMPLETE_MARKER))
            except FileNotFoundError:
                log.warning(
                    "skipping %s/%s in the store: no %s (its upload was interrupted)", self.uri, name, COMPLETE_MARKER
                )
                continue
            return self._download(name, marker, checkpoint_dir)
        return None

    def wait(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointUploadError(f"uploading a checkpoint to {self.uri} failed: {error}") from error

    # --- the parts -------------------------------------------------------------------------------

    def _record_failure(self, work: Callable[[Path], None], folder: Path) -> None:
        try:
            work(folder)
        except Exception as exc:  # raised in the training thread by the next wait()
            log.error("uploading %s to %s failed: %s", folder.name, self.uri, exc)
            self._error = exc

    def _upload_checkpoint(self, folder: Path) -> None:
        marker = (folder / COMPLETE_MARKER).read_bytes()
        self._put(folder, folder.name, json.loads(marker)["files"], marker)
        log.info("uploaded %s to %s", folder.name, self.uri)
        self._rotate()

    def _put(self, folder: Path, name: str, files: dict[str, int], marker: bytes) -> None:
        """Upload the listed files of `folder` as `name`, replacing what is there; the marker last."""
        self._delete(name)  # an earlier, possibly partial, upload under the same name: no mixing
        for relative in files:
            self.fs.put_file(str(folder / relative), self._path(name, relative))
        _pause_for_test(name)
        self.fs.pipe_file(self._path(name, COMPLETE_MARKER), marker)

    def _download(self, name: str, marker: bytes, checkpoint_dir: Path) -> Path:
        for stale in checkpoint_dir.glob(f"{DOWNLOADING_PREFIX}*"):  # left by a download that was killed
            shutil.rmtree(stale, ignore_errors=True)
        partial = checkpoint_dir / f"{DOWNLOADING_PREFIX}{name}"
        files = json.loads(marker)["files"]
        for relative in files:
            (partial / relative).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(name, relative), str(partial / relative))
            _fsync_file(partial / relative)
        atomic_write_bytes(partial / COMPLETE_MARKER, marker)
        reason = incomplete_reason(partial)
        if reason is not None:
            raise CheckpointUploadError(f"{self.uri}/{name} changed while it was downloaded: {reason}")
        target = checkpoint_dir / name
        partial.rename(target)
        fsync_dir(checkpoint_dir)
        log.info("downloaded %s from %s (%d files)", name, self.uri, len(files))
        return target

    def _rotate(self) -> None:
        """Keep the newest `keep` complete checkpoints in the store; delete the rest and partial uploads."""
        steps = {name: checkpoint_step(Path(name)) or 0 for name in self._checkpoints()}
        complete = sorted((n for n in steps if self.fs.exists(self._path(n, COMPLETE_MARKER))), key=steps.__getitem__)
        doomed = [n for n in steps if n not in complete]
        if self.keep:
            doomed += complete[: -self.keep]
        for name in doomed:
            self._delete(name)
            log.info("deleted %s from %s", name, self.uri)

    def _delete(self, name: str) -> None:
        """Delete a checkpoint from the store: its marker first, so a half-deleted one never counts."""
        with contextlib.suppress(FileNotFoundError):  # S3 deletes a missing key silently; others raise
            self.fs.rm_file(self._path(name, COMPLETE_MARKER))
        if self.fs.exists(self._path(name)):
            self.fs.rm(self._path(name), recursive=True)

    def _checkpoints(self) -> list[str]:
        """The names of the store's checkpoint-N folders, complete or not."""
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        return [name for name in names if checkpoint_step(Path(name)) is not None]

    def _path(self, name: str, relative: str = "") -> str:
        return f"{self.root}/{name}/{relative}" if relative else f"{self.root}/{name}"


def open_store(checkpoint: CheckpointSpec) -> CheckpointStore:
    """The job's store: the object store at checkpoint.uri, or the local folder alone."""
    if not checkpoint.uri:
        return LocalFolder()
    return ObjectStore.open(checkpoint.uri, checkpoint.keep)


def check_backend(uri: str) -> None:
    """Fail with a clear error (spec.checkpoint.uri) when the fsspec backend for `uri` is not installed."""
    import fsspec

    protocol = uri.split("://", 1)[0]
    package, extra = BACKENDS[protocol]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise SpecError(
            [
                (
                    ("spec", "checkpoint", "uri"),
                    f"{protocol}:// needs the Python package {package}, which is not installed "
                    f"(pip install 'g2rpo[{extra}]'): {exc}",
                )
            ]
        ) from exc


def _pause_for_test(name: str) -> None:
    pause = os.environ.get(PAUSE_BEFORE_MARKER_UPLOAD_ENV)
    if pause:
        step, _, folder = pause.partition(":")
        if name == f"checkpoint-{step}":
            from g2rpo.train.trainer import _pause_for_test as pause_here

            pause_here(Path(folder))
