"""The operator's pure parts: child manifests from a spec, validation, and the lifecycle decisions.

No cluster and no fakes: these are functions of their arguments. Every manifest is also checked
against Kubernetes' own schemas with kubernetes-validate --strict (unknown fields fail).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import kubernetes_validate
import pytest
import yaml
from g2rpo.spec import parse_job, parse_spec
from g2rpo_operator.builders import JobContext, children, config, controller, rollout, trainer
from g2rpo_operator.reconcile import MUTABLE_FIELDS, progress, spec_changes, validate
from g2rpo_operator.settings import DEFAULT_GPU_NODE_SELECTOR, OperatorSettings
from g2rpo_operator.status import timestamp
from operator_fixtures import CLAIM, job_manifest

KUBE_VERSION = "1.30"  # the oldest Kubernetes the manifests target
NOW = datetime(2026, 1, 1, tzinfo=UTC)
RECOMMENDED = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
}


def ctx(settings: OperatorSettings | None = None, **spec) -> JobContext:
    raw = job_manifest("qwen", **spec)["spec"]
    return JobContext.resolve("qwen", "ml", parse_spec(raw), settings or OperatorSettings())


def pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("active", [True, False])
def test_every_child_is_schema_valid_labelled_and_namespaced(active):
    objs = children(ctx(runPolicy={"gangScheduler": "kueue", "queue": "gpu"}), "t0ken", active)
    for obj in objs:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert obj["metadata"]["namespace"] == "ml"
        assert RECOMMENDED <= obj["metadata"]["labels"].keys(), obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "qwen"
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert kinds[:2] == [("ConfigMap", "qwen-config"), ("Secret", "qwen-token")]  # mounted things first
    assert (("Job", "qwen-trainer") in kinds) is active
    assert {o["spec"]["replicas"] for o in objs if o["kind"] == "Deployment"} == {1 if active else 0}


def test_pods_run_as_non_root_without_privilege_escalation():
    for obj in children(ctx(), "t", True):
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        pod = pod_spec(obj)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec(controller.deployment(ctx()))["containers"][0]["securityContext"]["readOnlyRootFilesystem"]


def test_configmap_holds_the_job_and_the_deepspeed_launch_config():
    cm = config.configmap(ctx(trainer={"replicas": 2, "gpusPerReplica": 8, "zeroStage": 3}))
    job = parse_job(yaml.safe_load(cm["data"]["job.yaml"]))  # the trainer reads exactly this
    assert job.metadata.name == "qwen" and job.spec.checkpoint.dir == "/checkpoints/qwen"
    accelerate = yaml.safe_load(cm["data"]["accelerate.yaml"])
    assert accelerate["distributed_type"] == "DEEPSPEED" and accelerate["deepspeed_config"]["zero_stage"] == 3
    assert (accelerate["num_machines"], accelerate["num_processes"]) == (2, 16)
    assert accelerate["mixed_precision"] == "bf16"


def test_token_secret_holds_the_given_token():
    secret = config.token_secret(ctx(), "s3cret")
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cret"


def test_controller_runs_the_contract_command_with_state_on_the_claim():
    c = ctx()
    deployment, service = controller.deployment(c), controller.service(c)
    container = pod_spec(deployment)["containers"][0]
    assert container["command"] == [
        "g2rpo",
        "controller",
        "--job",
        "qwen",
        "--state-dir",
        "/var/lib/g2rpo",
        "--token-file",
        "/etc/g2rpo/token/token",
        "--port",
        "8080",
        "--schedule-from",
        "/etc/g2rpo/config/job.yaml",
    ]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    state = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "state")
    assert state["persistentVolumeClaim"]["claimName"] == CLAIM
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and pod_spec(deployment)["nodeSelector"] == {}
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_rollout_serves_vllm_through_trl_with_the_spec_parallelism():
    c = ctx(rollout={"gpus": 4, "tensorParallelSize": 4, "gpuMemoryUtilization": 0.8})
    pod = pod_spec(rollout.deployment(c))
    container = pod["containers"][0]
    command = container["command"]
    assert command[:2] == ["trl", "vllm-serve"]
    args = dict(zip(command[2::2], command[3::2], strict=True))
    assert args["--model"] == "Qwen/Qwen3-1.7B-Base" and args["--tensor_parallel_size"] == "4"
    assert args["--data_parallel_size"] == "1" and args["--gpu_memory_utilization"] == "0.8"
    assert args["--max_model_len"] == str(512 + 3072 + 1024)  # prompt + guidance + completion
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["nodeSelector"] == DEFAULT_GPU_NODE_SELECTOR
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_trainer_is_an_indexed_job_with_rendezvous_env():
    c = ctx(trainer={"replicas": 4, "gpusPerReplica": 8})
    job, service = trainer.job(c), trainer.headless_service(c)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        4,
        4,
        0,
    )
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == service["metadata"]["name"] == "qwen-trainer"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    container = pod["containers"][0]
    variables = env(container)
    assert variables["MASTER_ADDR"] == "qwen-trainer-0.qwen-trainer.ml.svc"
    assert (
        variables["NODE_RANK"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert (variables["WORLD_SIZE"], variables["NNODES"]) == ("32", "4")
    assert variables["G2RPO_CONTROLLER_URL"] == "http://qwen-controller.ml.svc:8080"
    assert variables["G2RPO_CONTROLLER_TOKEN_FILE"] == "/etc/g2rpo/token/token"
    assert variables["G2RPO_ROLLOUT_URL"] == "http://qwen-rollout.ml.svc:8000"
    assert container["command"][:2] == ["accelerate", "launch"]
    assert container["command"][-3:] == ["g2rpo.train", "--job", "/etc/g2rpo/config/job.yaml"]
    assert "$(NODE_RANK)" in container["command"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    claim = next(v for v in pod["volumes"] if v["name"] == "checkpoints")
    assert claim["persistentVolumeClaim"]["claimName"] == CLAIM


def test_placement_overrides_per_job_and_per_operator():
    wide = OperatorSettings(gpu_node_selector={"pool": "h100"}, trainer_image="registry.local/trainer:1")
    pod = pod_spec(trainer.job(ctx(wide)))
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["containers"][0]["image"] == "registry.local/trainer:1"
    own = ctx(wide, trainer={"nodeSelector": {}, "tolerations": [], "image": "mine:2", "memory": "100Gi"})
    pod = pod_spec(trainer.job(own))
    assert pod["nodeSelector"] == {} and pod["tolerations"] == [] and pod["containers"][0]["image"] == "mine:2"
    assert pod["containers"][0]["resources"]["limits"]["memory"] == "100Gi"


def test_env_from_secret_reaches_trainer_and_rollout():
    c = ctx(envFromSecret="hf-token")
    for manifest in (trainer.job(c), rollout.deployment(c)):
        assert pod_spec(manifest)["containers"][0]["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert "envFrom" not in pod_spec(trainer.job(ctx()))["containers"][0]


def test_operator_settings_from_env():
    settings = OperatorSettings.from_env(
        {"G2RPO_GPU_NODE_SELECTOR": '{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}', "G2RPO_RESYNC_SECONDS": "5"}
    )
    assert (
        settings.gpu_node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        and settings.resync_seconds == 5
    )
    with pytest.raises(ValueError, match="G2RPO_GPU_TOLERATIONS"):
        OperatorSettings.from_env({"G2RPO_GPU_TOLERATIONS": '{"not": "a list"}'})


def test_gang_scheduling_with_kueue_or_volcano():
    kueue = trainer.job(ctx(runPolicy={"gangScheduler": "kueue", "queue": "team-a"}))
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and kueue["spec"]["suspend"] is True
    c = ctx(runPolicy={"gangScheduler": "volcano", "queue": "gpu"})
    volcano = trainer.job(c)
    assert volcano["spec"]["template"]["metadata"]["annotations"] == {"scheduling.k8s.io/group-name": "qwen-trainer"}
    assert pod_spec(volcano)["schedulerName"] == "volcano"
    assert trainer.volcano_pod_group(c)["spec"] == {"minMember": 2, "queue": "gpu"}
    assert any(o["kind"] == "PodGroup" for o in children(c, "t", True))


# --- validation and lifecycle decisions ----------------------------------------------------------


@pytest.mark.parametrize(
    "name, spec, field",
    [
        ("9lives", {}, "metadata.name"),
        ("x" * 53, {}, "metadata.name"),
        ("ok", {"checkpoint": {"volumeClaim": None}}, "spec.checkpoint.volumeClaim"),
        ("ok", {"checkpoint": {"dir": "/tmp/ckpt"}}, "spec.checkpoint.dir"),
        ("ok", {"rollout": {"gpus": 2, "tensorParallelSize": 4}}, "spec.rollout"),
        ("ok", {"rollout": {"gpus": 2, "dataParallelSize": 2}}, "spec.rollout.dataParallelSize"),
        ("ok", {"guidance": {"ratio": 0.05}}, "spec.guidance.ratio"),
        ("ok", {"guidance": {"schedule": "linear"}}, "spec.guidance.totalSteps"),
    ],
)
def test_validate_names_the_field(name, spec, field):
    parsed, errors = validate(name, job_manifest(**spec)["spec"])
    assert parsed is None and any(e.startswith(field + ":") for e in errors), errors


def test_spec_changes_lists_paths_and_ignores_fields_the_accepted_spec_lacks():
    accepted = config.spec_document(ctx().spec)
    edited = config.spec_document(ctx(suspend=True, model={"name": "other"}).spec)
    assert sorted(spec_changes(accepted, edited)) == ["model.name", "suspend"]
    del accepted["runPolicy"]  # as if accepted by an operator that did not know runPolicy yet
    assert spec_changes(accepted, config.spec_document(ctx(runPolicy={"backoffLimit": 9}).spec)) == []
    assert "suspend" in MUTABLE_FIELDS and "model.name" not in MUTABLE_FIELDS


def trainer_job(uid: str = "u1", active: int = 0, condition: str | None = None) -> dict:
    status: dict = {"active": active}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded", "message": "m"}]
    return {"metadata": {"name": "qwen-trainer", "uid": uid}, "status": status}


def test_progress_counts_a_failure_once_then_deletes_then_fails_past_the_budget():
    spec = ctx(runPolicy={"backoffLimit": 1}).spec
    first = progress(spec, {}, trainer_job("a", condition="Failed"), "d", NOW)
    assert (first.phase, first.restarts, first.delete_trainer, first.last_failed_trainer) == ("Running", 1, False, "a")
    prev = {"restarts": first.restarts, "lastFailedTrainer": first.last_failed_trainer}
    again = progress(spec, prev, trainer_job("a", condition="Failed"), "d", NOW)  # the same failure, next pass
    assert (again.restarts, again.delete_trainer, again.active) == (1, True, True)
    final = progress(spec, prev, trainer_job("b", condition="Failed"), "exit 137", NOW)
    assert (final.phase, final.reason, final.active, final.completion_time) == (
        "Failed",
        "TrainerFailed",
        False,
        timestamp(NOW),
    )
    assert "exit 137" in final.message


def test_progress_running_suspended_deadline_and_success():
    spec = ctx(runPolicy={"activeDeadlineSeconds": 60}).spec
    running = progress(spec, {}, trainer_job(active=2), "", NOW)
    assert (running.phase, running.start_time) == ("Running", timestamp(NOW))
    late = progress(spec, {"startTime": running.start_time}, trainer_job(active=2), "", NOW + timedelta(seconds=61))
    assert (late.phase, late.reason, late.delete_trainer) == ("Failed", "DeadlineExceeded", True)
    suspended = progress(ctx(suspend=True).spec, {"startTime": running.start_time}, trainer_job(active=2), "", NOW)
    assert (suspended.phase, suspended.active, suspended.delete_trainer, suspended.start_time) == (
        "Suspended",
        False,
        True,
        None,
    )
    done = progress(spec, {}, trainer_job(condition="Complete"), "", NOW)
    assert (done.phase, done.active, done.delete_trainer) == ("Succeeded", False, False)
    prev = {
        "phase": "Succeeded",
        "completionTime": done.completion_time,
        "conditions": [{"type": "Complete", "reason": "TrainerSucceeded", "message": "ok"}],
    }
    assert progress(spec, prev, None, "", NOW).phase == "Succeeded"  # finished jobs never restart
