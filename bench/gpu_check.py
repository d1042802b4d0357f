"""What only a GPU can show: the cluster trainer path under DeepSpeed ZeRO-2/3 in bf16 on CUDA.

    python bench/gpu_check.py --out DIR

For each ZeRO stage it runs the trainer exactly as a cluster pod does (`accelerate launch` with the
accelerate config the operator renders, `python -m g2rpo.train --job ...`) against a real guidance
controller service on loopback, on a random-weight Qwen3 (char tokenizer; nothing to download),
then resumes the ZeRO-2 run from its newest checkpoint for two more steps. Finally it times one
optimizer step of G2RPO-A (alpha = 0) against TRL's GRPOTrainer on CUDA (bench/step_time.py).
Writes DIR/gpu_check.json and the logs; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "gpu-check-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_yaml(name: str, model_dir: Path, checkpoint_dir: Path, max_steps: int, zero: int) -> str:
    return f"""\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: {name}}}
spec:
  model: {{name: "{model_dir}", dtype: bfloat16}}
  dataset:
    name: builtin:arithmetic
    arithmetic: {{numProblems: 64, minSteps: 1, maxSteps: 3}}
    guidanceColumn: solution
  rewards: [{{name: accuracy}}, {{name: format, weight: 0.1}}]
  guidance: {{ratio: 0.5, schedule: adaptive, initialLength: 48, minLength: 4, maxLength: 96, loss: mask}}
  training: {{numGenerations: 8, perDeviceBatchSize: 16, maxSteps: {max_steps}, maxCompletionLength: 64,
             learningRate: 1.0e-5, maxPromptLength: 512}}
  checkpoint: {{everySteps: 3, dir: "{checkpoint_dir}"}}
  trainer: {{replicas: 1, gpusPerReplica: 1, zeroStage: {zero}}}
"""


def accelerate_config(job_file: Path) -> dict:
    from g2rpo.api.spec import load_job
    from g2rpo_operator.builders.common import JobContext
    from g2rpo_operator.builders.config import accelerate_config as render
    from g2rpo_operator.settings import OperatorSettings

    job = load_job(job_file)
    return render(JobContext.resolve(job.metadata.name, "default", job.spec, OperatorSettings()))


def controller_state(url: str) -> dict:
    request = urllib.request.Request(f"{url}/v1/state", headers={"Authorization": f"Bearer {TOKEN}"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())["snapshot"]


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/readyz", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"controller at {url} never became ready")


def train(job_file: Path, run_dir: Path, controller: str, token_file: Path, log: Path) -> tuple[int, float]:
    config_file = job_file.with_suffix(".accelerate.yaml")
    config_file.write_text(yaml.safe_dump(accelerate_config(job_file)))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "g2rpo.train",
        "--job",
        str(job_file),
        "--run-dir",
        str(run_dir),
    ]
    env = {**os.environ, "G2RPO_CONTROLLER_URL": controller, "G2RPO_CONTROLLER_TOKEN_FILE": str(token_file)}
    started = time.monotonic()
    with log.open("ab") as out:
        rc = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=420).returncode
    return rc, time.monotonic() - started


def check_run(name: str, run_dir: Path, checkpoint_dir: Path, state: dict, steps: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "g2rpo/accuracy" in r]
    losses = [r["loss"] for r in steps_logged if r.get("loss") is not None]
    result = {
        "steps_logged": len(steps_logged),
        "controller_step": state["state"]["step"],
        "controller_lengths": [h["length_used"] for h in state["history"]],
        "accuracy_guided": [r.get("g2rpo/accuracy_guided") for r in steps_logged],
        "accuracy_unguided": [r.get("g2rpo/accuracy_unguided") for r in steps_logged],
        "loss": losses,
        "checkpoints": sorted(p.name for p in checkpoint_dir.glob("checkpoint-*")),
        "events": [e["event"] for e in state["events"]],
    }
    failures = []
    if state["state"]["step"] != steps:
        failures.append(f"controller at step {state['state']['step']}, expected {steps}")
    if not losses or any(loss != loss for loss in losses):
        failures.append("missing or NaN loss")
    if not all((checkpoint_dir / c / "guidance_state.json").is_file() for c in result["checkpoints"]):
        failures.append("a checkpoint lacks guidance_state.json")
    result["failures"] = failures
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/g2rpo-gpu-check")
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from g2rpo.models.tiny import build_tiny_model

    report: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "bf16": torch.cuda.is_bf16_supported(),
        "versions": {},
    }
    for package in ("trl", "transformers", "accelerate", "deepspeed", "datasets", "pyarrow"):
        try:
            report["versions"][package] = __import__(package).__version__
        except Exception as exc:  # a missing package is part of the report
            report["versions"][package] = f"missing: {exc}"
    model_dir = build_tiny_model(work / "model", hidden_size=args.hidden, layers=args.layers)
    token_file = work / "token"
    token_file.write_text(TOKEN)
    log = args.out / "runs.log"

    for zero in (2, 3):
        name = f"gpu-zero{zero}"
        run_dir, checkpoint_dir = work / name, work / name / "checkpoints"
        job_file = work / f"{name}.yaml"
        job_file.write_text(job_yaml(name, model_dir, checkpoint_dir, max_steps=6, zero=zero))
        port = free_port()
        controller = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "g2rpo.controller",
                "--schedule-from",
                str(job_file),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(work / name / "controller"),
                "--token-file",
                str(token_file),
            ],
            stdout=open(args.out / f"controller-zero{zero}.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            rc, seconds = train(job_file, run_dir, url, token_file, log)
            entry = {"returncode": rc, "seconds": round(seconds, 1)}
            if rc == 0:
                entry |= check_run(name, run_dir, checkpoint_dir, controller_state(url), steps=6)
            if zero == 2 and rc == 0:
                job_file.write_text(job_yaml(name, model_dir, checkpoint_dir, max_steps=8, zero=zero))
                rc2, seconds2 = train(job_file, run_dir, url, token_file, log)
                entry["resume"] = {"returncode": rc2, "seconds": round(seconds2, 1)}
                if rc2 == 0:
                    entry["resume"] |= check_run(name, run_dir, checkpoint_dir, controller_state(url), steps=8)
            report[f"zero{zero}"] = entry
        finally:
            controller.terminate()
            controller.wait(timeout=10)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    bench = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_time.py"), "--cuda", "--steps", "12", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report["step_time"] = bench.stdout[-2000:] if bench.returncode == 0 else f"failed: {bench.stderr[-2000:]}"
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    runs = [report.get("zero2", {}), report.get("zero3", {}), report.get("zero2", {}).get("resume", {})]
    ok = all(r.get("returncode") == 0 and not r.get("failures") for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
