"""Checkpoints in an object store (checkpoint.uri, g2rpo.train.store), through s3fs against an S3 API.

The S3 API is moto's server mode (`moto_server`, PyPI moto[server]) on loopback: a stand-in for
Amazon S3, not S3 itself. s3fs, aiobotocore and botocore are the real clients the trainer image
runs, and they are configured only through the environment, as on a cluster where the keys of
checkpoint.credentialsSecret become the trainer pods' env: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (botocore/credentials.py, EnvProvider) and AWS_ENDPOINT_URL, botocore's
global endpoint variable (botocore/configprovider.py, ConfiguredEndpointProvider: the service's
AWS_ENDPOINT_URL_S3 first, then AWS_ENDPOINT_URL; botocore logs "Found endpoint for s3 via:
environment_global").
The bucket is made with boto3 in us-east-1: s3fs's own mkdir sends a location constraint that
moto refuses for that region.

The kill test uses the store's test-only hook G2RPO_TEST_PAUSE_BEFORE_MARKER_UPLOAD="STEP:DIR"
(g2rpo.train.store): the real upload stops after checkpoint-STEP's files and before its marker,
so the SIGKILL lands in the middle of the upload every time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from g2rpo.api.names import TRAINER_CHECK_FLAG, TRAINER_JOB_FLAG, TRAINER_MODULE
from g2rpo.api.spec import EXIT_INVALID_SPEC, CheckpointSpec, SpecError
from g2rpo.train.checkpoints import COMPLETE_MARKER, mark_complete

pytest.importorskip("s3fs", reason="checkpoint.uri needs the objectstore extra (s3fs)")
boto3 = pytest.importorskip("boto3")

from g2rpo.train.store import CheckpointUploadError, ObjectStore, check_backend  # noqa: E402

BUCKET = "g2rpo-checkpoints"
JOB = """\
apiVersion: g2rpo.dev/v1alpha1
kind: G2RPOJob
metadata: {{name: tiny-store}}
spec:
  model: {{name: "{model}"}}
  dataset:
    name: builtin:arithmetic
    arithmetic: {{numProblems: 24, minSteps: 1, maxSteps: 3}}
    guidanceColumn: solution
  rewards: [{{name: accuracy}}, {{name: format, weight: 0.1}}]
  guidance: {{ratio: 0.5, schedule: adaptive, initialLength: 16, minLength: 2, maxLength: 64}}
  training: {{numGenerations: 4, perDeviceBatchSize: 4, maxSteps: 3, maxCompletionLength: 8, learningRate: 1.0e-3}}
  checkpoint: {{everySteps: 1, keep: 2, uri: "{uri}"}}
"""
COMPARED = ("loss", "g2rpo/guidance_length", "g2rpo/accuracy", "reward", "grad_norm")


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A moto S3 server on loopback and the AWS_* environment that points botocore at it."""
    executable = Path(sys.executable).with_name("moto_server")
    if not executable.exists():
        pytest.skip("moto_server (moto[server], dev extra) is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen(
        [str(executable), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


def _objects(prefix: str) -> set[str]:
    """The keys under `prefix`, relative to it, as S3 itself lists them (boto3, not s3fs)."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    return {item["Key"][len(prefix) + 1 :] for page in pages for item in page.get("Contents", [])}


def _checkpoint(folder: Path, step: int, payload: bytes = b"weights") -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload * step)
    (folder / "sub" / "state.json").write_text(json.dumps({"step": step}))
    mark_complete(folder, step)
    return folder


# --- the store on its own ------------------------------------------------------------------------


def test_uploads_marker_last_keeps_the_newest_and_downloads_a_complete_one(s3_env, tmp_path):
    store = ObjectStore.open(f"s3://{BUCKET}/unit", keep=2)
    for step in (1, 2, 3):
        store.publish(_checkpoint(tmp_path / "local" / f"checkpoint-{step}", step))
    store.wait()
    keys = _objects("unit")
    assert {key.split("/")[0] for key in keys} == {"checkpoint-2", "checkpoint-3"}, "keep: 2 in the store"
    assert {"checkpoint-3/model.safetensors", "checkpoint-3/sub/state.json", f"checkpoint-3/{COMPLETE_MARKER}"} <= keys

    stale = tmp_path / "elsewhere" / ".downloading-checkpoint-9"  # left by a download that was killed
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"cut")
    fetched = store.fetch_newest(tmp_path / "elsewhere")
    assert fetched == tmp_path / "elsewhere" / "checkpoint-3"
    assert (fetched / "model.safetensors").read_bytes() == b"weights" * 3
    assert json.loads((fetched / COMPLETE_MARKER).read_text())["step"] == 3
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["checkpoint-3"], "no download folder left"


def test_a_checkpoint_whose_marker_is_missing_in_the_store_never_counts(s3_env, tmp_path, caplog):
    store = ObjectStore.open(f"s3://{BUCKET}/partial", keep=None)
    store.publish(_checkpoint(tmp_path / "local" / "checkpoint-1", 1))
    store.wait()
    newer = _checkpoint(tmp_path / "local" / "checkpoint-2", 2)
    store.fs.put_file(str(newer / "model.safetensors"), f"{BUCKET}/partial/checkpoint-2/model.safetensors")

    assert store.fetch_newest(tmp_path / "fresh") == tmp_path / "fresh" / "checkpoint-1"
    assert f"skipping s3://{BUCKET}/partial/checkpoint-2 in the store: no {COMPLETE_MARKER}" in caplog.text
    # The next completed upload cleans the partial one away.
    store.publish(_checkpoint(tmp_path / "local" / "checkpoint-3", 3))
    store.wait()
    assert {key.split("/")[0] for key in _objects("partial")} == {"checkpoint-1", "checkpoint-3"}


def test_an_empty_store_gives_nothing_to_resume_from(s3_env, tmp_path):
    assert ObjectStore.open(f"s3://{BUCKET}/never-written", keep=3).fetch_newest(tmp_path) is None


def test_a_failed_upload_fails_at_the_next_wait(s3_env, tmp_path):
    store = ObjectStore.open("s3://no-such-bucket/run", keep=3)
    store.publish(_checkpoint(tmp_path / "checkpoint-1", 1))
    with pytest.raises(CheckpointUploadError, match="uploading a checkpoint to s3://no-such-bucket/run failed"):
        store.wait()
    store.wait()  # reported once


def test_a_missing_backend_names_the_package_and_the_extra():
    pytest.importorskip("s3fs")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(SpecError) as error:
        check_backend(CheckpointSpec(uri="gs://bucket/run").uri or "")
    assert "spec.checkpoint.uri: gs:// needs the Python package gcsfs" in str(error.value)
    assert "pip install 'g2rpo[objectstore-gcs]'" in str(error.value)


def test_the_check_spec_container_refuses_a_store_whose_package_is_missing(tmp_path):
    """The trainer pods' init container (`python -m g2rpo.train --job FILE --check`, the operator's
    check_command) exits EXIT_INVALID_SPEC before any GPU work when the uri's backend is absent."""
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.format(model="Qwen/Qwen3-0.6B", uri="gs://bucket/run"))
    check = [sys.executable, "-m", TRAINER_MODULE, TRAINER_JOB_FLAG, str(job_file), TRAINER_CHECK_FLAG]
    result = subprocess.run(check, capture_output=True, text=True, timeout=300, env={**os.environ, "WORLD_SIZE": "1"})
    assert result.returncode == EXIT_INVALID_SPEC, result.stderr[-2000:]
    assert "spec.checkpoint.uri: gs:// needs the Python package gcsfs" in result.stderr
    job_file.write_text(JOB.format(model="Qwen/Qwen3-0.6B", uri=f"s3://{BUCKET}/run"))
    assert (
        subprocess.run(check, capture_output=True, timeout=300, env={**os.environ, "WORLD_SIZE": "1"}).returncode == 0
    )


# --- the trainer: a kill in the middle of an upload, then a resume on a node without the old folder ----


def _command(job_file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "g2rpo.cli", "run", str(job_file), "--output", str(out), "--no-progress"]


def _per_step(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r.get(k) for k in COMPARED} for r in records if "loss" in r}


@pytest.mark.slow
def test_sigkill_during_an_upload_then_resume_from_the_store_with_an_empty_local_folder(
    s3_env, tiny_model_dir, tmp_path
):
    prefix = "killed"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.format(model=tiny_model_dir, uri=f"s3://{BUCKET}/{prefix}"))
    out, hook = tmp_path / "run", tmp_path / "hook"
    hook.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "G2RPO_TEST_PAUSE_BEFORE_MARKER_UPLOAD": f"2:{hook}"}
    with (hook / "stderr.txt").open("w") as stderr:
        run = subprocess.Popen(_command(job_file, out), stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    deadline = time.monotonic() + 600
    while not (hook / "paused").exists():
        assert run.poll() is None, (hook / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the upload of checkpoint-2"
        time.sleep(0.1)
    run.kill()
    run.wait(timeout=60)

    keys = _objects(prefix)
    assert f"checkpoint-1/{COMPLETE_MARKER}" in keys
    assert "checkpoint-2/model.safetensors" in keys, "the kill came after checkpoint-2's files were uploaded"
    assert f"checkpoint-2/{COMPLETE_MARKER}" not in keys, "and before its marker"
    first_run = _per_step(out)  # step 3 may have run too: training goes on while checkpoint-2 uploads
    assert {1, 2} <= set(first_run)

    shutil.rmtree(out)  # the pod comes back on a node without the old volume
    resumed = subprocess.run(
        _command(job_file, out),
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "G2RPO_TEST_PAUSE_BEFORE_MARKER_UPLOAD": ""},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping s3://{BUCKET}/{prefix}/checkpoint-2 in the store: no {COMPLETE_MARKER}" in resumed.stderr
    assert f"downloaded checkpoint-1 from s3://{BUCKET}/{prefix}" in resumed.stderr
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-1'}" in resumed.stderr
    again = _per_step(out)
    assert sorted(again) == [2, 3], "training went on from step 1"
    assert again[2] == first_run[2], "step 2 trained again from the downloaded checkpoint exactly as the first time"

    keys = _objects(prefix)
    assert {key.split("/")[0] for key in keys} == {"checkpoint-2", "checkpoint-3", "final"}, "keep: 2, and final"
    for name in ("checkpoint-2", "checkpoint-3", "final"):
        marker = json.loads(
            boto3.client("s3").get_object(Bucket=BUCKET, Key=f"{prefix}/{name}/{COMPLETE_MARKER}")["Body"].read()
        )
        assert {f"{name}/{file}" for file in marker["files"]} | {f"{name}/{COMPLETE_MARKER}"} == {
            key for key in keys if key.startswith(f"{name}/")
        }
    assert (
        "model.safetensors"
        in json.loads(
            boto3.client("s3").get_object(Bucket=BUCKET, Key=f"{prefix}/final/{COMPLETE_MARKER}")["Body"].read()
        )["files"]
    )
    state = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint-3/trainer_state.json")
    assert json.loads(state["Body"].read())["global_step"] == 3
