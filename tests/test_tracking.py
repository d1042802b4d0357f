"""spec.tracking: TensorBoard, MLflow and Weights & Biases through TRL's report_to, checked with the real
components: TensorBoard's own event reader, a real `mlflow server` (SQLite, loopback) and W&B's offline run
files; and the contract between what the operator renders and what the clients read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from g2rpo.api.spec import SpecError, load_job, parse_spec
from g2rpo.train.config import Generation, grpo_config_arguments
from g2rpo.train.tracking import TENSORBOARD_FOLDER, apply_tracking_environment, tracking_environment
from g2rpo_operator.builders import JobContext, config, trainer
from g2rpo_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name": "m"}, "dataset": {"name": "builtin:arithmetic"}}
# `make tools` installs the MLflow server into its own venv: the full `mlflow` package pins pyarrow<26,
# which the trainer's lock (datasets) does not allow; the trainer needs only the client (mlflow-skinny).
MLFLOW = shutil.which("mlflow", path=f"{ROOT / '.tools' / 'mlflow' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
G2RPO_METRICS = (
    "g2rpo/guidance_length",
    "g2rpo/accuracy",
    "g2rpo/accuracy_guided",
    "g2rpo/accuracy_unguided",
    "g2rpo/advantage_std",
    "g2rpo/zero_std_groups",
    "g2rpo/decoded_tokens",
)
SECRETS = {
    "mlflow": {
        "trackingUri": "http://mlflow.mlflow.svc:5000",
        "experiment": "g2rpo-math",
        "tokenSecret": {"name": "mlflow-auth", "key": "token"},
        "usernameSecret": {"name": "mlflow-auth", "key": "user"},
        "passwordSecret": {"name": "mlflow-auth", "key": "password"},
    },
    "wandb": {"project": "rl", "entity": "team", "apiKeySecret": {"name": "wandb", "key": "api-key"}},
}


def job_with(tracking: dict, name: str = "tracked"):
    from g2rpo.api.spec import G2RPOJob

    return G2RPOJob.model_validate(
        {
            "apiVersion": "g2rpo.dev/v1alpha1",
            "kind": "G2RPOJob",
            "metadata": {"name": name},
            "spec": {**MINIMAL, "tracking": tracking},
        }
    )


# --- the spec and its mapping -------------------------------------------------------------------------


def test_settings_of_a_backend_that_is_not_selected_are_refused_with_the_field():
    with pytest.raises(SpecError) as error:
        parse_spec({**MINIMAL, "tracking": {"backends": ["tensorboard"], "wandb": {"project": "p"}}})
    assert "tracking" in str(error.value) and "backends does not list wandb" in str(error.value)
    with pytest.raises(SpecError, match="backends lists mlflow more than once"):
        parse_spec({**MINIMAL, "tracking": {"backends": ["mlflow", "mlflow"]}})
    with pytest.raises(SpecError, match=r"tracking\.backends"):
        parse_spec({**MINIMAL, "tracking": {"backends": ["comet"]}})


def test_backends_become_report_to_and_the_job_name_the_run_name():
    def arguments(tracking, run_name=None):
        spec = parse_spec({**MINIMAL, "tracking": tracking})
        return grpo_config_arguments(
            spec, output_dir=Path("/c"), dtype=None, use_cpu=True, generation=Generation(), run_name=run_name
        )

    assert arguments({})["report_to"] == []
    chosen = arguments({"backends": ["tensorboard", "wandb"]}, run_name="run-7")
    assert chosen["report_to"] == ["tensorboard", "wandb"] and chosen["run_name"] == "run-7"


def test_tracking_environment_of_each_backend(tmp_path):
    job = job_with(
        {"backends": ["tensorboard", "mlflow", "wandb"], "tags": {"team": "rl", "baseline": ""}, **SECRETS},
        name="math-7",
    )
    env = tracking_environment(job, tmp_path)
    assert env == {
        "TENSORBOARD_LOGGING_DIR": str(tmp_path / TENSORBOARD_FOLDER),
        "MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000",
        "MLFLOW_EXPERIMENT_NAME": "g2rpo-math",
        "MLFLOW_TAGS": json.dumps({"team": "rl", "baseline": "", "g2rpo.job": "math-7"}),
        "WANDB_PROJECT": "rl",
        "WANDB_ENTITY": "team",
        "WANDB_TAGS": "team:rl,baseline,g2rpo.job:math-7",
        "WANDB_DIR": str(tmp_path),
    }
    assert not any("SECRET" in value or "api-key" in value for value in env.values())
    assert tracking_environment(job_with({}), tmp_path) == {}


def test_a_backend_whose_client_is_missing_is_a_spec_error_naming_the_field(monkeypatch):
    """find_spec stands in for an install without the wandb client (a fake: the test venv has every client)."""
    from g2rpo.train import tracking

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    tracking.check_clients_installed(job_with({"backends": ["tensorboard"]}))
    with pytest.raises(SpecError) as error:
        tracking.check_clients_installed(job_with({"backends": ["tensorboard", "wandb"]}))
    assert (
        str(error.value)
        == "spec.tracking.backends: wandb selected but not installed here: pip install 'g2rpo[tracking]'"
    )


def test_the_environment_keeps_what_the_spec_leaves_unset(tmp_path, monkeypatch):
    """spec.trainer.env, envFromSecret or the shell may set what the spec does not; the spec's values win."""
    for name in tracking_environment(job_with({"backends": ["tensorboard", "wandb", "mlflow"], **SECRETS}), tmp_path):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever apply_... sets
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-the-shell")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-shell")
    apply_tracking_environment(job_with({"backends": ["wandb", "mlflow"], **SECRETS}), tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_PROJECT"] == "rl"
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "g2rpo-math"
    assert (tmp_path / "run").is_dir(), "WANDB_DIR exists before wandb.init"
    monkeypatch.delenv("WANDB_PROJECT")
    apply_tracking_environment(job_with({"backends": ["wandb"]}), tmp_path / "run")
    assert os.environ["WANDB_PROJECT"] == "g2rpo", "not transformers' default, huggingface"
    monkeypatch.setenv("WANDB_PROJECT", "from-the-shell")
    apply_tracking_environment(job_with({"backends": ["wandb"]}), tmp_path / "run")
    assert os.environ["WANDB_PROJECT"] == "from-the-shell"


# --- the cluster path: credentials from Secrets, the rest from the spec ---------------------------


def cluster_context(tracking: dict) -> JobContext:
    spec = parse_spec({**MINIMAL, "checkpoint": {"volumeClaim": "c"}, "tracking": tracking})
    return JobContext.resolve("tracked", "ml", spec, OperatorSettings())


def test_the_trainer_pods_get_credentials_from_secret_references_never_the_configmap():
    ctx = cluster_context({"backends": ["mlflow", "wandb"], **SECRETS})
    env = {var["name"]: var for var in trainer.job(ctx)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WANDB_API_KEY"] == {
        "name": "WANDB_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}},
    }
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-auth", "key": "token"}}
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-auth", "key": "user"}}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-auth", "key": "password"}}
    # The ConfigMap holds the spec, which names the Secrets; no value of theirs can be in it, and no env var.
    configmap = config.configmap(ctx)
    assert "valueFrom" not in json.dumps(configmap) and "WANDB_API_KEY" not in json.dumps(configmap)
    job = yaml.safe_load(configmap["data"]["job.yaml"])
    assert job["spec"]["tracking"]["wandb"]["apiKeySecret"] == {"name": "wandb", "key": "api-key"}
    # Without tracking, no secret reference at all.
    plain = trainer.job(cluster_context({}))["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not [var for var in plain if "valueFrom" in var and "secretKeyRef" in var["valueFrom"]]


def test_the_rendered_secret_variables_are_the_ones_the_clients_read():
    """Names checked against the installed clients: mlflow/environment_variables.py and wandb/env.py."""
    mlflow_variables = pytest.importorskip("mlflow.environment_variables")
    wandb_env = pytest.importorskip("wandb.env")
    ctx = cluster_context({"backends": ["mlflow", "wandb"], **SECRETS})
    rendered = {
        var["name"]
        for var in trainer.job(ctx)["spec"]["template"]["spec"]["containers"][0]["env"]
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert rendered == {
        mlflow_variables.MLFLOW_TRACKING_TOKEN.name,
        mlflow_variables.MLFLOW_TRACKING_USERNAME.name,
        mlflow_variables.MLFLOW_TRACKING_PASSWORD.name,
        wandb_env.API_KEY,
    }


def test_the_trainer_reads_the_settings_from_the_mounted_job_as_the_operator_wrote_it(tmp_path):
    """The job file the operator mounts gives the trainer the same tracking environment as the spec."""
    ctx = cluster_context({"backends": ["tensorboard", "mlflow", "wandb"], **SECRETS})
    mounted = tmp_path / "job.yaml"
    mounted.write_text(config.configmap(ctx)["data"]["job.yaml"])
    env = tracking_environment(load_job(mounted), Path(ctx.checkpoint_dir))
    assert env["TENSORBOARD_LOGGING_DIR"] == f"{ctx.checkpoint_dir}/{TENSORBOARD_FOLDER}"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc:5000"
    assert env["WANDB_PROJECT"] == "rl" and env["WANDB_ENTITY"] == "team"


# --- one real run reporting to all three ----------------------------------------------------------------

JOB = """\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: tracked-tiny}}
spec:
  model: {{name: "{model}"}}
  dataset: {{name: data.jsonl, guidanceColumn: solution}}
  rewards: [{{name: accuracy}}]
  guidance: {{ratio: 0.5, schedule: fixed, initialLength: 4, minLength: 1, maxLength: 8}}
  training: {{numGenerations: 4, perDeviceBatchSize: 8, maxSteps: 3, maxCompletionLength: 8, learningRate: 1.0e-4}}
  checkpoint: {{everySteps: 100}}
  tracking:
    backends: [tensorboard, mlflow, wandb]
    runName: tiny-run
    tags: {{team: rl}}
    mlflow: {{trackingUri: "{mlflow_uri}", experiment: g2rpo-tests}}
    wandb: {{project: g2rpo-tests, mode: offline}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on loopback with a SQLite store, in its own process group, killed as a
    whole in teardown (its uvicorn worker outlives the parent). Without MLflow's job execution (huey
    consumers, not used by tracking; MLFLOW_SERVER_ENABLE_JOB_EXECUTION in mlflow/environment_variables.py)
    it is up in half the time."""
    if MLFLOW is None:
        pytest.skip("mlflow server not found: `make tools` installs it into .tools/mlflow")
    for client in ("tensorboard", "mlflow", "wandb"):  # before the server's slow start
        pytest.importorskip(client, reason="the tracking clients: pip install -c constraints/cpu.txt -e '.[tracking]'")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root",
         str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "mlflow.log").open("w"), start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up: {(tmp_path / 'mlflow.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # workers that ignored SIGTERM


def _write_dataset(path: Path) -> None:
    rows = [
        {"problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "solution": f"{i} + {i + 1} = {2 * i + 1}"}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_wandb_records(path: Path) -> list:
    """The records of a .wandb file, decoded with wandb's own protobuf message (wandb_internal_pb2.Record).

    wandb 0.31 writes the file from its Go core and no longer ships the Python reader (the former
    wandb/sdk/internal/datastore.py); the framing is LevelDB's log format, which that reader documented:
    a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of records, each
    crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last) | data.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pending, offset = [], b"", 7
    block = 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's trailer: too short for a header
            offset += block - offset % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break  # zero padding at the end of an unfinished block
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_a_local_run_reports_to_tensorboard_mlflow_and_wandb(tiny_model_dir, tmp_path, mlflow_server):
    """g2rpo run with all three backends: each one holds TRL's metrics and g2rpo's, one value per step."""
    _write_dataset(tmp_path / "data.jsonl")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.format(model=tiny_model_dir, mlflow_uri=mlflow_server))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TENSORBOARD_"))}
    done = subprocess.run(
        [sys.executable, "-m", "g2rpo.cli", "run", str(job_file), "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**env, "CUDA_VISIBLE_DEVICES": "", "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    expected = {
        json.loads(line)["step"]: json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "g2rpo/accuracy" in line
    }
    assert sorted(expected) == [1, 2, 3]

    # TensorBoard: its own event reader, from the run folder.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((out / TENSORBOARD_FOLDER).glob("events.out.tfevents.*"))
    assert len(event_files) == 1, "one writer: rank 0's"
    events = EventAccumulator(str(out / TENSORBOARD_FOLDER)).Reload()
    scalars = events.Tags()["scalars"]
    for name in (*G2RPO_METRICS, "loss", "reward"):
        assert f"train/{name}" in scalars, (name, scalars)
    for name in G2RPO_METRICS:
        points = events.Scalars(f"train/{name}")
        assert [p.step for p in points] == [1, 2, 3], name
        assert [p.value for p in points] == pytest.approx([expected[s][name] for s in (1, 2, 3)], rel=1e-5), name

    # MLflow: the server holds the run, named and tagged, with its params and every step's metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("g2rpo-tests")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "rl" and run.data.tags["g2rpo.job"] == "tracked-tiny"
    assert run.data.params["num_generations"] == "4" and run.data.params["learning_rate"] == "0.0001"
    for name in G2RPO_METRICS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert [step for step, _ in history] == [1, 2, 3], name
        assert [value for _, value in history] == pytest.approx([expected[s][name] for s in (1, 2, 3)]), name
    assert client.get_metric_history(run.info.run_id, "loss")

    # W&B offline: the run's files, in the run folder; its history records hold every step.
    (run_folder,) = (out / "wandb").glob("offline-run-*")
    (log_file,) = run_folder.glob("run-*.wandb")
    records = read_wandb_records(log_file)
    (run_record,) = [r.run for r in records if r.HasField("run")]
    assert run_record.project == "g2rpo-tests" and run_record.display_name == "tiny-run"
    assert set(run_record.tags) == {"team:rl", "g2rpo.job:tracked-tiny"}
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    by_step = {row["train/global_step"]: row for row in history if "train/g2rpo/accuracy" in row}
    assert sorted(by_step) == [1, 2, 3]
    for name in G2RPO_METRICS:
        assert [by_step[s][f"train/{name}"] for s in (1, 2, 3)] == pytest.approx(
            [expected[s][name] for s in (1, 2, 3)], rel=1e-5
        ), name
    config = [r.config for r in records if r.HasField("config")]
    assert any(item.key == "num_generations" for c in config for item in c.update)
