"""The controller's state survives `kill -9`: a real server process, killed and restarted.

Plus the journal's crash cases on real files: a torn last record (dropped), a bad record in the
middle (refused), and a crash between writing the snapshot and emptying the journal (no record
applied twice).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from g2rpo.controller.core import GuidanceController
from g2rpo.controller.http_client import HttpGuidanceClient
from g2rpo.controller.store import JOURNAL_FILE, DurableController, Journal, StateError
from g2rpo.guidance import schedule as sched

TOKEN = "persist-token-42"

JOB_YAML = """\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {name: persist-demo}
spec:
  model: {name: bundled:SmolLM2-135M-Instruct}
  dataset: {name: "builtin:arithmetic"}
  guidance: {schedule: adaptive, initialLength: 256, minLength: 4, maxLength: 512, window: 2}
"""
PARAMS = sched.ScheduleParams(schedule="adaptive", initial_length=256, min_length=4, max_length=512, window=2)


class ControllerProcess:
    """`python -m g2rpo.controller` on a free loopback port, its log in a file."""

    def __init__(self, tmp: Path, *extra: str):
        self.log = tmp / f"controller-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "g2rpo.controller", "--host", "127.0.0.1", "--port", "0"]
        command += ["--schedule-from", str(tmp / "job.yaml"), "--state-dir", str(tmp / "state")]
        command += ["--token-file", str(tmp / "token"), *extra]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.url = self._wait_ready()
        self.client = HttpGuidanceClient(self.url, TOKEN, total_timeout=10)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            found = re.search(r"listening on (http://\S+)", self.log.read_text())
            if found and "ready at step" in self.log.read_text():
                return found.group(1)
            time.sleep(0.05)
        raise AssertionError(f"controller not ready in 30 s:\n{self.log.read_text()}")

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Authorization": f"Bearer {TOKEN}"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.mark.slow
def test_kill9_and_restart_keep_every_acknowledged_change(tmp_path):
    (tmp_path / "job.yaml").write_text(JOB_YAML)
    (tmp_path / "token").write_text(TOKEN + "\n")
    first = ControllerProcess(tmp_path, "--compact-every", "4")  # replay crosses a compaction
    try:
        c = first.client
        for k, r in enumerate([0.5, 0.25, 0.4, 0.6, 0.3, 0.7]):
            c.report(k, r, {"accuracy": r, "advantage_std": 0.8, "decoded_tokens": 1000.0 + k})
        first.post("/v1/override", {"params": {"window": 3}, "length": 300, "reason": "kill-9 test"})
        assert c.rewind(4) == c.current()[1]
        for k, r in [(4, 0.45), (5, 0.5), (6, 0.55)]:
            c.report(k, r, {"accuracy": r})
        before, guidance_before = c.snapshot(), first.post("/v1/steps", {"step": 6, "reward": 0.55})
    finally:
        first.kill9()
    assert guidance_before["duplicate"] is True

    second = ControllerProcess(tmp_path)
    try:
        assert second.client.snapshot() == before  # identical, timestamps and events included
        assert second.post("/v1/steps", {"step": 6, "reward": 0.55}) == guidance_before  # still a duplicate
        assert second.client.report(7, 0.6, {}) == GuidanceController.from_snapshot(before).report(7, 0.6, {})
        assert "dropping a torn" not in second.log.read_text()
    finally:
        second.proc.terminate()
        assert second.proc.wait(timeout=10) == 0


def _durable(tmp_path: Path, rewards: list[float]) -> dict:
    """Report `rewards` into a durable controller on tmp_path; returns its snapshot."""
    durable = DurableController.open("j", PARAMS, tmp_path)
    for k, r in enumerate(rewards):
        durable.report(k, r, {"accuracy": r})
    durable.close()
    return durable.controller.snapshot()


def test_torn_last_record_is_dropped_with_a_warning(tmp_path, caplog):
    saved = _durable(tmp_path, [0.5, 0.25, 0.4])
    journal = tmp_path / JOURNAL_FILE
    with open(journal, "ab") as f:
        f.write(b'{"seq":4,"at":1.0,"op":"report","st')  # a write cut short by the crash
    reopened = DurableController.open("j", PARAMS, tmp_path)
    assert reopened.controller.snapshot() == saved
    assert "dropping a torn last record" in caplog.text
    assert reopened.report(3, 0.5, {}).duplicate is False  # the journal goes on cleanly
    reopened.close()
    assert DurableController.open("j", PARAMS, tmp_path).controller.step == 4


def test_a_bad_record_in_the_middle_is_refused(tmp_path):
    _durable(tmp_path, [0.5, 0.25, 0.4])
    journal = tmp_path / JOURNAL_FILE
    lines = journal.read_bytes().split(b"\n")
    lines[1] = b'{"seq":2,"at":garbage'
    journal.write_bytes(b"\n".join(lines))
    with pytest.raises(StateError, match=f"{JOURNAL_FILE}:2: unreadable record"):
        DurableController.open("j", PARAMS, tmp_path)


def test_a_crash_between_snapshot_and_journal_truncation_applies_nothing_twice(tmp_path):
    _durable(tmp_path, [0.5, 0.25])
    journal_path = tmp_path / JOURNAL_FILE
    old_records = journal_path.read_bytes()
    durable = DurableController.open("j", PARAMS, tmp_path)  # compacts: snapshot at seq 2, journal emptied
    saved = durable.controller.snapshot()
    durable.close()
    journal_path.write_bytes(old_records)  # as if the crash hit before the truncation
    assert DurableController.open("j", PARAMS, tmp_path).controller.snapshot() == saved


def test_another_jobs_state_is_refused(tmp_path):
    _durable(tmp_path, [0.5])
    with pytest.raises(StateError, match="holds the state of job 'j', not 'k'"):
        DurableController.open("k", PARAMS, tmp_path)
    assert Journal(tmp_path).load()[0]["job"] == "j"
