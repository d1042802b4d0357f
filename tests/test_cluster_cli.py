"""`g2rpo submit | status | logs | list | delete` and the Python API under them (g2rpo.client), against
KMock, the loopback stand-in for the Kubernetes API server (no cluster here), reached through a real
kubeconfig file by the official Kubernetes client, as on a user's machine.

KMock has no operator and no kubelet: the tests write the job's status as the operator does (through
`g2rpo.api.status.JobStatus`, the operator's own model) and the pods' logs as the kubelet would serve
them (a canned answer on the pod's `log` subresource: a stand-in). The contract with the operator's
side is checked separately: the labels and annotation the client selects trainer, rollout and
controller pods by are the ones the operator's builders put on them.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from g2rpo.api.spec import load_job
from g2rpo.api.status import JobStatus, condition
from g2rpo.cli import build_parser
from g2rpo.client import ClusterError, JobClient
from g2rpo.client.command import run as run_verb

from kmock_support import JOBS, PODS, free_port, serving_in_thread

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2-arithmetic.yaml"
NAMESPACE = "team-a"


@pytest.fixture
def cluster(tmp_path):
    """KMock on loopback and a kubeconfig whose current context points at it, in namespace team-a."""
    with serving_in_thread() as (emulator, url, on_loop):
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(_kubeconfig(url)))
        yield emulator, kubeconfig, on_loop


def _kubeconfig(url: str) -> dict:
    token = base64.b64encode(b"not-checked-by-kmock").decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": url}}],
        "users": [{"name": "me", "user": {"token": token}}],
        "contexts": [
            {"name": "lab", "context": {"cluster": "lab", "user": "me", "namespace": NAMESPACE}},
            {"name": "other", "context": {"cluster": "lab", "user": "me"}},
        ],
    }


def _env(kubeconfig: Path | None) -> dict[str, str]:
    """A user's environment: no ~/.kube/config, KUBECONFIG when given."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": os.pathsep.join(sys.path)}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def g2rpo(*args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "g2rpo.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env(kubeconfig))


def g2rpo_process(*args: str, kubeconfig: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "g2rpo.cli", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(kubeconfig))


def job_file(tmp_path: Path, name: str = "arith", max_steps: int = 40) -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"] = {"name": name}
    document["spec"].setdefault("training", {})["maxSteps"] = max_steps
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def operator_status(phase: str, step: int | None = None, **fields) -> dict:
    """A status as the operator writes it (its model, its field names, its conditions)."""
    now = datetime.now(UTC)
    conditions = [
        condition("SpecValid", True, "Accepted", "the spec is valid", [], now, 1),
        condition(
            "Ready",
            phase == "Running",
            "TrainerPodsReady" if phase == "Running" else "Waiting",
            "every trainer pod is ready" if phase == "Running" else "rollout pod Pending: Insufficient nvidia.com/gpu",
            [],
            now,
            1,
        ),
    ]
    status = JobStatus(phase=phase, conditions=conditions, step=step, **fields)
    return status.model_dump(by_alias=True, mode="json")


def set_status(emulator, on_loop, name: str, status: dict) -> None:
    on_loop(emulator.patch_object(JOBS, NAMESPACE, name, {"status": status}, status=True))


def test_submit_validates_then_creates_in_the_contexts_namespace(cluster, tmp_path):
    emulator, kubeconfig, _ = cluster
    path = job_file(tmp_path)
    done = g2rpo("submit", str(path), kubeconfig=kubeconfig)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"g2rpojob/arith created in namespace {NAMESPACE}"
    stored = emulator.stored(JOBS, NAMESPACE, "arith")
    expected = load_job(path).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert stored["spec"] == expected["spec"] and stored["kind"] == "G2RPOJob"
    again = g2rpo("submit", str(path), kubeconfig=kubeconfig)
    assert again.returncode == 1
    assert again.stderr == (
        f"g2rpo submit: G2RPOJob 'arith' already exists in namespace '{NAMESPACE}': "
        "`g2rpo status arith` shows it; delete it first to submit it again\n"
    )
    elsewhere = g2rpo("submit", str(path), "-n", "team-b", kubeconfig=kubeconfig)
    assert elsewhere.returncode == 0 and emulator.stored(JOBS, "team-b", "arith")


def test_submit_reports_what_validate_reports_before_touching_the_cluster(tmp_path):
    """The file is checked first, with `validate`'s own errors: the kubeconfig points at a closed port."""
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["training"]["learningRate"] = -1
    document["spec"]["guidance"]["minLength"] = 9
    document["spec"]["guidance"]["maxLength"] = 3
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(document))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(_kubeconfig(f"http://127.0.0.1:{free_port()}")))
    submitted = g2rpo("submit", str(path), kubeconfig=kubeconfig)
    validated = g2rpo("validate", "--no-data", str(path))
    assert submitted.returncode == validated.returncode == 1
    assert submitted.stderr == validated.stderr and "training.learningRate" in submitted.stderr


def test_status_shows_phase_progress_reward_guidance_and_every_condition(cluster, tmp_path):
    emulator, kubeconfig, on_loop = cluster
    assert g2rpo("submit", str(job_file(tmp_path)), kubeconfig=kubeconfig).returncode == 0
    before = g2rpo("status", "arith", kubeconfig=kubeconfig)
    assert before.returncode == 0
    assert "phase:      Unknown" in before.stdout and "has not reported" in before.stdout
    set_status(
        emulator,
        on_loop,
        "arith",
        operator_status(
            "Running",
            step=10,
            accuracy_reward=0.4375,
            guidance_length=96,
            last_checkpoint="/checkpoints/arith/checkpoint-10",
        ),
    )
    shown = g2rpo("status", "arith", kubeconfig=kubeconfig).stdout.splitlines()
    assert shown[0] == f"g2rpojob/arith in namespace {NAMESPACE}"
    assert "  phase:      Running" in shown
    assert f"  step:       [{'#' * 7}{'.' * 23}] 10/40 (25%)" in shown
    assert "  reward:     0.438 (accuracy, last step)" in shown
    assert "  guidance:   96 tokens (l_k, next step)" in shown
    assert "  checkpoint: /checkpoints/arith/checkpoint-10" in shown
    assert any(line.split()[:3] == ["SpecValid", "True", "Accepted:"] for line in shown)
    assert any("Ready" in line and "every trainer pod is ready" in line for line in shown)


def test_status_watch_prints_each_change_and_exits_with_the_outcome(cluster, tmp_path):
    """The operator's changes are made once the watcher has printed the job as it was (no race with
    the command's start-up), each while the watch is open."""
    emulator, kubeconfig, on_loop = cluster
    assert g2rpo("submit", str(job_file(tmp_path)), kubeconfig=kubeconfig).returncode == 0
    set_status(emulator, on_loop, "arith", operator_status("Pending"))
    watcher = g2rpo_process("status", "arith", "--watch", kubeconfig=kubeconfig)
    printed = []

    def read_until_phase(phase: str) -> None:
        for line in watcher.stdout:
            printed.append(line)
            if line.startswith("  phase:") and line.split()[-1] == phase:
                return
        raise AssertionError(f"the watch ended before phase {phase}: {''.join(printed)}")

    read_until_phase("Pending")
    set_status(emulator, on_loop, "arith", operator_status("Running", step=20, accuracy_reward=0.5))
    read_until_phase("Running")
    set_status(emulator, on_loop, "arith", operator_status("Succeeded", step=40, accuracy_reward=0.75))
    read_until_phase("Succeeded")
    printed.extend(watcher.stdout)
    assert watcher.wait(timeout=60) == 0, watcher.stderr.read()
    phases = [line.split()[-1] for line in printed if line.startswith("  phase:")]
    assert phases == ["Pending", "Running", "Succeeded"]
    assert "40/40 (100%)" in "".join(printed)

    set_status(emulator, on_loop, "arith", operator_status("Failed", step=40))
    failed = g2rpo("status", "arith", "-w", kubeconfig=kubeconfig)
    assert failed.returncode == 1 and "phase:      Failed" in failed.stdout


def _pod(name: str, job: str, component: str, index: int | None = None, created: str = "2026-12-01T00:00:00Z") -> dict:
    labels = {
        "app.kubernetes.io/name": "g2rpo",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
    }
    annotations = {"batch.kubernetes.io/job-completion-index": str(index)} if index is not None else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations, "creationTimestamp": created},
        "spec": {"containers": [{"name": component, "image": "x"}]},
    }


def test_logs_pick_the_trainer_rank_or_the_component_pod(cluster, tmp_path):
    emulator, kubeconfig, on_loop = cluster
    assert g2rpo("submit", str(job_file(tmp_path)), kubeconfig=kubeconfig).returncode == 0
    pods = [
        _pod("arith-trainer-0-old", "arith", "trainer", 0, created="2026-12-01T00:00:00Z"),
        _pod("arith-trainer-0-new", "arith", "trainer", 0, created="2026-12-02T00:00:00Z"),
        _pod("arith-trainer-1-x", "arith", "trainer", 1),
        _pod("arith-rollout-x", "arith", "rollout"),
        _pod("other-trainer-0-x", "other", "trainer", 0),
    ]
    for pod in pods:
        on_loop(emulator.create_object(PODS, NAMESPACE, pod))
        path = f"get /api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}/log"
        emulator[path] << f"{pod['metadata']['name']} line 1\n{pod['metadata']['name']} line 2\n".encode()
    assert (
        g2rpo("logs", "arith", kubeconfig=kubeconfig).stdout
        == "arith-trainer-0-new line 1\narith-trainer-0-new line 2\n"
    )
    assert g2rpo("logs", "arith", "--rank", "1", kubeconfig=kubeconfig).stdout.startswith("arith-trainer-1-x line 1")
    assert g2rpo("logs", "arith", "--component", "rollout", "-f", kubeconfig=kubeconfig).stdout.startswith(
        "arith-rollout-x"
    )
    missing = g2rpo("logs", "arith", "--component", "controller", kubeconfig=kubeconfig)
    assert missing.returncode == 1
    assert missing.stderr == (
        f"g2rpo logs: G2RPOJob 'arith' has no controller pod in namespace '{NAMESPACE}' now "
        "(phase Unknown; `g2rpo status arith` says why)\n"
    )


def test_the_pods_the_client_selects_are_labelled_so_by_the_operators_builders():
    """Contract: trainer pods carry the instance and component labels and the Job controller's completion
    index (as the annotation the builders read NODE_RANK from); rollout and controller pods the labels."""
    from g2rpo.api.spec import parse_spec
    from g2rpo.client.api import COMPLETION_INDEX, COMPONENT_LABEL, INSTANCE_LABEL
    from g2rpo_operator.builders import controller, rollout, trainer
    from g2rpo_operator.builders.common import JobContext
    from g2rpo_operator.settings import OperatorSettings

    spec = parse_spec({"model": {"name": "m"}, "dataset": {"name": "builtin:arithmetic"}})
    ctx = JobContext.resolve("arith", NAMESPACE, spec, OperatorSettings())
    templates = {
        "trainer": trainer.job(ctx)["spec"]["template"],
        "rollout": rollout.deployment(ctx)["spec"]["template"],
        "controller": controller.deployment(ctx)["spec"]["template"],
    }
    for component, template in templates.items():
        labels = template["metadata"]["labels"]
        assert labels[INSTANCE_LABEL] == "arith" and labels[COMPONENT_LABEL] == component
    rank_env = next(e for e in templates["trainer"]["spec"]["containers"][0]["env"] if e["name"] == "NODE_RANK")
    assert rank_env["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{COMPLETION_INDEX}']"


def test_list_and_delete(cluster, tmp_path):
    emulator, kubeconfig, on_loop = cluster
    for name in ("beta", "alpha"):
        assert g2rpo("submit", str(job_file(tmp_path, name)), kubeconfig=kubeconfig).returncode == 0
    assert g2rpo("submit", str(job_file(tmp_path, "gamma")), "-n", "team-b", kubeconfig=kubeconfig).returncode == 0
    set_status(emulator, on_loop, "alpha", operator_status("Running", step=5, accuracy_reward=0.25, guidance_length=64))
    listed = g2rpo("list", kubeconfig=kubeconfig).stdout.splitlines()
    assert listed[0].split() == ["NAME", "PHASE", "STEP", "REWARD", "GUIDANCE", "RESTARTS", "AGE"]
    assert [line.split()[:6] for line in listed[1:]] == [
        ["alpha", "Running", "5/40", "0.250", "64", "0"],
        ["beta", "Unknown", "-", "-", "-", "-"],
    ]
    everywhere = g2rpo("list", "-A", kubeconfig=kubeconfig).stdout.splitlines()
    assert [line.split()[:2] for line in everywhere[1:]] == [
        [NAMESPACE, "alpha"],
        [NAMESPACE, "beta"],
        ["team-b", "gamma"],
    ]
    deleted = g2rpo("delete", "beta", kubeconfig=kubeconfig)
    assert deleted.returncode == 0 and deleted.stdout == f"g2rpojob/beta deleted from namespace {NAMESPACE}\n"
    assert emulator.stored(JOBS, NAMESPACE, "beta") is None
    gone = g2rpo("status", "beta", kubeconfig=kubeconfig)
    assert (
        gone.returncode == 1 and gone.stderr == f"g2rpo status: G2RPOJob 'beta' not found in namespace '{NAMESPACE}'\n"
    )


def test_errors_are_one_clear_line(cluster, tmp_path):
    emulator, kubeconfig, _ = cluster

    def one_line(*args: str, config: Path = kubeconfig) -> str:
        done = g2rpo(*args, kubeconfig=config)
        assert done.returncode == 1 and done.stdout == "", done
        assert done.stderr.count("\n") == 1, done.stderr
        return done.stderr

    closed = tmp_path / "closed"
    closed.write_text(yaml.safe_dump(_kubeconfig(f"http://127.0.0.1:{free_port()}")))
    assert one_line("list", config=closed).startswith("g2rpo list: cannot reach the cluster at http://127.0.0.1:")
    assert one_line("list", config=tmp_path / "absent").startswith("g2rpo list: no cluster configured: ")
    assert one_line("status", "x", "--context", "prod") == (
        "g2rpo status: context 'prod' is not in the kubeconfig (contexts: lab, other)\n"
    )
    assert one_line("status", "x") == f"g2rpo status: G2RPOJob 'x' not found in namespace '{NAMESPACE}'\n"
    # The `other` context names no namespace: kubectl's default.
    assert (
        one_line("status", "x", "--context", "other") == "g2rpo status: G2RPOJob 'x' not found in namespace 'default'\n"
    )
    refusal = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "Forbidden",
        "code": 403,
        "message": 'g2rpojobs.g2rpo.dev "x" is forbidden: User "me" cannot get resource "g2rpojobs" in namespace "team-a"',
    }
    emulator[f"get /apis/g2rpo.dev/v1alpha1/namespaces/{NAMESPACE}/g2rpojobs/x"] << 403 << refusal
    assert one_line("status", "x") == f"g2rpo status: forbidden: cannot read G2RPOJob 'x': {refusal['message']}\n"


def test_a_cluster_without_the_crd_says_so():
    """An API server on which nobody installed the CRD answers 404 on g2rpo.dev/v1alpha1 itself (discovery)
    and on every path under it ("the server could not find the requested resource"). KMock lists any
    resource it has been told of in discovery, so this stand-in is a plain HTTP server giving those 404s."""
    import http.server
    import json as json_module

    not_served = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "NotFound",
        "code": 404,
        "message": "the server could not find the requested resource",
        "details": {},
    }

    class NoCrd(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json_module.dumps(not_served).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoCrd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = url
        jobs = JobClient(namespace=NAMESPACE, api_client=client.ApiClient(configuration))
        with pytest.raises(ClusterError) as raised:
            jobs.get("x")
    finally:
        server.shutdown()
    assert str(raised.value) == (
        f"the cluster at {url} does not serve g2rpojobs.g2rpo.dev/v1alpha1: the G2RPOJob CRD is not installed "
        "(helm install g2rpo charts/g2rpo, or g2rpo crd | kubectl apply -f -)"
    )


def test_python_api_round_trip(cluster, tmp_path):
    """The same operations from Python: the verbs are thin over JobClient."""
    emulator, kubeconfig, on_loop = cluster
    jobs = JobClient(kubeconfig=str(kubeconfig))
    assert jobs.namespace == NAMESPACE
    view = jobs.submit(load_job(job_file(tmp_path)))
    assert (view.name, view.namespace, view.phase, view.max_steps) == ("arith", NAMESPACE, "Unknown", 40)
    set_status(emulator, on_loop, "arith", operator_status("Running", step=3))
    assert jobs.get("arith").status.step == 3
    assert jobs.spec("arith").spec.training.max_steps == 40
    assert [v.name for v in jobs.list()] == ["arith"]
    out = io.StringIO()
    args = build_parser().parse_args(["status", "arith"])
    assert run_verb(args, client=jobs, out=out) == 0 and "3/40" in out.getvalue()
    jobs.delete("arith")
    assert jobs.list() == []
