"""Stopping and hanging (issue 16, items 8 and 9): the grace period and probes the pods get, the stall
timeout on the real operator against KMock (tests/kmock_support.py: the sanctioned fake of the API server)
with the real guidance controller, and the timeouts that turn a hang inside the trainer into an error.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_operator_kmock import all_children, condition, make_available, phase_is, rollout_epoch, token, trainer_uid

from g2rpo.api.spec import parse_spec
from g2rpo.api.status import parse_timestamp
from g2rpo.controller.http_client import HttpGuidanceClient
from g2rpo.controller.service import GuidanceService, ServiceConfig, start_server
from g2rpo.guidance.schedule import ScheduleParams
from g2rpo.train.config import Generation, grpo_config_arguments
from g2rpo.train.timeouts import bound_vllm_requests, collective_timeout_seconds, vllm_read_timeout_seconds
from g2rpo_operator.builders import ADMITTED_ANYWHERE, JobContext, children
from g2rpo_operator.lifecycle import progress
from g2rpo_operator.settings import OperatorSettings

from kmock_support import BATCH_JOBS, free_port, wait_for
from operator_fixtures import NAMESPACE, job_manifest

ROOT = Path(__file__).resolve().parents[1]
SPEC = job_manifest()["spec"]


def rendered_pods(spec: dict, scheduler: str = "none") -> dict[str, dict]:
    """Every pod template the operator renders for `spec`, by component."""
    spec = {**spec, "runPolicy": {**spec.get("runPolicy", {}), "gangScheduler": scheduler}}
    ctx = JobContext.resolve("demo", NAMESPACE, parse_spec(spec), OperatorSettings(kueue_queue="q"))
    pods = {}
    for manifest in children(ctx, "t", active=True, admitted=ADMITTED_ANYWHERE):
        if manifest["kind"] in ("Deployment", "Job"):
            pods[manifest["metadata"]["labels"]["app.kubernetes.io/component"]] = manifest["spec"]["template"]["spec"]
    return pods


# --- item 8: grace period and probes, on the rendered pods ---------------------------------------------


def test_trainer_pods_get_the_grace_period_of_the_spec():
    """The save on SIGTERM needs more than the kubelet's 30 s default; the field reaches the pod template."""
    assert parse_spec(SPEC).run_policy.termination_grace_period_seconds >= 300
    assert rendered_pods(SPEC)["trainer"]["terminationGracePeriodSeconds"] == 300
    longer = {**SPEC, "runPolicy": {"terminationGracePeriodSeconds": 900}}
    for scheduler in ("none", "volcano", "kueue"):
        assert rendered_pods(longer, scheduler)["trainer"]["terminationGracePeriodSeconds"] == 900


@pytest.mark.parametrize("scheduler", ["none", "volcano", "kueue"])
def test_every_probe_tolerates_a_busy_server(scheduler):
    """The class: no probe of any rendered container keeps the kubelet's 1 s timeout, and no liveness probe
    restarts a container that answered nothing for less than 2 minutes (for vLLM that is a gang restart)."""
    probes = 0
    for component, pod in rendered_pods(SPEC, scheduler).items():
        for container in pod.get("initContainers", []) + pod["containers"]:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                probes += 1
                where = f"{component}/{container['name']} {kind}"
                assert probe.get("timeoutSeconds", 1) >= 5, where
                if kind == "livenessProbe":
                    patience = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
                    assert patience >= 120 or component != "rollout", where
    assert probes >= 5


def test_vllm_startup_probe_allows_the_startup_timeout_and_readiness_survives_a_busy_minute():
    spec = {**SPEC, "rollout": {"startupTimeoutSeconds": 1805}}
    vllm = rendered_pods(spec)["rollout"]["containers"][0]
    startup = vllm["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"  # vLLM's own route: `trl vllm-serve` 1.16 execs `vllm serve`
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1805
    readiness = vllm["readinessProbe"]  # the Service's only endpoint
    assert readiness["periodSeconds"] * readiness["failureThreshold"] >= 60


# --- item 9: stall detection, pure ---------------------------------------------------------------------

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _ready_job(uid: str = "u1") -> dict:
    return {"metadata": {"name": "demo-trainer", "uid": uid}, "status": {"ready": 2, "active": 2}}


def test_stall_counts_from_the_last_step_or_from_readiness():
    spec = parse_spec({**SPEC, "runPolicy": {"stallTimeoutSeconds": 600, "backoffLimit": 2}})
    running = {"phase": "Running", "runningSince": _stamp(T0), "startTime": _stamp(T0)}
    # No step yet: counted from readiness (model and data loading included).
    assert progress(spec, running, _ready_job(), [], T0 + timedelta(seconds=600)).phase == "Running"
    stalled = progress(spec, running, _ready_job(), [], T0 + timedelta(seconds=601))
    assert stalled.reason == "Restarting" and stalled.restarts == 1 and stalled.last_failed_trainer == "u1"
    assert "no step completed yet" in stalled.stalled and _stamp(T0) in stalled.stalled
    # A step seen at T0+500 moves the clock; the message names it and when it completed.
    stepped = {**running, "step": 7, "lastStepTime": _stamp(T0 + timedelta(seconds=500))}
    assert progress(spec, stepped, _ready_job(), [], T0 + timedelta(seconds=1100), step=7).phase == "Running"
    late = progress(spec, stepped, _ready_job(), [], T0 + timedelta(seconds=1101), step=7)
    assert "step 7, completed at 2026-12-06T12:08:20Z" in late.stalled and late.restarts == 1
    # A new step this pass is progress, whatever the clock says.
    fresh = progress(spec, stepped, _ready_job(), [], T0 + timedelta(seconds=5000), step=8)
    assert fresh.phase == "Running" and fresh.last_step_time == _stamp(T0 + timedelta(seconds=5000))
    # Counted once: the next pass removes the stalled trainer and counts nothing more.
    counted = {**running, "phase": "Pending", "restarts": 1, "lastFailedTrainer": "u1"}
    again = progress(spec, counted, _ready_job(), [], T0 + timedelta(seconds=700))
    assert again.delete_trainer and again.restarts == 1 and again.phase == "Pending"
    # Past the budget the job fails, with the reason.
    spent = {**running, "restarts": 2}
    failed = progress(spec, spent, _ready_job("u3"), [], T0 + timedelta(seconds=601))
    assert (failed.phase, failed.reason, failed.delete_trainer) == ("Failed", "Stalled", True)
    # Turned off: never stalls.
    off = parse_spec({**SPEC, "runPolicy": {"stallTimeoutSeconds": None}})
    assert progress(off, running, _ready_job(), [], T0 + timedelta(days=3)).phase == "Running"


def test_the_clock_restarts_with_each_trainer_attempt():
    """runningSince is the current attempt's: a new trainer Job after a restart gets the full timeout again."""
    spec = parse_spec({**SPEC, "runPolicy": {"stallTimeoutSeconds": 600}})
    pending = {"phase": "Pending", "runningSince": None, "startTime": _stamp(T0), "step": 7, "lastStepTime": _stamp(T0)}
    later = T0 + timedelta(hours=2)
    became = progress(spec, pending, _ready_job("u2"), [], later, step=7)
    assert became.phase == "Running" and became.running_since == _stamp(later) and became.stalled is None


# --- item 9: stall detection on KMock -------------------------------------------------------------------

SPEEDUP = 60.0
"""The operator's clock runs 60 times faster than the test's: a 60 s stall timeout takes one real second."""


def fast_clock():
    start = datetime.now(UTC)
    return lambda: start + (datetime.now(UTC) - start) * SPEEDUP


async def start_trainer_pods(cluster) -> None:
    await cluster.emulator.patch_object(
        BATCH_JOBS, NAMESPACE, "demo-trainer", {"status": {"active": 2, "ready": 2}}, status=True
    )


@pytest.mark.asyncio
async def test_a_trainer_that_stops_reporting_restarts_the_gang_then_fails(cluster, start_operator, tmp_path):
    """The real operator and the real guidance controller; the trainer is played by its HTTP client: it reports
    two steps, then hangs (reports nothing). The gang restarts once (restarts 1, the rollout pod replaced,
    Stalled naming step 2), a step after the restart clears Stalled, and the next hang past backoffLimit
    fails the job with reason Stalled."""
    port = free_port()
    await cluster.create_claim()
    running = await start_operator(controller_url_template=f"http://127.0.0.1:{port}")
    manifest = job_manifest(runPolicy={"stallTimeoutSeconds": 120, "backoffLimit": 1})
    await cluster.apply(manifest)
    await all_children(cluster)
    params = ScheduleParams.from_spec(parse_spec(manifest["spec"]).guidance)
    config = ServiceConfig(job="demo", params=params, token=token(cluster), state_dir=tmp_path)
    server = await start_server(GuidanceService(config), "127.0.0.1", port)
    try:
        running.operator.reconciler.clock = fast_clock()
        await make_available(cluster, "demo-controller", "demo-rollout")
        await start_trainer_pods(cluster)
        await wait_for(phase_is(cluster, "Running"), what="phase Running")
        first = trainer_uid(cluster)
        trainer = HttpGuidanceClient(server.url, token(cluster))
        for step in range(2):
            await asyncio.to_thread(trainer.report, step, 0.5, {"accuracy": 0.5})
            await wait_for(lambda s=step: cluster.status().get("step") == s + 1, what=f"step {step + 1} seen")
        seen = cluster.status()["lastStepTime"]
        assert condition(cluster, "Stalled")["status"] == "False"
        # The trainer hangs: no more reports. 120 s of the operator's clock pass in about 2 s.
        await wait_for(lambda: cluster.status().get("restarts") == 1, what="the stall counted", timeout=30)
        stalled = condition(cluster, "Stalled")
        assert stalled["status"] == "True" and stalled["reason"] == "NoStepCompleted", stalled
        assert f"the last, step 2, completed at {seen}" in stalled["message"]
        assert "restart 1 of 1" in stalled["message"] and cluster.status()["phase"] != "Failed"
        await wait_for(lambda: trainer_uid(cluster) is None and rollout_epoch(cluster) == "1", what="gang restarted")
        await make_available(cluster, "demo-rollout")
        await wait_for(lambda: trainer_uid(cluster) not in (None, first), what="a new trainer Job")
        await start_trainer_pods(cluster)
        await wait_for(phase_is(cluster, "Running"), what="Running again")
        assert condition(cluster, "Stalled")["status"] == "True"  # until a step completes
        assert parse_timestamp(cluster.status()["runningSince"]) > parse_timestamp(seen)
        await asyncio.to_thread(trainer.report, 2, 0.5, {"accuracy": 0.5})
        await wait_for(lambda: condition(cluster, "Stalled").get("status") == "False", what="Stalled cleared")
        # Hangs again: the budget (backoffLimit 1) is spent, the job fails saying why.
        await wait_for(phase_is(cluster, "Failed"), what="phase Failed", timeout=30)
        failed = condition(cluster, "Failed")
        assert failed["reason"] == "Stalled" and "step 3" in failed["message"], failed
        await wait_for(lambda: trainer_uid(cluster) is None, what="the hung trainer removed")
    finally:
        await server.close()


# --- item 9: the trainer's own timeouts -----------------------------------------------------------------


def test_collective_and_vllm_timeouts_follow_the_stall_timeout():
    spec = parse_spec({**SPEC, "runPolicy": {"stallTimeoutSeconds": 1200}})
    import torch

    arguments = grpo_config_arguments(
        spec, output_dir=Path("/tmp/x"), dtype=torch.float32, use_cpu=True, generation=Generation("http://r:8000")
    )
    assert arguments["ddp_timeout"] == collective_timeout_seconds(spec) == 1200
    assert vllm_read_timeout_seconds(spec, read_retries=5) == 200  # 6 attempts fit in the stall timeout
    off = parse_spec({**SPEC, "runPolicy": {"stallTimeoutSeconds": None}})
    assert collective_timeout_seconds(off) == 1800  # transformers' own default


def test_the_first_partial_state_builds_the_process_group_with_the_timeout():
    """accelerate builds the process group once, at the first PartialState, and ignores later timeouts: the
    timeout must be given there (build_trainer does). A real one-rank gloo group in a subprocess."""
    script = (
        "from datetime import timedelta\n"
        "import torch\n"
        "from accelerate import PartialState\n"
        "from torch.distributed import distributed_c10d as c10d\n"
        "PartialState(cpu=True, timeout=timedelta(seconds=1234))\n"
        "PartialState(cpu=True, timeout=timedelta(seconds=5))  # what TrainingArguments does later: ignored\n"
        "print(c10d._get_default_group()._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n"
    )
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "ACCELERATE_TORCH_DEVICE": "cpu",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "1234.0", out.stderr[-2000:]
    source = inspect.getsource(__import__("g2rpo.train.build", fromlist=["build_trainer"]).build_trainer)
    assert "PartialState(timeout=collective_timeout(spec))" in source


class _Hanging(BaseHTTPRequestHandler):
    """A vLLM server whose engine hangs: it accepts the request and never answers."""

    released = threading.Event()

    def do_POST(self):  # http.server's naming
        self.released.wait(30)

    def log_message(self, *args):  # quiet
        pass


def test_a_hung_vllm_request_raises_within_the_stall_timeout():
    """TRL's VLLMClient session as TRL 1.16 builds it (same Retry policy, read=5), bounded by
    bound_vllm_requests: a request to a server that never answers raises instead of hanging."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(
        total=5,
        connect=5,
        read=5,
        status=3,
        status_forcelist=[500, 502, 503],
        backoff_factor=0,
        allowed_methods=["POST", "GET"],
    )
    session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
    spec = parse_spec({**SPEC, "runPolicy": {"stallTimeoutSeconds": 60}})
    assert bound_vllm_requests(session, spec) == 10.0
    # A shorter read timeout for the test itself, through the adapter's default (what requests do not pass).
    adapter = session.get_adapter("http://x")
    adapter.default_timeout = (1.0, 0.3)
    assert adapter.max_retries is retry and adapter._pool_maxsize == 16
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hanging)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    started = datetime.now(UTC)
    try:
        with pytest.raises(requests.exceptions.ConnectionError):  # urllib3's MaxRetryError(ReadTimeoutError)
            session.post(f"http://127.0.0.1:{server.server_port}/inference/v1/generate", json={})
        assert datetime.now(UTC) - started < timedelta(seconds=10)  # 6 attempts x 0.3 s, not forever
    finally:
        _Hanging.released.set()
        server.shutdown()


def test_trl_still_builds_its_vllm_session_where_the_bound_finds_it():
    """The contract bound_vllm_requests relies on (TRL 1.16): GRPOTrainer keeps `vllm_generation`, which keeps
    `vllm_client`, whose `session` is a requests.Session with HTTPAdapters and a read-retry policy, and whose
    requests pass no timeout of their own. Fails loudly when a TRL upgrade moves them."""
    from trl.generation import vllm_client, vllm_generation
    from trl.trainer import grpo_trainer

    assert "self.vllm_generation = VLLMGeneration(" in inspect.getsource(grpo_trainer.GRPOTrainer.__init__)
    assert "self.vllm_client = VLLMClient(" in inspect.getsource(vllm_generation.VLLMGeneration._init_vllm)
    client = inspect.getsource(vllm_client.VLLMClient)
    assert "self.session = requests.Session()" in client and "HTTPAdapter(max_retries=retry_strategy" in client
    assert "read=5" in client
    assert not re.search(r"self\.session\.(get|post)\([^)]*timeout=", client)  # else the bound would be moot


# --- item 8: vLLM outlives the trainer's last step -----------------------------------------------------


@pytest.mark.asyncio
async def test_the_rollout_serves_until_the_stopping_trainer_is_gone(cluster, start_operator):
    """Suspend a Running job whose trainer pods take their grace period to stop (played by a finalizer that
    keeps the deleted Job, as the foreground deletion's does until its pods are gone): vLLM keeps running
    for the trainer's last step, and is scaled to zero only once the Job is gone."""
    from kmock_support import DEPLOYMENTS, JOBS

    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest())
    await all_children(cluster)
    await start_trainer_pods(cluster)
    await wait_for(phase_is(cluster, "Running"), what="phase Running")
    hold = {"metadata": {"finalizers": ["test.g2rpo.dev/pods-terminating"]}}
    await cluster.emulator.patch_object(BATCH_JOBS, NAMESPACE, "demo-trainer", hold)
    await cluster.emulator.patch_object(JOBS, NAMESPACE, "demo", {"spec": {"suspend": True}})

    def rollout_replicas() -> int:
        return cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-rollout")["spec"]["replicas"]

    await wait_for(
        lambda: (
            (cluster.emulator.stored(BATCH_JOBS, NAMESPACE, "demo-trainer") or {})
            .get("metadata", {})
            .get("deletionTimestamp")
        ),
        what="the trainer Job being deleted",
    )
    await asyncio.sleep(0.6)  # several passes
    assert rollout_replicas() == 1 and cluster.status()["phase"] == "Suspended"
    assert cluster.emulator.stored(DEPLOYMENTS, NAMESPACE, "demo-controller")["spec"]["replicas"] == 0
    await cluster.emulator.patch_object(BATCH_JOBS, NAMESPACE, "demo-trainer", {"metadata": {"finalizers": []}})
    await wait_for(lambda: rollout_replicas() == 0, what="the rollout scaled to zero once the trainer is gone")
