"""`g2rpo render JOB.yaml`: every child the operator would create, as YAML, for review and for tests."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest
import yaml

from g2rpo.api.spec import load_job
from g2rpo.cli import main
from g2rpo_operator.builders import JobContext, children
from g2rpo_operator.builders.storage import checkpoint_claim
from g2rpo_operator.render import RENDERED_TOKEN
from g2rpo_operator.settings import OperatorSettings

from operator_fixtures import job_manifest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "g2rpojob.yaml"


def render(capsys, *args: str) -> tuple[int, list[dict], str, str]:
    code = main(["render", *args])
    out, err = capsys.readouterr()
    documents = [d for d in yaml.safe_load_all(out) if d is not None] if code == 0 else []
    return code, documents, out, err


def write_job(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_manifest(**spec)))
    return path


def test_the_example_renders_every_child_the_operator_creates(capsys):
    code, documents, out, _ = render(capsys, str(EXAMPLE))
    assert code == 0
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in documents)
    assert kinds == sorted(
        [
            ("PersistentVolumeClaim", "g2rpo-checkpoints"),
            ("ConfigMap", "qwen3-1p7b-math-config"),
            ("Secret", "qwen3-1p7b-math-token"),
            ("NetworkPolicy", "qwen3-1p7b-math-controller"),
            ("NetworkPolicy", "qwen3-1p7b-math-rollout"),
            ("NetworkPolicy", "qwen3-1p7b-math-trainer"),
            ("Service", "qwen3-1p7b-math-controller"),
            ("Deployment", "qwen3-1p7b-math-controller"),
            ("Service", "qwen3-1p7b-math-rollout"),
            ("Deployment", "qwen3-1p7b-math-rollout"),
            ("Service", "qwen3-1p7b-math-trainer"),
            ("Job", "qwen3-1p7b-math-trainer"),
        ]
    )
    # Exactly the builders' output with the operator's defaults (the token aside).
    job = load_job(EXAMPLE)
    ctx = JobContext.resolve(job.metadata.name, "default", job.spec, OperatorSettings.from_env())
    assert documents == [checkpoint_claim(ctx), *children(ctx, RENDERED_TOKEN, active=True)]
    assert "# Created only if no claim of this name exists; not owned by the job" in out
    # The ConfigMap's files are readable blocks, and the Secret is marked as a placeholder.
    assert "  job.yaml: |\n" in out
    secret = next(d for d in documents if d["kind"] == "Secret")
    assert base64.b64decode(secret["data"]["token"]).decode() == RENDERED_TOKEN
    assert "# Not a secret: the operator derives each job's token" in out


def test_namespace_is_applied_everywhere(capsys, tmp_path):
    code, documents, _, _ = render(capsys, str(write_job(tmp_path)), "--namespace", "team-a")
    assert code == 0
    assert {d["metadata"]["namespace"] for d in documents} == {"team-a"}
    assert "PersistentVolumeClaim" not in {d["kind"] for d in documents}  # no volumeSize: the user's claim
    trainer = next(d for d in documents if d["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in trainer["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["G2RPO_CONTROLLER_URL"] == "http://demo-controller.team-a.svc:8080"
    config = next(d for d in documents if d["kind"] == "ConfigMap")
    assert yaml.safe_load(config["data"]["job.yaml"])["metadata"]["namespace"] == "team-a"


def test_operator_settings_come_from_the_same_environment_as_the_operator(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("G2RPO_TRAINER_IMAGE", "registry.example/trainer:1")
    monkeypatch.setenv("G2RPO_GPU_NODE_SELECTOR", '{"pool": "h100"}')
    code, documents, _, _ = render(capsys, str(write_job(tmp_path, runPolicy={"gangScheduler": "volcano"})))
    assert code == 0
    trainer = next(d for d in documents if d["kind"] == "Job")["spec"]["template"]["spec"]
    assert trainer["containers"][0]["image"] == "registry.example/trainer:1"
    assert trainer["nodeSelector"] == {"pool": "h100"}
    assert "PodGroup" in {d["kind"] for d in documents}


def test_a_suspended_job_renders_no_trainer_and_zero_replicas(capsys, tmp_path):
    code, documents, _, _ = render(capsys, str(write_job(tmp_path, suspend=True)))
    assert code == 0
    assert "Job" not in {d["kind"] for d in documents}
    assert {d["spec"]["replicas"] for d in documents if d["kind"] == "Deployment"} == {0}


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"guidance": {"ratio": 1.5}}, "spec.guidance.ratio"),
        ({"checkpoint": {"volumeClaim": None}}, "spec.checkpoint.volumeClaim"),
        ({"rollout": {"gpus": 2, "dataParallelSize": 2}}, "spec.rollout.dataParallelSize"),
    ],
)
def test_a_bad_file_is_refused_naming_the_field(capsys, tmp_path, spec, field):
    code, _, out, err = render(capsys, str(write_job(tmp_path, **spec)))
    assert code == 1 and out == ""
    assert f"  {field}: " in err, err


def test_a_bad_operator_setting_names_the_variable(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("G2RPO_GPU_TOLERATIONS", "not json")
    code, _, out, err = render(capsys, str(write_job(tmp_path)))
    assert code == 1 and out == "" and "G2RPO_GPU_TOLERATIONS: cannot parse" in err


def test_without_the_operator_package_the_error_says_what_to_install(capsys, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "g2rpo_operator" or m.startswith("g2rpo_operator.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "g2rpo_operator", None)  # import fails as if not installed
    code, _, out, err = render(capsys, str(write_job(tmp_path)))
    assert code == 2 and out == "" and "pip install 'g2rpo[operator]'" in err
