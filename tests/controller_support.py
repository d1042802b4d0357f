"""For tests of the cluster trainer entry point (`python -m g2rpo.train`): a tiny job, and the job's guidance
controller as its pod runs it (`python -m g2rpo.controller`) on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def tiny_cluster_job(model_dir: Path, name: str, max_steps: int) -> str:
    """A G2RPOJob on the tiny model and builtin arithmetic, guided (adaptive), a checkpoint every 2 steps."""
    return f"""\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: {name}}}
spec:
  model: {{name: "{model_dir}"}}
  dataset:
    name: builtin:arithmetic
    arithmetic: {{numProblems: 16, minSteps: 1, maxSteps: 2}}
    guidanceColumn: solution
  rewards: [{{name: accuracy}}, {{name: format, weight: 0.1}}]
  guidance: {{ratio: 0.5, schedule: adaptive, initialLength: 12, minLength: 2, maxLength: 48}}
  training: {{numGenerations: 4, perDeviceBatchSize: 4, maxSteps: {max_steps}, maxCompletionLength: 16,
             learningRate: 1.0e-4}}
  checkpoint: {{everySteps: 2}}
"""


@dataclass(frozen=True)
class ControllerService:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def controller_service(job_file: Path, folder: Path, token: str) -> Iterator[ControllerService]:
    """Started with the job's schedule, its state in folder/state and `token` in folder/token; ready (/readyz)
    when yielded, stopped after. Its output goes to folder/controller.log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        service = ControllerService(port=s.getsockname()[1])
    (folder / "token").write_text(token)
    command = [sys.executable, "-m", "g2rpo.controller", "--schedule-from", str(job_file), "--host", "127.0.0.1"]
    command += [
        "--port",
        str(service.port),
        "--state-dir",
        str(folder / "state"),
        "--token-file",
        str(folder / "token"),
    ]
    with open(folder / "controller.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not _ready(service.url):
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (folder / "controller.log").read_text()[-2000:]
                raise AssertionError(f"the controller did not become ready:\n{log_text}")
            time.sleep(0.25)
        yield service
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2):
            return True
    except OSError:
        return False
