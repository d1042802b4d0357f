"""The controller service over real HTTP on loopback, driven by raw requests and the trainer's client.

Each test gets a fresh server (aiohttp, in a background thread of this process, on a free port);
persistence across a killed process is in test_controller_persistence.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from g2rpo.controller.core import StepConflict
from g2rpo.controller.http_client import ControllerRejected, ControllerUnavailable, HttpGuidanceClient
from g2rpo.controller.metrics import SANDBOX_LAYERS
from g2rpo.controller.service import GuidanceService, ServiceConfig, start_server
from g2rpo.guidance import schedule as sched
from g2rpo_operator.controller_client import ControllerReport, TokenRefused, read_controller

TOKEN = "test-token-0123456789"
PARAMS = sched.ScheduleParams(schedule="adaptive", initial_length=400, min_length=1, max_length=800, window=2)
STATS = {"accuracy": 0.5, "accuracy_guided": 0.75, "reward_std": 0.3, "advantage_std": 0.9, "decoded_tokens": 1200.0}


class ThreadServer:
    """A real controller server on 127.0.0.1, its event loop in a daemon thread."""

    def __init__(self, port: int = 0, params: sched.ScheduleParams = PARAMS):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = ServiceConfig(job="unit", params=params, token=TOKEN)
        self.server = self._run(start_server(GuidanceService(config), "127.0.0.1", port))
        self.url = self.server.url

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def close(self) -> None:
        self._run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def server():
    srv = ThreadServer()
    yield srv
    srv.close()


def call(url: str, method: str, path: str, body: Any = None, token: str | None = TOKEN, raw: bytes | None = None):
    """(status, decoded JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def state(url: str) -> dict[str, Any]:
    status, body = call(url, "GET", "/v1/state")
    assert status == 200, body
    return body["snapshot"]


def client(url: str, **kwargs: Any) -> HttpGuidanceClient:
    return HttpGuidanceClient(url, TOKEN, **kwargs)


def test_duplicate_step_is_idempotent(server):
    rewards = [0.5, 0.25, 0.4]
    c = client(server.url)
    answers = [c.report(k, r, STATS) for k, r in enumerate(rewards)]
    assert answers == sched.lengths_for(PARAMS, rewards)[1:]

    status, again = call(server.url, "POST", "/v1/steps", {"step": 2, "reward": 0.4, "metrics": STATS})
    assert status == 200 and again == {"step": 2, "nextLength": answers[-1], "nextStep": 3, "duplicate": True}
    assert c.report(2, 0.4, STATS) == answers[-1]  # the client's own retry path
    snap = state(server.url)
    assert snap["state"]["step"] == 3 and len(snap["history"]) == 3  # advanced once per step
    assert c.current() == (3, answers[-1])


def test_steps_that_do_not_fit_the_history_are_conflicts(server):
    c = client(server.url)
    for k, r in enumerate([0.5, 0.25, 0.4]):
        c.report(k, r, {})
    before = state(server.url)
    for body, needle in [
        ({"step": 1, "reward": 0.25}, "rewind"),  # older than the last: only after a rewind
        ({"step": 2, "reward": 0.9}, "retry must repeat it"),  # a retry with another reward
        ({"step": 5, "reward": 0.5}, "expects step 3"),  # from the future
    ]:
        status, answer = call(server.url, "POST", "/v1/steps", body)
        assert status == 409 and answer["field"] == "step" and needle in answer["error"], answer
        assert answer["expectedStep"] == 3
    assert state(server.url) == before
    with pytest.raises(StepConflict, match="expects step 3"):
        c.report(7, 0.5, {})


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        (b'{"step": -1, "reward": 0.5}', 422, "step"),
        (b'{"step": 0, "reward": NaN}', 422, "reward"),
        (b'{"step": 0, "reward": Infinity}', 422, "reward"),
        (b'{"step": 0, "reward": 1.5}', 422, "reward"),
        (b'{"step": 0, "reward": 0.5, "metrics": {"reward_std": -0.1}}', 422, "metrics.reward_std"),
        (b'{"step": 0, "reward": 0.5, "metrics": {"accuracy": NaN}}', 422, "metrics.accuracy"),
        (b'{"step": 0, "reward": 0.5, "learningRate": 1e-6}', 400, "learningRate"),
        (b'{"step": 0, "reward": 0.5, "metrics": {"kl_divergence": 0.1}}', 400, "metrics.kl_divergence"),
        (b'{"step": 0, "reward": 0.5, "metrics": [1, 2]}', 400, "metrics"),
        (b'{"step": "0", "reward": 0.5}', 400, "step"),
        (b'{"step": true, "reward": 0.5}', 400, "step"),
        (b'{"step": 1.0, "reward": 0.5}', 400, "step"),
        (b'{"step": 0}', 400, "reward"),
        (b'{"step": 0, "reward": "high"}', 400, "reward"),
        (b"[0, 0.5]", 400, "body"),
        (b"step=0&reward=0.5", 400, "body"),
    ],
)
def test_bad_reports_name_the_field_and_change_nothing(server, raw, status, field):
    before = state(server.url)
    got, answer = call(server.url, "POST", "/v1/steps", raw=raw)
    assert (got, answer["field"]) == (status, field), answer
    assert field in answer["error"]
    assert state(server.url) == before


def test_every_problem_is_listed():
    raw = b'{"step": -1, "reward": NaN, "metrics": {"accuracy": 2, "nope": 1}, "extra": 0}'
    srv = ThreadServer()
    try:
        status, answer = call(srv.url, "POST", "/v1/steps", raw=raw)
    finally:
        srv.close()
    assert status == 400  # unknown names are malformed; out-of-range values alone would be 422
    assert {e["field"] for e in answer["errors"]} == {"step", "reward", "metrics.accuracy", "metrics.nope", "extra"}


def test_rewind_resumes_from_an_earlier_step(server):
    c = client(server.url)
    rewards = [0.5, 0.25, 0.4, 0.6, 0.3]
    for k, r in enumerate(rewards):
        c.report(k, r, {})
    expected = sched.lengths_for(PARAMS, rewards)
    assert c.rewind(2) == expected[2]
    assert c.current() == (2, expected[2])
    assert c.report(2, 0.8, {}) == sched.lengths_for(PARAMS, [0.5, 0.25, 0.8])[3]  # step 2 again, new reward
    snap = state(server.url)
    assert [h["reward"] for h in snap["history"]] == [0.5, 0.25, 0.8]
    assert snap["events"][-1]["event"] == "rewind" and snap["events"][-1]["step"] == 2
    status, answer = call(server.url, "POST", "/v1/rewind", {"step": 9})
    assert status == 409 and answer["field"] == "step"


def test_operator_overrides_are_recorded(server):
    c = client(server.url)
    c.report(0, 0.5, {})
    status, answer = call(server.url, "POST", "/v1/override", {"length": 123, "reason": "more guidance"})
    assert status == 200 and answer["length"] == 123
    assert c.report(0, 0.5, {}) == 123  # a retry after an override gets the override, not the stale answer
    status, answer = call(server.url, "POST", "/v1/override", {"params": {"maxLength": 100, "window": 3}})
    assert status == 422 and "initialLength (400) must lie in" in answer["error"]  # validated like a job spec
    new_params = {"maxLength": 100, "initialLength": 100, "window": 3}
    status, answer = call(server.url, "POST", "/v1/override", {"params": new_params})
    assert status == 200 and answer["length"] == 100 and answer["params"]["window"] == 3  # re-clipped
    events = state(server.url)["events"]
    assert [(e["event"], e["length"], e.get("reason")) for e in events] == [
        ("override", 123, "more guidance"),
        ("override", None, ""),
    ]
    assert events[1]["params"]["max_length"] == 100
    assert set(answer) == {"job", "step", "length", "schedule", "params"}  # no lastStep: that is /v1/guidance's
    status, answer = call(server.url, "POST", "/v1/override", {"params": {"rewardEma": 0.5, "maxChangeFactor": 2}})
    assert status == 200 and (answer["params"]["rewardEma"], answer["params"]["maxChangeFactor"]) == (0.5, 2)
    status, answer = call(server.url, "POST", "/v1/override", {"params": {"rewardEma": 0, "maxChangeFactor": None}})
    assert status == 200 and answer["params"]["maxChangeFactor"] is None  # smoothing off again: the paper's rule
    before = state(server.url)
    for body, status, field in [
        ({"params": {"window": 0}}, 422, "params.window"),
        ({"params": {"ratio": 0.5}}, 400, "params.ratio"),  # a trainer setting, not the schedule's
        ({"params": {"schedule": "linear"}}, 422, "params.totalSteps"),
        ({"params": {"minLength": 200}}, 422, "params"),  # minLength above maxLength
        ({"params": {"maxChangeFactor": 0.5}}, 422, "params.maxChangeFactor"),  # guidance.smoothing's bound
        ({"length": -5}, 422, "length"),
        ({"reason": "nothing to change"}, 400, "length"),
    ]:
        got, answer = call(server.url, "POST", "/v1/override", body)
        assert (got, answer["field"]) == (status, field), answer
    assert state(server.url) == before


def test_token_is_required_and_never_logged(server, caplog):
    caplog.set_level(logging.WARNING, logger="g2rpo.controller.service")
    for path in ["/healthz", "/readyz", "/metrics"]:
        assert call(server.url, "GET", path, token=None)[0] == 200
    wrong = "wrong-" + TOKEN
    for method, path, token in [
        ("GET", "/v1/guidance", None),
        ("GET", "/v1/state", wrong),
        ("POST", "/v1/steps", wrong),
        ("POST", "/v1/rewind", None),
        ("POST", "/v1/override", wrong),
    ]:
        status, answer = call(server.url, method, path, {"step": 0, "reward": 0.5}, token=token)
        assert status == 401, (path, answer)
    assert state(server.url)["history"] == []
    assert len([r for r in caplog.records if "401" in r.getMessage()]) == 5
    assert TOKEN not in caplog.text
    with pytest.raises(ControllerRejected, match="401"):
        HttpGuidanceClient(server.url, wrong).current()


def test_metrics_expose_the_job(server):
    c = client(server.url)
    c.report(0, 0.5, STATS)
    c.report(1, 0.25, {**STATS, "decoded_tokens": 800.0})
    status, text = call(server.url, "GET", "/metrics", token=None)
    assert status == 200
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "g2rpo_job"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("g2rpo_job") == "unit"
    }
    assert samples[("g2rpo_guidance_length_tokens", ())] == c.current()[1]
    assert samples[("g2rpo_step", ())] == 2
    assert samples[("g2rpo_accuracy_reward", (("rollouts", "all"),))] == 0.5
    assert samples[("g2rpo_accuracy_reward", (("rollouts", "guided"),))] == 0.75
    assert ("g2rpo_accuracy_reward", (("rollouts", "unguided"),)) not in samples  # never reported
    assert samples[("g2rpo_decoded_tokens_total", ())] == 2000
    assert time.time() - samples[("g2rpo_last_report_timestamp_seconds", ())] < 60
    assert samples[("g2rpo_http_requests_total", (("method", "POST"), ("route", "/v1/steps"), ("status", "200")))] == 2
    assert samples[("g2rpo_http_request_duration_seconds_count", (("method", "POST"), ("route", "/v1/steps")))] == 2


def test_restore_from_a_checkpoint_snapshot(server):
    c = client(server.url)
    for k, r in enumerate([0.5, 0.25, 0.4]):
        c.report(k, r, STATS)
    saved = c.snapshot()
    fresh = ThreadServer()
    try:
        other = client(fresh.url)
        assert other.restore(saved) == c.current()[1]
        restored = state(fresh.url)
        assert {k: restored[k] for k in ("params", "state", "history")} == {
            k: saved[k] for k in ("params", "state", "history")
        }
        assert other.report(3, 0.5, {}) == c.report(3, 0.5, {})
        status, answer = call(fresh.url, "POST", "/v1/restore", {"snapshot": {"params": {}}})
        assert status == 400 and answer["field"] == "snapshot"
    finally:
        fresh.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_until_the_controller_is_up():
    port = _free_port()
    started: list[ThreadServer] = []
    timer = threading.Timer(0.5, lambda: started.append(ThreadServer(port=port)))
    timer.start()
    try:
        begin = time.monotonic()
        assert HttpGuidanceClient(f"http://127.0.0.1:{port}", TOKEN, total_timeout=10).current() == (0, 400)
        assert time.monotonic() - begin >= 0.4
    finally:
        timer.join()
        for srv in started:
            srv.close()


def test_client_gives_up_with_a_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    begin = time.monotonic()
    with pytest.raises(ControllerUnavailable) as info:
        HttpGuidanceClient(url, TOKEN, total_timeout=0.6).report(0, 0.5, {})
    assert time.monotonic() - begin < 3
    message = str(info.value)
    assert url + "/v1/steps" in message and "Connection refused" in message and "stale guidance length" in message


def test_client_surfaces_rejections(server):
    with pytest.raises(ControllerRejected) as info:
        client(server.url).report(0, float("nan"), {})
    assert info.value.status == 422 and info.value.field == "reward"


def test_guidance_answers_the_last_step_and_the_operator_reads_it(server):
    """The operator's whole view of a job's training comes from GET /v1/guidance, as JSON."""
    status, answer = call(server.url, "GET", "/v1/guidance")
    assert status == 200 and answer["lastStep"] is None
    assert read_controller(server.url, TOKEN, timeout=5) == ControllerReport(step=0, length=400, reward=None)

    c = client(server.url)
    layers = {f"sandbox_{layer}": 1.0 for layer in SANDBOX_LAYERS}
    c.report(0, 0.5, STATS)
    # The driving reward is the schedule's r_k, whatever the step's accuracy statistic says.
    c.report(1, 0.25, {**STATS, **layers, "sandbox_seccomp": 0.0})
    status, answer = call(server.url, "GET", "/v1/guidance")
    last = answer["lastStep"]
    assert (last["step"], last["reward"], last["nextLength"]) == (1, 0.25, c.current()[1])
    assert last["metrics"]["accuracy"] == 0.5 and last["lengthUsed"] == sched.lengths_for(PARAMS, [0.5])[1]
    assert time.time() - last["reportedAt"] < 60
    expected_layers = {layer: layer != "seccomp" for layer in SANDBOX_LAYERS}
    assert last["sandboxLayers"] == expected_layers
    assert read_controller(server.url, TOKEN, timeout=5) == ControllerReport(
        step=2, length=c.current()[1], reward=0.25, sandbox_layers=expected_layers
    )

    c.rewind(1)  # the last step still in the history is step 0, which reported no sandbox layers
    report = read_controller(server.url, TOKEN, timeout=5)
    assert (report.step, report.reward, report.sandbox_layers) == (1, 0.5, None)
    c.rewind(0)
    assert read_controller(server.url, TOKEN, timeout=5) == ControllerReport(step=0, length=400, reward=None)


def test_the_operator_reads_none_from_a_controller_that_does_not_answer(server):
    """No answer is no report; a 401 is not: the operator derives the job's token, so a refusal means the
    token Secret is a foreign one (reconcile reports it as a conflict)."""
    assert read_controller(f"http://127.0.0.1:{_free_port()}", TOKEN, timeout=5) is None
    with pytest.raises(TokenRefused):
        read_controller(server.url, "wrong-" + TOKEN, timeout=5)


def test_the_shared_client_imports_only_the_standard_library():
    """The operator reads its controllers through it, and the operator's image has no torch."""
    program = (
        "import json, sys; import g2rpo_operator.controller_client; "
        "print(json.dumps([m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names]))"
    )
    loaded = json.loads(subprocess.check_output([sys.executable, "-c", program], text=True))
    assert sorted(m for m in loaded if not m.startswith("_")) == [  # "_": the interpreter's site hooks
        "g2rpo",
        "g2rpo.api",
        "g2rpo.api.names",
        "g2rpo.controller",
        "g2rpo.controller.connection",
        "g2rpo_operator",
        "g2rpo_operator.controller_client",
    ]
