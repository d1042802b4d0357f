"""The contract between the operator's builders and the entry points: run the rendered pods.

`g2rpo render` gives the controller Deployment and the trainer Job exactly as the operator creates
them; this test runs their containers' command, args and env as local processes, the way the
kubelet would, so that any drift between what the builders write (flags, env names, mount paths,
file names, URLs, ports) and what `g2rpo controller` / `python -m g2rpo.train` read fails here.

What the kubelet would do, done here:
- volumes: the ConfigMap's and the Secret's keys become files in a folder per pod; the checkpoint
  claim is one folder shared by all pods (subPath honoured); each emptyDir is a fresh folder. Every
  mount path is rewritten to its folder, consistently, wherever a container reads it: command,
  args, env values and the values inside the mounted job.yaml (checkpoint.dir);
- `$(VAR)` in command/args is expanded from the container's env (Kubernetes' own expansion);
- the downward-API env NODE_RANK reads the pod's completion index (0 and 1 here);
- Service DNS names (`<svc>.<ns>.svc`, the trainer's `<pod>.<svc>.<ns>.svc`) resolve to
  127.0.0.1, and each Service port to a free local port, in URLs and in port values;
- the Job fails as a whole when one pod fails (backoffLimit 0): the surviving pod is terminated
  (SIGTERM, then SIGKILL), and the operator's restart creates both pods again.

Adaptations, only where this machine cannot run the pods as rendered:
- no GPU: trainer.gpusPerReplica is 1 and CUDA_VISIBLE_DEVICES is empty;
- DeepSpeed off: the mounted accelerate.yaml's `distributed_type: DEEPSPEED` becomes MULTI_GPU
  (the same torchrun launcher that DeepSpeed's `standard` multinode launcher uses), its
  deepspeed_config is dropped and mixed_precision is `no`; on CPU accelerate then picks gloo
  instead of NCCL;
- the rollout (vLLM) is replaced by TRL's in-process generation: G2RPO_ROLLOUT_URL is left unset,
  which is the trainer entry point's documented local generation path; the rollout pod is not run;
- tiny model (tests/conftest.py) and the generated builtin:arithmetic dataset; OMP_NUM_THREADS=1,
  HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from g2rpo.api.spec import parse_job
from g2rpo_operator.render import render_children

NAME = "contract"
NAMESPACE = "team"
CLAIM = "ckpt"
MAX_STEPS = 10
EVERY = 2
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_document(model_dir: Path) -> dict:
    return {
        "apiVersion": "g2rpo.dev/v1alpha1",
        "kind": "G2RPOJob",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"name": str(model_dir)},
            "dataset": {
                "name": "builtin:arithmetic",
                "arithmetic": {"numProblems": 16, "minSteps": 1, "maxSteps": 2},
            },
            "rewards": [{"name": "accuracy"}, {"name": "format", "weight": 0.1}],
            "guidance": {"ratio": 0.5, "schedule": "adaptive", "initialLength": 12, "minLength": 2, "maxLength": 48},
            "training": {
                "numGenerations": 4,
                "perDeviceBatchSize": 4,
                "maxSteps": MAX_STEPS,
                "maxCompletionLength": 16,
                "learningRate": 1.0e-4,
            },
            "checkpoint": {"everySteps": EVERY, "volumeClaim": CLAIM},
            "trainer": {"replicas": 2, "gpusPerReplica": 1},
        },
    }


class Cluster:
    """The kubelet's and the cluster DNS' part, for the rendered objects."""

    def __init__(self, documents: list[dict], root: Path):
        self.root = root
        self.objects = {(d["kind"], d["metadata"]["name"]): d for d in documents}
        self.local_port = {
            port["port"]: free_port()
            for (kind, _), d in self.objects.items()
            if kind == "Service"
            for port in d["spec"]["ports"]
        }
        self.claims = root / "claims"

    def pod(self, kind: str, name: str, index: int = 0) -> Pod:
        template = self.objects[(kind, name)]["spec"]["template"]
        return Pod(self, template["spec"], f"{name}-{index}", index)

    def host(self, value: str) -> str:
        """Service DNS names -> 127.0.0.1, their ports -> the local ports."""

        def local(match: re.Match) -> str:
            port = match.group(2)
            return "127.0.0.1" + (f":{self.local_port[int(port)]}" if port else "")

        return re.sub(rf"[a-z0-9.-]+\.{NAMESPACE}\.svc(:(\d+))?", lambda m: local(m), value)

    def port(self, value: str) -> str:
        return str(self.local_port.get(int(value), value)) if value.isdigit() else value


class Pod:
    """One pod of a rendered template, run as a local process (one container: ours have one)."""

    def __init__(self, cluster: Cluster, spec: dict, pod_name: str, index: int):
        self.cluster, self.spec, self.index = cluster, spec, index
        self.dir = cluster.root / "pods" / pod_name
        (container,) = spec["containers"]
        self.container = container
        self.mounts = self._mount_volumes()

    def _mount_volumes(self) -> dict[str, Path]:
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        mounts: dict[str, Path] = {}
        for mount in self.container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                source = self.cluster.claims / volume["persistentVolumeClaim"]["claimName"]
            else:
                source = self.dir / "volumes" / mount["name"]
            target = source / mount.get("subPath", "")
            target.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = target
        for mount in self.container["volumeMounts"]:  # files after folders: a file may name a mount path
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                data = self.cluster.objects[("ConfigMap", volume["configMap"]["name"])]["data"]
                for key, text in data.items():
                    (mounts[mount["mountPath"]] / key).write_text(self._config_file(key, text, mounts))
            elif "secret" in volume:
                data = self.cluster.objects[("Secret", volume["secret"]["secretName"])]["data"]
                for key, encoded in data.items():
                    (mounts[mount["mountPath"]] / key).write_bytes(base64.b64decode(encoded))
        return mounts

    def _config_file(self, key: str, text: str, mounts: dict[str, Path]) -> str:
        document = yaml.safe_load(text)
        if key == "accelerate.yaml":  # adaptation: no DeepSpeed, no GPU (see the module docstring)
            assert document.pop("distributed_type") == "DEEPSPEED"
            document.pop("deepspeed_config")
            document |= {"distributed_type": "MULTI_GPU", "mixed_precision": "no"}
            return yaml.safe_dump(document)
        return yaml.safe_dump(self._paths_in(document, mounts))

    def _paths_in(self, value: Any, mounts: dict[str, Path]) -> Any:
        if isinstance(value, dict):
            return {k: self._paths_in(v, mounts) for k, v in value.items()}
        if isinstance(value, list):
            return [self._paths_in(v, mounts) for v in value]
        return self.path(value, mounts) if isinstance(value, str) else value

    def path(self, value: str, mounts: dict[str, Path] | None = None) -> str:
        """A container path -> the folder mounted there (the longest mount path that contains it)."""
        mounts = self.mounts if mounts is None else mounts
        for mount_path in sorted(mounts, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(mounts[mount_path]) + value[len(mount_path) :]
        return value

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in self.container.get("env", []):
            if "valueFrom" in var:
                assert var["valueFrom"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}, var
                env[var["name"]] = str(self.index)
            elif var["name"].endswith("_PORT"):
                env[var["name"]] = self.cluster.port(var["value"])
            else:
                env[var["name"]] = self.cluster.host(self.path(var["value"]))
        assert "envFrom" not in self.container
        # Adaptation: the rollout is replaced by in-process generation (no G2RPO_ROLLOUT_URL).
        env.pop("G2RPO_ROLLOUT_URL", None)
        return env

    def argv(self, env: dict[str, str]) -> list[str]:
        words = [*self.container["command"], *self.container.get("args", [])]
        words = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], w) for w in words]  # Kubernetes' expansion
        out = []
        for i, word in enumerate(words):
            if i and words[i - 1].endswith("port"):
                word = self.cluster.port(word)
            out.append(self.cluster.host(self.path(word)))
        out[0] = shutil.which(out[0], path=str(Path(sys.executable).parent)) or out[0]
        return out

    def start(self, log_name: str) -> subprocess.Popen:
        env = self.env()
        base = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "LANG") if k in os.environ}
        adapted = {
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        log = open(self.cluster.root / log_name, "wb")
        return subprocess.Popen(
            self.argv(env),
            env={**base, **env, **adapted},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,  # its own process group: killed as a container is
        )


def kill(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """What the kubelet does to a pod the Job controller deletes: SIGTERM, then SIGKILL."""
    if process.poll() is None:
        kill(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    kill(process, signal.SIGKILL)  # the whole group, stragglers included
    process.wait()


def wait_for(predicate, timeout: float, what: str, logs: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def call(url: str, token: str) -> dict | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def complete_checkpoints(folder: Path) -> list[int]:
    """Steps of the checkpoints g2rpo finished writing (g2rpo.train.checkpoints' completion marker)."""
    from g2rpo.train.checkpoints import checkpoint_step, is_complete

    return sorted(checkpoint_step(p) for p in folder.glob("checkpoint-*") if is_complete(p))


@pytest.mark.slow
def test_rendered_pods_train_survive_a_killed_rank_and_finish(tiny_model_dir, tmp_path):
    documents = list(yaml.safe_load_all(render_children(parse_job(job_document(tiny_model_dir)), NAMESPACE)))
    cluster = Cluster([d for d in documents if d], tmp_path)
    token = base64.b64decode(cluster.objects[("Secret", f"{NAME}-token")]["data"]["token"]).decode()
    api = f"http://127.0.0.1:{cluster.local_port[8080]}"
    checkpoints = cluster.claims / CLAIM / NAME  # checkpoint.dir defaults to a folder per job on the claim
    # All pods start together, as on a cluster (the trainer retries the controller until it serves).
    controller = cluster.pod("Deployment", f"{NAME}-controller").start("controller.log")
    trainers: list[subprocess.Popen] = []
    try:
        # Attempt 1: both ranks train; rank 1's pod dies after the first checkpoint, mid-run.
        trainers = [cluster.pod("Job", f"{NAME}-trainer", i).start(f"trainer-{i}-a.log") for i in (0, 1)]

        def past_a_checkpoint() -> int | None:
            done = complete_checkpoints(checkpoints)
            step = (call(f"{api}/v1/guidance", token) or {}).get("step", 0)
            return step if done and step > done[-1] else None

        killed_at = wait_for(past_a_checkpoint, 120, "a report after the first checkpoint", tmp_path)
        assert killed_at < MAX_STEPS, "the run must be killed mid-run"
        kill(trainers[1], signal.SIGKILL)
        trainers[1].wait()
        stop(trainers[0])  # the Job has failed: its other pod is deleted
        assert trainers[0].returncode != 0, "rank 0 must not have finished before the kill"
        resumed_from = complete_checkpoints(checkpoints)[-1]
        # Normally the controller is past the checkpoint and must rewind; a kill delayed by a busy machine
        # may land after the next checkpoint completed, and then the restore is to the step it is at.
        assert resumed_from <= (call(f"{api}/v1/guidance", token) or {})["step"]
        print(f"killed at step {killed_at}, resuming from checkpoint-{resumed_from}")
        saved = json.loads((checkpoints / f"checkpoint-{resumed_from}" / "guidance_state.json").read_text())

        # Attempt 2: the operator recreates the Job; every rank resumes from the newest checkpoint.
        trainers = [cluster.pod("Job", f"{NAME}-trainer", i).start(f"trainer-{i}-b.log") for i in (0, 1)]
        for i, process in enumerate(trainers):
            code = process.wait(timeout=240)
            log = (tmp_path / f"trainer-{i}-b.log").read_text(errors="replace")
            assert code == 0, f"rank {i} exited with {code}\n{log[-4000:]}"

        assert controller.poll() is None, "the controller pod kept running throughout"
        state = call(f"{api}/v1/state", token)["snapshot"]
        assert state["state"]["step"] == MAX_STEPS
        assert "restore" in [event["event"] for event in state["events"]]
        assert state["state"]["rewards"][:resumed_from] == saved["state"]["rewards"]
        assert complete_checkpoints(checkpoints)[-1] == MAX_STEPS
        assert (checkpoints / "final" / "config.json").is_file()
        assert any((cluster.claims / CLAIM / NAME / "controller-state").iterdir()), "state on the claim's subPath"
    finally:
        for process in [*trainers, controller]:
            stop(process, grace=2.0)
