"""Durable guidance state: a write-ahead journal plus a compacted snapshot, on a volume path.

The controller acknowledges a mutation (a step report, a rewind, an override, a restore) only
after its journal record is on disk: the record is appended as one JSON line and fsync'ed before
the HTTP answer leaves. A restart, `kill -9` included, replays the journal on top of the last
snapshot and ends in exactly the state that was acknowledged, timestamps included.

Layout of a state directory:

- `snapshot.json`  {"format", "job", "seq", "controller": GuidanceController.snapshot()}; written
  to a temporary file, fsync'ed and renamed over the old one, so it is always whole.
- `journal.jsonl`  one record per line, each with a sequence number `seq`. Records with
  `seq <= snapshot.seq` are already in the snapshot and are skipped on replay: that makes a crash
  between writing the snapshot and truncating the journal harmless.

A crash in the middle of an append can leave a torn last line. It was never acknowledged (the
fsync had not returned), so it is dropped with a warning and cut off the file. A bad line that is
*not* the last one is real corruption: loading stops with `StateError` rather than guess.

Each mutation is a typed command (commands.py): the same `execute` applies it on the live path
and on replay, so the two cannot drift apart, and each record is the command's `encode`d form.
The command's time comes from the clock the controller is given, never patched in afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from g2rpo.controller.commands import Command, Override, Report, Restore, Rewind, decode, encode, execute
from g2rpo.controller.core import GuidanceController
from g2rpo.durable import atomic_write_bytes, fsync_dir
from g2rpo.guidance import schedule as sched

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
SNAPSHOT_FILE = "snapshot.json"
JOURNAL_FILE = "journal.jsonl"

#: Compact the journal into the snapshot after this many records. A compaction rewrites the whole
#: history (a few MB after 10,000 steps), so it is rare; replay of 10,000 records takes well under
#: a second.
DEFAULT_COMPACT_EVERY = 10_000


class StateError(RuntimeError):
    """The state directory cannot be used as it is (real corruption, another job's state): refuse to guess."""


class ReportAnswer(NamedTuple):
    step: int
    next_length: int
    duplicate: bool


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


#: fdatasync flushes an append's data and the file size, all a replay needs, without the inode's
#: timestamps; macOS has only fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


class Journal:
    """The files of one state directory: append-and-fsync records, compact, load."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.snapshot_path = self.directory / SNAPSHOT_FILE
        self.journal_path = self.directory / JOURNAL_FILE
        self._fd: int | None = None

    def load(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The snapshot (None if there is none yet) and the journal records that come after it."""
        try:
            snapshot = json.loads(self.snapshot_path.read_bytes()) if self.snapshot_path.exists() else None
        except ValueError as exc:
            raise StateError(f"{self.snapshot_path}: unreadable snapshot ({exc})") from None
        if snapshot is not None and snapshot.get("format") != SNAPSHOT_FORMAT:
            raise StateError(f"{self.snapshot_path}: unknown snapshot format {snapshot.get('format')!r}")
        after = snapshot["seq"] if snapshot else 0
        records = [r for r in self._read_journal() if r["seq"] > after]
        for expected, record in enumerate(records, start=after + 1):
            if record["seq"] != expected:
                raise StateError(f"{self.journal_path}: record seq {record['seq']} where {expected} was expected")
        return snapshot, records

    def _read_journal(self) -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        data = self.journal_path.read_bytes()
        records: list[dict[str, Any]] = []
        offset = 0
        while offset < len(data):
            end = data.find(b"\n", offset)
            try:
                if end < 0:
                    raise ValueError("no newline at the end")
                record = json.loads(data[offset:end])
                if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
                    raise ValueError("not a journal record")
            except ValueError as exc:
                where = f"{self.journal_path}:{len(records) + 1}"
                if 0 <= end < len(data) - 1:
                    raise StateError(f"{where}: unreadable record with more records after it ({exc})") from None
                log.warning("%s: dropping a torn last record, never acknowledged (%s)", where, exc)
                with open(self.journal_path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                break
            records.append(record)
            offset = end + 1
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it; on failure the file is cut back to where it was."""
        if self._fd is None:
            self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fsync_dir(self.directory)
        line = _encode(record) + b"\n"
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            _datasync(self._fd)
        except OSError:
            os.ftruncate(self._fd, start)
            raise

    def compact(self, job: str, seq: int, controller: dict[str, Any]) -> None:
        """Replace the snapshot atomically, then empty the journal (its records are all in it now)."""
        atomic_write_bytes(
            self.snapshot_path, _encode({"format": SNAPSHOT_FORMAT, "job": job, "seq": seq, "controller": controller})
        )
        with open(self.journal_path, "ab") as f:
            f.truncate(0)
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class DurableController:
    """A GuidanceController whose mutations are journaled (fsync) before they are acknowledged.

    Without a journal (no state directory) it is the same controller in memory only: a restart
    starts from step 0, and the trainer must `restore` the snapshot saved in its checkpoint.
    `clock` gives each mutation its time (the step records' `reported_at`, the events' `at`).
    Not thread-safe: the service calls it under one lock.
    """

    def __init__(
        self,
        job: str,
        controller: GuidanceController,
        journal: Journal | None = None,
        seq: int = 0,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        clock: Callable[[], float] = time.time,
    ):
        self.job = job
        self.controller = controller
        self.journal = journal
        self.seq = seq  # the sequence number of the last record applied
        self.compact_every = compact_every
        self.clock = clock
        self._since_compaction = 0

    @classmethod
    def open(
        cls,
        job: str,
        params: sched.ScheduleParams,
        state_dir: Path | None,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        clock: Callable[[], float] = time.time,
    ) -> DurableController:
        """Load the job's state from `state_dir` (or start fresh with `params`) and compact it."""
        if state_dir is None:
            return cls(job, GuidanceController(params), compact_every=compact_every, clock=clock)
        journal = Journal(state_dir)
        snapshot, records = journal.load()
        if snapshot is None:
            controller, seq = GuidanceController(params), 0
        else:
            if snapshot["job"] != job:
                raise StateError(f"{state_dir} holds the state of job {snapshot['job']!r}, not {job!r}")
            controller, seq = GuidanceController.from_snapshot(snapshot["controller"]), snapshot["seq"]
        for record in records:
            try:
                execute(controller, decode(record))
            except (KeyError, TypeError, ValueError) as exc:
                where = f"{journal.journal_path}: record seq {record['seq']}"
                raise StateError(f"{where} does not replay: {exc!r}") from None
            seq = record["seq"]
        if controller.params != params:
            log.warning(
                "%s: the persisted schedule parameters (operator overrides included) win over the given ones: %s",
                state_dir,
                controller.params.to_dict(),
            )
        log.info(
            "loaded job %s from %s: step %d, %d journal records replayed", job, state_dir, controller.step, len(records)
        )
        durable = cls(job, controller, journal, seq, compact_every, clock)
        durable.compact()
        return durable

    def report(self, step: int, reward: float, metrics: dict[str, float]) -> ReportAnswer:
        """Record step `step`. A retry of the last step answers again without journaling anything.

        The answer is the controller's current next length: the same as the first answer, unless
        an operator overrode the length in between, in which case the retry gets the override.
        """
        history = self.controller.history
        if history and history[-1].step == step:
            self.controller.report(step, reward, metrics)  # raises StepConflict if the reward differs
            return ReportAnswer(step, self.controller.length, duplicate=True)
        self._commit(Report(step, reward, dict(metrics), at=self.clock()))
        return ReportAnswer(step, self.controller.length, duplicate=False)

    def rewind(self, step: int) -> int:
        return self._commit(Rewind(step, at=self.clock()))

    def override(self, length: float | None, params: sched.ScheduleParams | None, reason: str) -> int:
        """An operator's override of the next length and/or the schedule parameters (an event)."""
        return self._commit(Override(length, params, reason, at=self.clock()))

    def restore(self, snapshot: dict[str, Any]) -> int:
        """Continue from a checkpoint's snapshot; the event log keeps its past (audit trail)."""
        length = self._commit(Restore(snapshot, at=self.clock()))
        self.compact()  # a restore record carries a whole history: fold it into the snapshot now
        return length

    def _commit(self, command: Command) -> int:
        length = execute(self.controller, command)
        if self.journal is not None:
            # If this raises, memory is ahead of the disk: the service stops serving until restarted.
            self.journal.append(encode(command, self.seq + 1))
        self.seq += 1
        self._since_compaction += 1
        if self._since_compaction >= self.compact_every:
            self.compact()
        return length

    def compact(self) -> None:
        if self.journal is not None:
            self.journal.compact(self.job, self.seq, self.controller.snapshot())
        self._since_compaction = 0

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
