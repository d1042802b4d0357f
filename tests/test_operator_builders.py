"""The operator's pure parts: child manifests from a spec, validation, and the lifecycle decisions.

No cluster and no fakes: these are functions of their arguments. Every manifest is also checked
against Kubernetes' own schemas with kubernetes-validate --strict (unknown fields fail).
"""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import kubernetes_validate
import pytest
import yaml

from g2rpo.api.names import CHECKPOINT_CREDENTIALS_DIR
from g2rpo.api.spec import (
    EXIT_CHECKPOINTS_NOT_WRITABLE,
    EXIT_DRIVER_TOO_OLD,
    EXIT_INVALID_SPEC,
    FAILURE_REASONS,
    MUTABLE_FIELDS,
    parse_job,
    parse_spec,
)
from g2rpo.api.status import timestamp
from g2rpo_operator.admission import spec_changes, validate
from g2rpo_operator.builders import (
    JobContext,
    child_keys,
    children,
    config,
    controller,
    gang,
    network,
    rollout,
    trainer,
)
from g2rpo_operator.builders.common import GPU_NODE_LABELS
from g2rpo_operator.builders.storage import checkpoint_claim
from g2rpo_operator.conditions import Facts, claim_problems, creating, job_status, mount_problems, pod_problems
from g2rpo_operator.kueue import Placement, admission_of, assigned_flavors, placements, pods_ready, release_quota
from g2rpo_operator.lifecycle import deployment_available, progress
from g2rpo_operator.settings import DEFAULT_GPU_PRODUCTS, OperatorSettings

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


KUEUE_SPEC_FIELDS = {
    "v1beta1": {"queueName", "podSets", "priorityClassName", "priorityClassSource", "priority", "active"},
    "v1beta2": {"queueName", "podSets", "priorityClassRef", "priority", "active"},
}


def validate_kueue_workload(workload: dict) -> None:
    """Kueue's Workload has no schema in kubernetes-validate (Kueue's CRD is not available offline): its
    pod templates are checked as core PodTemplates, the rest against the rules of Kueue's v1beta1 and
    v1beta2 CRDs (spec fields, the CEL rule that a priority class comes with its value, the priority
    class reference's group and kind, the pod-set name pattern, at most 8 pod sets, only
    labels/annotations in a template's metadata), written out here."""
    group, version = workload["apiVersion"].split("/")
    assert group == "kueue.x-k8s.io" and version in KUEUE_SPEC_FIELDS and workload["kind"] == "Workload"
    spec = workload["spec"]
    assert set(spec) <= KUEUE_SPEC_FIELDS[version]
    if "priorityClassName" in spec or "priorityClassRef" in spec:
        assert isinstance(spec.get("priority"), int), "priority should not be nil when a priority class is set"
    if "priorityClassRef" in spec:
        ref = spec["priorityClassRef"]
        assert (ref["group"], ref["kind"]) in {
            ("scheduling.k8s.io", "PriorityClass"),
            ("kueue.x-k8s.io", "WorkloadPriorityClass"),
        }
    assert 1 <= len(spec["podSets"]) <= 8
    for pod_set in spec["podSets"]:
        assert set(pod_set) == {"name", "count", "template"}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", pod_set["name"]) and pod_set["count"] >= 1
        assert set(pod_set["template"]["metadata"]) <= {"labels", "annotations"}
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, **pod_set}
        del template["name"], template["count"]
        kubernetes_validate.validate(template, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("active", [True, False])
def test_every_child_is_schema_valid_labelled_and_namespaced(active):
    objs = children(ctx(runPolicy={"gangScheduler": "kueue", "queue": "gpu"}), "t0ken", active)
    objs.append(checkpoint_claim(ctx(checkpoint={"volumeSize": "1Ti", "storageClassName": "efs-sc"})))
    for obj in objs:
        if obj["kind"] == "Workload":
            validate_kueue_workload(obj)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["labels"].keys() >= RECOMMENDED, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "qwen"
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert kinds[:2] == [("ConfigMap", "qwen-config"), ("Secret", "qwen-token")]  # mounted things first
    assert (("Job", "qwen-trainer") in kinds) is active
    assert (("Workload", "qwen-gang") in kinds) is active  # a suspended job's quota goes back to Kueue
    # Under Kueue the rollout exists only while admitted (as the trainer), so never at zero replicas.
    assert [o["spec"]["replicas"] for o in objs if o["kind"] == "Deployment"] == [1, 1] if active else [0]


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"suspend": True},
        {"runPolicy": {"gangScheduler": "volcano", "queue": "q"}, "trainer": {"replicas": 1}},
        {"runPolicy": {"gangScheduler": "kueue", "queue": "team-a", "priorityClassName": "research"}},
        {"rewards": [{"name": "code"}], "dataset": {"testsColumn": "test"}, "envFromSecret": "hf"},
    ],
    ids=["default", "suspended", "volcano", "kueue", "code-reward"],
)
@pytest.mark.parametrize("active", [True, False])
@pytest.mark.parametrize("with_trainer", [True, False])
@pytest.mark.parametrize("admission", ["anywhere", "queued", "placed"])
def test_child_keys_name_exactly_the_children_rendered_for_the_same_arguments(spec, active, with_trainer, admission):
    """The reconciler reads the children back by these keys, without rendering them (a token included)."""
    admitted = {
        "anywhere": {},
        "queued": None,
        "placed": {"rollout": Placement(node_selector={"pool": "a"}), "trainer": Placement(labels={"team": "a"})},
    }[admission]
    context = ctx(**spec)
    for gang_epoch in (0, 3):
        rendered = children(context, "t0ken", active, gang_epoch, with_trainer, admitted)
        assert child_keys(context, active, with_trainer, admitted) == [
            (o["kind"], o["metadata"]["name"]) for o in rendered
        ]


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
    assert pod["nodeSelector"] == {}  # the GPU affinity, not one exact label, places GPU pods by default
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [{"key": key, "operator": "In", "values": list(DEFAULT_GPU_PRODUCTS)}]}
        for key in GPU_NODE_LABELS
    ]  # tests/test_placement.py: which nodes these admit and refuse
    assert {"NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-80GB-PCIe", "NVIDIA-A100-PCIE-40GB"} < set(DEFAULT_GPU_PRODUCTS)
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


def test_the_operator_reads_the_controller_where_the_trainer_reports(monkeypatch):
    """Without a URL template the operator asks the job's controller Service, the URL the trainer gets;
    with one (tests, out-of-cluster runs) the template decides."""
    import g2rpo_operator.reconcile as reconcile_module
    from g2rpo_operator.kube import DEPLOYMENTS
    from g2rpo_operator.reconcile import Reconciler

    asked: list[str] = []
    monkeypatch.setattr(reconcile_module, "read_controller", lambda url, token, timeout: asked.append(url))
    c = ctx()
    available = {"metadata": {"generation": 1}, "spec": {"replicas": 1}}
    available["status"] = {"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1, "replicas": 1}
    observed = {(DEPLOYMENTS.kind, "qwen-controller"): available}
    for template in (None, "http://127.0.0.1:9/{namespace}/{name}"):
        Reconciler(None, OperatorSettings(controller_url_template=template))._read_controller(c, observed, "t")  # type: ignore[arg-type]
    assert asked == [
        env(trainer.job(c)["spec"]["template"]["spec"]["containers"][0])["G2RPO_CONTROLLER_URL"],
        "http://127.0.0.1:9/ml/qwen",
    ]


def test_placement_overrides_per_job_and_per_operator():
    wide = OperatorSettings(
        gpu_node_selector={"pool": "h100"},
        gpu_products=("NVIDIA-H100-80GB-HBM3",),
        trainer_image="registry.local/trainer:1",
    )
    pod = pod_spec(trainer.job(ctx(wide)))
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["containers"][0]["image"] == "registry.local/trainer:1"
    expression = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][
        0
    ]
    assert expression["matchExpressions"][0]["values"] == ["NVIDIA-H100-80GB-HBM3"]
    own = ctx(
        wide,
        trainer={"nodeSelector": {}, "tolerations": [], "gpuProducts": [], "image": "mine:2", "memory": "100Gi"},
    )
    pod = pod_spec(trainer.job(own))
    assert pod["nodeSelector"] == {} and pod["tolerations"] == [] and pod["containers"][0]["image"] == "mine:2"
    assert "affinity" not in pod  # no GPU feature discovery: no product constraint at all
    assert pod["containers"][0]["resources"]["limits"]["memory"] == "100Gi"
    assert "affinity" not in pod_spec(rollout.deployment(ctx(OperatorSettings(gpu_products=()))))


def test_nccl_env_and_rdma_resources_per_job():
    c = ctx(
        trainer={
            "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}, {"name": "NCCL_DEBUG", "value": "INFO"}],
            "extraResources": {"rdma/hca_shared_devices_a": "1"},
        },
        rollout={"env": [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}]},
    )
    container = pod_spec(trainer.job(c))["containers"][0]
    assert env(container)["NCCL_IB_HCA"] == "mlx5" and container["env"][-1] == {"name": "NCCL_DEBUG", "value": "INFO"}
    resources = container["resources"]
    assert resources["limits"]["rdma/hca_shared_devices_a"] == resources["requests"]["rdma/hca_shared_devices_a"] == "1"
    assert env(pod_spec(rollout.deployment(c))["containers"][0])["NCCL_SOCKET_IFNAME"] == "eth0"
    with pytest.raises(Exception, match="NCCL_DEBUG more than once"):
        ctx(trainer={"env": [{"name": "NCCL_DEBUG", "value": "1"}, {"name": "NCCL_DEBUG", "value": "2"}]})


def test_volumes_are_bounded_and_the_claim_keeps_its_ownership_cheap():
    c = ctx()
    for manifest in (trainer.job(c), rollout.deployment(c), controller.deployment(c)):
        pod = pod_spec(manifest)
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        for volume in pod["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"]["sizeLimit"], (manifest["metadata"]["name"], volume)
    assert pod_spec(controller.deployment(c))["containers"][0]["resources"]["requests"]["ephemeral-storage"]
    cache = next(v for v in pod_spec(trainer.job(c))["volumes"] if v["name"] == "cache")
    assert cache["emptyDir"]["sizeLimit"] == OperatorSettings().gpu_cache_size


def test_trainer_failure_policy_ignores_disruptions_and_fails_fast_on_what_no_retry_fixes():
    job = trainer.job(ctx())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    fail_job = {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2, 3, 4, 5]}}
    assert rules[1] == fail_job
    assert {EXIT_INVALID_SPEC, EXIT_DRIVER_TOO_OLD, EXIT_CHECKPOINTS_NOT_WRITABLE} <= set(
        fail_job["onExitCodes"]["values"]
    )
    assert set(fail_job["onExitCodes"]["values"]) == set(FAILURE_REASONS)  # every code the trainer gives up with
    pod = pod_spec(job)
    assert pod["restartPolicy"] == "Never"  # the API server refuses a podFailurePolicy otherwise
    check = pod["initContainers"][0]
    assert check["command"] == ["python", "-m", "g2rpo.train", "--job", "/etc/g2rpo/config/job.yaml", "--check"]
    assert env(check)["WORLD_SIZE"] == "16"
    assert "activeDeadlineSeconds" not in job["spec"]  # the operator counts the deadline from Running


def test_check_spec_mounts_the_claim_where_the_trainer_writes_its_checkpoints():
    """The writable check runs in check-spec (its exit code reaches the podFailurePolicy; a rank's does not,
    accelerate launch exits 1): it must see the claim at the trainer's mount, and the job file's
    checkpoint.dir (what it creates) lies under that mount."""
    c = ctx()
    pod = pod_spec(trainer.job(c))
    claim_volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim"))
    trainer_mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim_volume["name"])
    check_mount = next(m for m in pod["initContainers"][0]["volumeMounts"] if m["name"] == claim_volume["name"])
    assert check_mount == trainer_mount and not check_mount.get("readOnly")
    job_file = yaml.safe_load(config.configmap(c)["data"]["job.yaml"])
    assert job_file["spec"]["checkpoint"]["dir"] == f"{trainer_mount['mountPath']}/qwen"


def test_the_rollout_checks_the_driver_first_when_it_runs_the_trainer_image():
    """The rollout is the gang's first GPU pod; its init container runs the driver check of the image it
    shares with the trainer (a module that must exist and pass where there is no driver), without a GPU."""
    import subprocess
    import sys

    pod = pod_spec(rollout.deployment(ctx()))
    check = pod["initContainers"][0]
    assert check["name"] == "check-driver" and check["image"] == pod["containers"][0]["image"]
    assert env(check)["NVIDIA_VISIBLE_DEVICES"] == "void" and "nvidia.com/gpu" not in check["resources"]["limits"]
    assert check["command"][:2] == ["python", "-m"]
    ran = subprocess.run([sys.executable, *check["command"][1:]], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr  # no NVIDIA driver here: nothing to refuse
    custom = pod_spec(rollout.deployment(ctx(rollout={"image": "vllm/vllm-openai:v0.31.0"})))
    assert "initContainers" not in custom  # another image brings its own CUDA


def test_rollout_startup_probe_and_trainer_wait_come_from_one_field():
    c = ctx(rollout={"startupTimeoutSeconds": 905})
    probe = pod_spec(rollout.deployment(c))["containers"][0]["startupProbe"]
    assert (
        probe["periodSeconds"] * probe["failureThreshold"]
        >= 905
        > probe["periodSeconds"] * (probe["failureThreshold"] - 1)
    )
    default = pod_spec(rollout.deployment(ctx()))["containers"][0]["startupProbe"]
    assert default["periodSeconds"] * default["failureThreshold"] == 1200


def test_only_the_controller_service_carries_scrape_annotations():
    c = ctx()
    assert controller.service(c)["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    template = controller.deployment(c)["spec"]["template"]["metadata"]
    assert not any(key.startswith("prometheus.io/") for key in template.get("annotations") or {})
    assert template["labels"]["app.kubernetes.io/component"] == "controller"


def _peers(policy: dict) -> list[list[dict]]:
    return [rule["from"] for rule in policy["spec"]["ingress"]]


def test_network_policies_admit_only_the_job_the_operator_and_monitoring():
    settings = OperatorSettings(
        operator_namespace="ops", monitoring_namespace="prom", operator_pod_labels={"app": "op"}
    )
    by_name = {p["metadata"]["name"]: p for p in network.policies(ctx(settings))}
    assert set(by_name) == {"qwen-controller", "qwen-rollout", "qwen-trainer"}
    for policy in by_name.values():
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    job_pods = {"app.kubernetes.io/name": "g2rpo", "app.kubernetes.io/instance": "qwen"}
    trainers = {**job_pods, "app.kubernetes.io/component": "trainer"}
    rollouts = {**job_pods, "app.kubernetes.io/component": "rollout"}
    rollout_policy = by_name["qwen-rollout"]
    assert rollout_policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "rollout"
    assert _peers(rollout_policy) == [[{"podSelector": {"matchLabels": trainers}}]]  # nobody else reaches vLLM
    assert _peers(by_name["qwen-trainer"]) == [
        [{"podSelector": {"matchLabels": trainers}}, {"podSelector": {"matchLabels": rollouts}}]
    ]
    api, metrics = by_name["qwen-controller"]["spec"]["ingress"]
    assert api["ports"] == metrics["ports"] == [{"protocol": "TCP", "port": 8080}]
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
        "podSelector": {"matchLabels": {"app": "op"}},
    }
    assert api["from"] == [{"podSelector": {"matchLabels": job_pods}}, operator]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prom"}}}]


def test_env_from_secret_reaches_trainer_and_rollout():
    c = ctx(envFromSecret="hf-token")
    for manifest in (trainer.job(c), rollout.deployment(c)):
        assert pod_spec(manifest)["containers"][0]["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert "envFrom" not in pod_spec(trainer.job(ctx()))["containers"][0]


def test_checkpoint_credentials_reach_the_trainer_only_as_env_and_a_read_only_mount():
    """checkpoint.credentialsSecret: its keys become the trainer's env (botocore reads AWS_* from there) after
    spec.envFromSecret's, and the Secret is mounted for key files; the rollout never sees them."""
    c = ctx(envFromSecret="hf-token", checkpoint={"uri": "s3://ckpts/qwen", "credentialsSecret": "s3-keys"})
    job = trainer.job(c)
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    pod = pod_spec(job)
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}, {"secretRef": {"name": "s3-keys"}}]
    assert {"name": "checkpoint-credentials", "mountPath": CHECKPOINT_CREDENTIALS_DIR, "readOnly": True} in container[
        "volumeMounts"
    ]
    assert {"name": "checkpoint-credentials", "secret": {"secretName": "s3-keys", "defaultMode": 0o440}} in pod[
        "volumes"
    ]
    rollout_container = pod_spec(rollout.deployment(c))["containers"][0]
    assert rollout_container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    plain = pod_spec(trainer.job(ctx(checkpoint={"uri": "s3://ckpts/qwen"})))
    assert "envFrom" not in plain["containers"][0] and all(
        v["name"] != "checkpoint-credentials" for v in plain["volumes"]
    )


def test_operator_settings_from_env():
    settings = OperatorSettings.from_env(
        {
            "G2RPO_GPU_NODE_SELECTOR": '{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}',
            "G2RPO_GPU_PRODUCTS": "[]",
            "G2RPO_RESYNC_SECONDS": "5",
            "G2RPO_KUEUE_QUEUE": "team-a",
            "G2RPO_STORAGE_CLASS_NAME": "efs-sc",
            "G2RPO_MONITORING_NAMESPACE": "observability",
        }
    )
    assert (
        settings.gpu_node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        and settings.resync_seconds == 5
        and settings.gpu_products == ()
    )
    assert (settings.kueue_queue, settings.storage_class_name, settings.monitoring_namespace) == (
        "team-a",
        "efs-sc",
        "observability",
    )
    with pytest.raises(ValueError, match="G2RPO_GPU_TOLERATIONS"):
        OperatorSettings.from_env({"G2RPO_GPU_TOLERATIONS": '{"not": "a list"}'})


@pytest.mark.parametrize("version", ["v1beta2", "v1beta1"])
def test_kueue_admits_the_rollout_and_the_trainer_as_one_workload(version):
    kueue = replace(
        ctx(
            OperatorSettings(kueue_api_version=version),
            runPolicy={"gangScheduler": "kueue", "queue": "team-a", "priorityClassName": "research"},
        ),
        workload_priority=1000,
    )
    objs = {o["kind"]: o for o in children(kueue, "t", True)}
    workload = objs["Workload"]
    validate_kueue_workload(workload)
    assert workload["apiVersion"] == f"kueue.x-k8s.io/{version}" and workload["spec"]["queueName"] == "team-a"
    # The priority class with its value, in each version's own fields.
    assert workload["spec"]["priority"] == 1000
    if version == "v1beta1":
        assert workload["spec"]["priorityClassName"] == "research"
        assert workload["spec"]["priorityClassSource"] == "scheduling.k8s.io/priorityclass"
    else:
        assert workload["spec"]["priorityClassRef"] == {
            "group": "scheduling.k8s.io",
            "kind": "PriorityClass",
            "name": "research",
        }
    unread = gang.kueue_workload(replace(kueue, workload_priority=None), rollout.deployment(kueue), trainer.job(kueue))
    assert KUEUE_SPEC_FIELDS[version] & set(unread["spec"]) == {"queueName", "podSets"}  # render: not read
    pod_sets = {p["name"]: p for p in workload["spec"]["podSets"]}
    assert {name: p["count"] for name, p in pod_sets.items()} == {"rollout": 1, "trainer": 2}
    # Kueue sums the pod sets' requests: they are the children's own pod specs.
    assert pod_sets["trainer"]["template"]["spec"] == pod_spec(trainer.job(kueue))
    assert pod_sets["rollout"]["template"]["spec"] == pod_spec(rollout.deployment(kueue))
    assert pod_sets["trainer"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    # The children leave admission to the Workload: no queue label, no suspended Job of their own.
    for child in (objs["Job"], rollout.deployment(kueue)):
        assert "kueue.x-k8s.io/queue-name" not in child["metadata"]["labels"]
    assert "suspend" not in objs["Job"]["spec"]
    kinds = [o["kind"] for o in children(kueue, "t", True)]
    assert kinds.index("Workload") < kinds.index("Deployment")
    by_default = ctx(OperatorSettings(kueue_queue="shared"), runPolicy={"gangScheduler": "kueue"})
    assert (
        gang.kueue_workload(by_default, rollout.deployment(by_default), trainer.job(by_default))["spec"]["queueName"]
        == "shared"
    )


def test_kueue_placement_reaches_the_pod_templates_only_once_admitted():
    kueue = ctx(runPolicy={"gangScheduler": "kueue", "queue": "team-a"})
    queued = {(o["kind"], o["metadata"]["name"]) for o in children(kueue, "t", True, admitted=None)}
    assert ("Workload", "qwen-gang") in queued
    assert ("Job", "qwen-trainer") not in queued and ("Deployment", "qwen-rollout") not in queued
    assert ("Deployment", "qwen-controller") in queued  # status and metrics work while queued
    spot = {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}
    admitted = {
        "trainer": Placement(node_selector={"pool": "a100-spot"}, tolerations=[spot], labels={"team": "a"}),
        "rollout": Placement(node_selector={"pool": "a100-on-demand"}),
    }
    objs = {o["metadata"]["name"]: o for o in children(kueue, "t", True, admitted=admitted)}
    job_pod, rollout_pod = pod_spec(objs["qwen-trainer"]), pod_spec(objs["qwen-rollout"])
    assert job_pod["nodeSelector"]["pool"] == "a100-spot" and spot in job_pod["tolerations"]
    assert objs["qwen-trainer"]["spec"]["template"]["metadata"]["labels"]["team"] == "a"
    assert rollout_pod["nodeSelector"]["pool"] == "a100-on-demand" and spot not in rollout_pod["tolerations"]
    # The default GPU tolerations stay; Kueue's are added.
    assert [t for t in job_pod["tolerations"] if t != spot] == pod_spec(trainer.job(kueue))["tolerations"]


def test_kueue_workload_states_and_the_quota_handed_back():
    def workload(*conditions: tuple[str, str, str], admission: dict | None = None) -> dict:
        status: dict = {"conditions": [{"type": t, "status": s, "message": m} for t, s, m in conditions]}
        if admission:
            status["admission"] = admission
        return {"metadata": {"name": "qwen-gang"}, "status": status}

    assignment = {
        "clusterQueue": "cq",
        "podSetAssignments": [
            {"name": "trainer", "flavors": {"nvidia.com/gpu": "a100-spot", "cpu": "default"}, "count": 2},
            {"name": "rollout", "flavors": {"nvidia.com/gpu": "a100-spot"}, "count": 1},
        ],
    }
    queued = admission_of(workload(("QuotaReserved", "False", "insufficient quota for nvidia.com/gpu")), "team-a")
    assert not queued.admitted and queued.evicted is None
    assert (
        queued.waiting
        == "Kueue Workload qwen-gang is queued in LocalQueue 'team-a': insufficient quota for nvidia.com/gpu"
    )
    checking = admission_of(workload(("QuotaReserved", "True", ""), admission=assignment), "team-a")
    assert not checking.admitted and "waiting for its admission checks" in checking.waiting
    admitted_wl = workload(("QuotaReserved", "True", ""), ("Admitted", "True", ""), admission=assignment)
    assert admission_of(admitted_wl, "team-a").admitted
    assert assigned_flavors(admitted_wl) == {"a100-spot", "default"}
    flavors = {
        "a100-spot": {"spec": {"nodeLabels": {"pool": "spot"}, "tolerations": [{"key": "spot", "operator": "Exists"}]}},
        "default": {"spec": {}},
    }
    placed = placements(admitted_wl, flavors)
    assert placed["trainer"].node_selector == {"pool": "spot"} and placed["rollout"].tolerations == [
        {"key": "spot", "operator": "Exists"}
    ]
    evicted_wl = workload(
        ("QuotaReserved", "True", ""),
        ("Admitted", "True", ""),
        ("Evicted", "True", "Preempted by a higher priority"),
        admission=assignment,
    )
    evicted = admission_of(evicted_wl, "team-a")
    assert not evicted.admitted and evicted.evicted == "Preempted by a higher priority"
    released = release_quota(evicted_wl, "evicted", NOW)["status"]
    assert released["admission"] is None
    states = {c["type"]: (c["status"], c.get("reason")) for c in released["conditions"]}
    assert states == {
        "QuotaReserved": ("False", "Pending"),
        "Admitted": ("False", "NoReservation"),
        "Evicted": ("True", None),
        "Requeued": ("False", "evicted"),  # not Preempted (no reason here): Kueue's backoff requeues it
    }
    # PodsReady follows the gang (Kueue's waitForPodsReady); no write when it already says so.
    starting = pods_ready(admitted_wl, False, NOW)["status"]["conditions"]
    assert [c["status"] for c in starting if c["type"] == "PodsReady"] == ["False"] and len(starting) == 3
    ready_wl = {**admitted_wl, "status": {**admitted_wl["status"], "conditions": starting}}
    assert pods_ready(ready_wl, False, NOW) is None
    running = pods_ready(ready_wl, True, NOW)["status"]["conditions"]
    assert {c["type"]: c["status"] for c in running} == {
        "QuotaReserved": "True",
        "Admitted": "True",
        "PodsReady": "True",
    }


def test_gang_scheduling_with_volcano():
    c = ctx(runPolicy={"gangScheduler": "volcano", "queue": "gpu"})  # 2 trainer pods + the rollout pod
    group = {"scheduling.k8s.io/group-name": "qwen-gang"}
    volcano = trainer.job(c)
    assert volcano["spec"]["template"]["metadata"]["annotations"] == group
    assert pod_spec(volcano)["schedulerName"] == "volcano"
    served = rollout.deployment(c)
    assert group.items() <= served["spec"]["template"]["metadata"]["annotations"].items()
    assert pod_spec(served)["schedulerName"] == "volcano"
    assert gang.volcano_pod_group(c)["spec"] == {"minMember": 3, "queue": "gpu"}
    kinds = [o["kind"] for o in children(c, "t", True)]
    assert kinds.index("PodGroup") < kinds.index("Deployment")  # the gang exists before its first pod


def test_kueue_needs_a_queue_and_the_operators_integration():
    raw = job_manifest(runPolicy={"gangScheduler": "kueue"})["spec"]
    assert any(
        e.startswith("spec.runPolicy.queue:") for e in validate("ok", raw, OperatorSettings(kueue_enabled=True))[1]
    )
    assert validate("ok", raw, OperatorSettings(kueue_queue="shared", kueue_enabled=True))[1] == []
    (refused,) = validate("ok", raw, OperatorSettings(kueue_queue="shared"))[1]
    assert refused.startswith("spec.runPolicy.gangScheduler: kueue needs the operator's Kueue integration")


def test_rollout_availability_means_this_gang_epoch_rolled_out():
    deployment = rollout.deployment(ctx(), gang_epoch=1)
    deployment["metadata"]["generation"] = 2
    deployment["status"] = {"observedGeneration": 2, "updatedReplicas": 1, "availableReplicas": 1}
    assert deployment_available(deployment, 1) and not deployment_available(deployment, 2)
    deployment["status"]["observedGeneration"] = 1  # the controller has not seen the new template yet
    assert not deployment_available(deployment, 1)


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
        ("ok", {"training": {"numGenerations": 7}}, "spec.training.perDeviceBatchSize"),
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


def trainer_job(uid: str = "u1", ready: int = 0, condition: str | None = None) -> dict:
    status: dict = {"active": 2, "ready": ready}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded", "message": "m"}]
    return {"metadata": {"name": "qwen-trainer", "uid": uid}, "status": status}


def failed_pod(uid: str, exit_code: int = 137, disrupted: bool = False) -> dict:
    status: dict = {
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}],
    }
    if disrupted:
        status["conditions"] = [
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": "preempted"}
        ]
    return {
        "metadata": {"name": "qwen-trainer-0-x", "ownerReferences": [{"uid": uid, "controller": True}]},
        "status": status,
    }


def test_progress_counts_a_failure_once_then_deletes_then_fails_past_the_budget():
    spec = ctx(runPolicy={"backoffLimit": 1}).spec
    first = progress(spec, {}, trainer_job("a", condition="Failed"), [failed_pod("a")], NOW)
    assert (first.phase, first.restarts, first.delete_trainer, first.last_failed_trainer) == ("Pending", 1, False, "a")
    assert first.gang_epoch == 1  # the rollout pod is replaced with the trainer
    prev = {"restarts": first.restarts, "lastFailedTrainer": first.last_failed_trainer}
    again = progress(spec, prev, trainer_job("a", condition="Failed"), [], NOW)  # the same failure, next pass
    assert (again.restarts, again.delete_trainer, again.active) == (1, True, True)
    final = progress(spec, prev, trainer_job("b", condition="Failed"), [failed_pod("b", 137)], NOW)
    assert (final.phase, final.reason, final.active, final.completion_time) == (
        "Failed",
        "TrainerFailed",
        False,
        timestamp(NOW),
    )
    assert "exited with code 137" in final.message


def test_disruptions_restart_the_gang_without_spending_the_budget():
    spec = ctx(runPolicy={"backoffLimit": 0}).spec
    evicted = progress(spec, {}, trainer_job("a", ready=1), [failed_pod("a", disrupted=True)], NOW)
    assert (evicted.restarts, evicted.disruptions, evicted.reason, evicted.active) == (0, 1, "Restarting", True)
    assert "PreemptionByScheduler" in evicted.message and evicted.gang_epoch == 1
    prev = {"disruptions": 1, "lastFailedTrainer": "a"}
    removed = progress(spec, prev, trainer_job("a", ready=1), [failed_pod("a", disrupted=True)], NOW)
    assert (removed.disruptions, removed.delete_trainer) == (1, True)
    # Even a Job that failed (a rank hung after its peer was evicted) is free when a pod was disrupted.
    failed = progress(spec, {}, trainer_job("c", condition="Failed"), [failed_pod("c", disrupted=True)], NOW)
    assert (failed.phase, failed.restarts, failed.disruptions) == ("Pending", 0, 1)


def test_configuration_errors_fail_at_once():
    spec = ctx(runPolicy={"backoffLimit": 5}).spec
    bad = progress(spec, {}, trainer_job("a", condition="Failed"), [failed_pod("a", EXIT_INVALID_SPEC)], NOW)
    assert (bad.phase, bad.reason, bad.restarts, bad.active) == ("Failed", "InvalidConfiguration", 0, False)


def test_progress_running_needs_ready_pods_and_the_deadline_counts_from_running():
    spec = ctx(runPolicy={"activeDeadlineSeconds": 60}).spec
    scheduled = progress(spec, {}, trainer_job(ready=1), [], NOW)  # 2 pods active, only one ready
    assert (scheduled.phase, scheduled.start_time) == ("Pending", None)
    queued = progress(spec, {}, trainer_job(ready=0), [], NOW + timedelta(days=3))  # queueing is not counted
    assert queued.phase == "Pending"
    running = progress(spec, {}, trainer_job(ready=2), [], NOW)
    assert (running.phase, running.start_time) == ("Running", timestamp(NOW))
    late = progress(spec, {"startTime": running.start_time}, trainer_job(ready=2), [], NOW + timedelta(seconds=61))
    assert (late.phase, late.reason, late.delete_trainer) == ("Failed", "DeadlineExceeded", True)
    suspended = progress(ctx(suspend=True).spec, {"startTime": running.start_time}, trainer_job(ready=2), [], NOW)
    assert (suspended.phase, suspended.active, suspended.delete_trainer, suspended.start_time) == (
        "Suspended",
        False,
        True,
        None,
    )
    done = progress(spec, {}, trainer_job(condition="Complete"), [], NOW)
    assert (done.phase, done.active, done.delete_trainer) == ("Succeeded", False, False)
    prev = {
        "phase": "Succeeded",
        "completionTime": done.completion_time,
        "conditions": [{"type": "Complete", "reason": "TrainerSucceeded", "message": "ok"}],
    }
    assert progress(spec, prev, None, [], NOW).phase == "Succeeded"  # finished jobs never restart


def test_pending_reasons_name_the_pod_and_the_cause():
    unschedulable = {
        "metadata": {"name": "qwen-rollout-abc"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }
    pulling = {
        "metadata": {"name": "qwen-trainer-0-x"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}
            ],
        },
    }
    leaving = {**pulling, "metadata": {"name": "old", "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert pod_problems([unschedulable, pulling, leaving]) == [
        ("Unschedulable", "pod qwen-rollout-abc: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."),
        ("ImagePullBackOff", "pod qwen-trainer-0-x: container trainer: ImagePullBackOff: not found"),
    ]


def test_claim_must_be_bound_and_shared_by_every_pod_that_mounts_it():
    """Even a one-node trainer needs ReadWriteMany: the controller pod mounts the claim from another node."""
    rwo = {"spec": {"accessModes": ["ReadWriteOnce"]}, "status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"]}}
    reason, message = claim_problems(rwo, "ckpt", replicas=2)
    assert reason == "ClaimNotShared" and "'ckpt'" in message and "ReadWriteOnce" in message
    reason, message = claim_problems(rwo, "ckpt", replicas=1)
    assert reason == "ClaimNotShared" and "controller pod" in message and "Multi-Attach" in message
    rwop = {"spec": {"accessModes": ["ReadWriteOncePod"]}, "status": {"phase": "Pending"}}
    assert claim_problems(rwop, "ckpt", replicas=1)[0] == "ClaimNotShared"
    rwx = {"spec": {"accessModes": ["ReadWriteMany"]}, "status": {"phase": "Bound", "accessModes": ["ReadWriteMany"]}}
    assert claim_problems(rwx, "ckpt", replicas=1) is None
    c = ctx()
    mounted_by = {
        manifest["metadata"]["name"]: pod_spec(manifest)
        for manifest in children(c, "t", active=True)
        if manifest["kind"] in ("Deployment", "Job")
        if any(v.get("persistentVolumeClaim") for v in pod_spec(manifest)["volumes"])
    }
    assert set(mounted_by) == {"qwen-controller", "qwen-trainer"}
    gpus = {
        name: [c["resources"]["limits"].get("nvidia.com/gpu") for c in pod["containers"]]
        for name, pod in mounted_by.items()
    }
    assert gpus == {"qwen-controller": [None], "qwen-trainer": [8]}  # a CPU pod and a GPU pod: other nodes
    pending = {"spec": {"accessModes": ["ReadWriteMany"]}, "status": {"phase": "Pending"}}
    reason, message = claim_problems(pending, "ckpt", replicas=2)
    assert reason == "ClaimNotBound" and "Pending" in message
    created = checkpoint_claim(ctx(OperatorSettings(storage_class_name="efs-sc"), checkpoint={"volumeSize": "1Ti"}))
    assert created["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "1Ti"}},
        "storageClassName": "efs-sc",
    }
    assert "ownerReferences" not in created["metadata"]  # checkpoints outlive the job
    own = checkpoint_claim(
        ctx(
            OperatorSettings(storage_class_name="efs-sc"),
            checkpoint={"volumeSize": "1Ti", "storageClassName": "azurefile-csi"},
        )
    )
    assert own["spec"]["storageClassName"] == "azurefile-csi"


@pytest.mark.slow  # imports torch and TRL and builds a real trainer (tiny model)
def test_the_trainer_waits_for_vllm_as_long_as_the_rollout_may_start(tiny_model_dir, tmp_path):
    """The contract between the rollout's startup probe and TRL: the trainer built from the job the operator
    mounts gets vllm_server_timeout = rollout.startupTimeoutSeconds (real GRPOConfig, tiny model)."""
    from g2rpo.controller.client import InProcessGuidanceClient
    from g2rpo.controller.core import GuidanceController
    from g2rpo.train.build import RunLayout, build_trainer

    c = ctx(
        model={"name": str(tiny_model_dir), "dtype": "float32"},
        dataset={"name": "builtin:arithmetic", "arithmetic": {"numProblems": 8}},
        training={"numGenerations": 2, "perDeviceBatchSize": 2, "maxSteps": 1, "maxCompletionLength": 8},
        guidance={"ratio": 0.5, "initialLength": 4, "minLength": 1, "maxLength": 8},
        checkpoint={"dir": str(tmp_path / "ckpt")},
        rollout={"startupTimeoutSeconds": 905},
    )
    job = parse_job(yaml.safe_load(config.configmap(c)["data"]["job.yaml"]))
    trainer = build_trainer(
        job,
        RunLayout.for_job(job, tmp_path / "run"),
        guidance_client_factory=lambda params: InProcessGuidanceClient(GuidanceController(params)),
    )
    assert trainer.args.vllm_server_timeout == 905


def _terminated(exit_code: int, message: str = "", last: bool = False) -> dict:
    ended = {"terminated": {"exitCode": exit_code, "reason": "Error", **({"message": message} if message else {})}}
    if last:  # a crash-looping container: waiting now, its exit kept in lastState
        return {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": ended}
    return {"state": ended}


def _pod(name: str, container: str, status: dict, init: bool = False) -> dict:
    key = "initContainerStatuses" if init else "containerStatuses"
    return {"metadata": {"name": name}, "status": {"phase": "Pending", key: [{"name": container, **status}]}}


DRIVER_LINE = "NVIDIA driver 535.183.01 on this node is too old for this image's CUDA 13: it needs driver R580 or newer"


def test_a_too_old_driver_in_the_rollouts_check_fails_the_job_at_once():
    """A Deployment's init container crash-loops: its exit stays in lastState, and that is enough."""
    spec = ctx().spec
    rollout_pod = _pod(
        "qwen-rollout-x", "check-driver", _terminated(3, f"DriverTooOld: {DRIVER_LINE}", last=True), init=True
    )
    p = progress(spec, {}, None, [], NOW, rollout_pods=[rollout_pod])
    assert (p.phase, p.reason, p.active) == ("Failed", "DriverTooOld", False)
    assert p.message.startswith(DRIVER_LINE) and "pod qwen-rollout-x, container check-driver, exit code 3" in p.message
    assert "not retried" in p.message and p.completion_time
    succeeded = _pod("qwen-rollout-y", "check-driver", _terminated(0), init=True)
    assert progress(spec, {}, None, [], NOW, rollout_pods=[succeeded]).phase == "Pending"


def test_storage_failures_fail_the_job_and_name_the_claim_and_its_fix():
    spec = ctx().spec
    job = {"metadata": {"uid": "u1", "name": "qwen-trainer"}, "status": {"conditions": []}}
    # check-spec's own exit code (it runs python directly) ...
    unwritable = _pod(
        "qwen-trainer-0-a", "check-spec", _terminated(4, "CheckpointsNotWritable: /checkpoints/qwen"), init=True
    )
    p = progress(spec, {}, job, [unwritable], NOW)
    assert (p.phase, p.reason) == ("Failed", "CheckpointsNotWritable")
    assert f"checkpoint claim '{CLAIM}'" in p.message and "uid 1000" in p.message and p.last_failed_trainer == "u1"
    # ... and a rank's termination message (accelerate launch turned its exit code into 1).
    line = "no room for checkpoint-3 in /checkpoints/qwen: 1 MiB free, the last checkpoint took 3 MiB; ..."
    full = _pod("qwen-trainer-0-b", "trainer", _terminated(1, f"CheckpointsFull: {line}"))
    p = progress(spec, {}, job, [full], NOW)
    assert (p.phase, p.reason) == ("Failed", "CheckpointsFull") and p.message.startswith(line)
    assert f"checkpoint claim '{CLAIM}'" in p.message and "checkpoint.keep" in p.message
    facts = Facts(
        progress=p,
        spec=spec,
        checkpoint_dir="/checkpoints/qwen",
        generation=1,
        spec_errors=[],
        refused=[],
        missing=[],
        conflicts=[],
        storage=None,
        problems=[],
        waiting_for=[],
        trainer_ready="",
        report=None,
    )
    storage = next(c for c in job_status(facts, {}, NOW).conditions if c.type == "StorageReady")
    assert (storage.status, storage.reason) == ("False", "CheckpointsFull") and CLAIM in storage.message
    # An exit 1 that names no reason is an ordinary failure: retried within backoffLimit.
    crash = _pod("qwen-trainer-0-c", "trainer", _terminated(1, "Traceback ..."))
    assert progress(spec, {}, job, [crash], NOW).phase == "Pending"


def test_a_pod_stuck_in_container_creating_shows_its_mount_event():
    pod = _pod("qwen-controller-x", "controller", {"state": {"waiting": {"reason": "ContainerCreating"}}})
    pod["metadata"]["uid"] = "p1"
    running = _pod("qwen-rollout-y", "vllm", {"state": {"running": {}}})

    def event(reason: str, message: str, at: str, name: str = "qwen-controller-x", uid: str = "p1") -> dict:
        return {
            "metadata": {"name": f"{name}.{at}"},
            "involvedObject": {"kind": "Pod", "name": name, "uid": uid},
            "reason": reason,
            "message": message,
            "lastTimestamp": at,
        }

    events = [
        event("FailedMount", "MountVolume.SetUp failed: old", "2026-01-01T00:00:01Z"),
        event(
            "FailedMount", "MountVolume.SetUp failed for volume pvc-1: mount.nfs: access denied", "2026-01-01T00:00:09Z"
        ),
        event(
            "FailedAttachVolume",
            'Multi-Attach error for volume "pvc-1" Volume is already used by pod(s) qwen-trainer-0-a',
            "2026-01-01T00:00:05Z",
        ),
        event("Scheduled", "assigned to node-1", "2026-01-01T00:00:00Z"),
        event("FailedMount", "an earlier pod of the same name", "2026-01-01T00:00:10Z", uid="p0"),
        event("FailedMount", "another pod", "2026-01-01T00:00:10Z", name="qwen-trainer-0-a"),
    ]
    assert creating(pod) and not creating(running)
    assert mount_problems(pod, events) == [
        (
            "FailedAttachVolume",
            'pod qwen-controller-x: FailedAttachVolume: Multi-Attach error for volume "pvc-1" Volume is already used '
            "by pod(s) qwen-trainer-0-a",
        ),
        (
            "FailedMount",
            "pod qwen-controller-x: FailedMount: MountVolume.SetUp failed for volume pvc-1: mount.nfs: access denied",
        ),
    ]


def test_a_job_waiting_for_its_pods_is_polled_for_their_mount_events():
    """Events are not watched and a pod stuck mounting changes nothing that is: the waiting job is polled."""
    from g2rpo_operator.handlers import needs_poll

    def status(phase: str, reason: str) -> dict:
        return {"phase": phase, "conditions": [{"type": "Ready", "status": "False", "reason": reason}]}

    for reason in ("Waiting", "WaitingForRollout", "FailedMount", "FailedAttachVolume"):
        assert needs_poll(status("Pending", reason)), reason
    for phase, reason in (("Pending", "Queued"), ("Pending", "ClaimNotShared"), ("Failed", "DriverTooOld")):
        assert not needs_poll(status(phase, reason)), reason  # watch events or nothing at all change these
