"""The controller service: one pod per job, holding the guidance state every trainer rank shares.

An aiohttp app around a `DurableController` (g2rpo.controller.store): handlers validate the
payload, take the one lock, run the mutation and its fsync in a worker thread, update the
Prometheus metrics and answer. The schedule's semantics live in `GuidanceController` (core.py);
nothing here re-implements them.

API (JSON; every /v1 call needs `Authorization: Bearer <token>`):

    GET  /healthz        liveness: 200 unless the state could not be written (then 503: restart me)
    GET  /readyz         readiness: 200 once the state is loaded
    GET  /metrics        Prometheus exposition (docs/metrics.md)
    GET  /v1/guidance    {"job", "step", "length", "schedule", "params", "lastStep"}: lastStep is null
                         before the first report, else {"step", "reward" (r_k, the schedule's driving
                         reward), "lengthUsed", "nextLength", "reportedAt", "metrics" (as reported),
                         "sandboxLayers" ({layer: holds}, null unless the step reported them)}
    POST /v1/steps       {"step", "reward", "metrics"?} -> {"step", "nextLength", "nextStep", "duplicate"}
    GET  /v1/state       {"job", "snapshot"}: the full state and per-step history (core snapshot format)
    POST /v1/rewind      {"step"} -> {"step", "length"}
    POST /v1/override    {"length"?, "params"?, "reason"?} -> {"job", "step", "length", "schedule", "params"}
    POST /v1/restore     {"snapshot"} -> {"step", "length"}

Errors are {"error": "...", "field": "name" | null, ...}: 400 a malformed payload (not JSON, wrong
type, missing or unknown field), 422 a well-formed value out of range (NaN, negative step), 401
a missing or wrong token, 404 an unknown path, 409 a step that does not fit the history (stale
without a rewind, a retry with another reward, a step from the future), 503 not ready or broken.
A rejected request changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from g2rpo.api.names import GUIDANCE_PATH, HEALTH_PATH, METRICS_PATH, READY_PATH
from g2rpo.api.spec import GuidanceSpec
from g2rpo.controller.core import StepConflict, StepRecord
from g2rpo.controller.metrics import REPORT_METRICS, ControllerMetrics, sandbox_layers
from g2rpo.controller.store import DEFAULT_COMPACT_EVERY, DurableController, ReportAnswer
from g2rpo.guidance.schedule import ScheduleParams

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({HEALTH_PATH, READY_PATH, METRICS_PATH})

#: r_k is the mean of a pass/fail reward (accuracy, code tests) over the batch, so it lies in
#: [0, 1]; anything else would make the adaptive ratio meaningless (a negative length).
REWARD_RANGE = (0.0, 1.0)

#: Schedule parameters an override may change, by their job-spec (camelCase) names.
PARAM_NAMES = {to_camel(f.name): f.name for f in fields(ScheduleParams)}

#: A restore carries a whole history; the default 1 MiB would cap it near 2,500 steps.
MAX_BODY_BYTES = 64 * 1024 * 1024


class ApiError(Exception):
    """An error answer: its status, message and the payload field it concerns."""

    def __init__(self, status: int, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.field, self.extra = status, message, field, extra

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": self.message, "field": self.field, **self.extra}
        return web.json_response(body, status=self.status, headers=headers)


Problem = tuple[str, str, bool]  # (field, reason, malformed)


class Payload:
    """Reads the fields of a JSON object, collecting every problem with the field it concerns.

    A malformed field (wrong type, missing, unknown) makes the answer 400; if every problem is a
    value out of range, it is 422. `check()` raises the collected problems as one ApiError.
    """

    def __init__(self, body: Any, allowed: set[str], prefix: str = "", problems: list[Problem] | None = None):
        self.prefix = prefix
        self.problems: list[Problem] = [] if problems is None else problems
        if not isinstance(body, dict):
            self.problem(None, "must be a JSON object", malformed=True)
            body = {}
        for name in sorted(set(body) - set(allowed)):
            self.problem(name, "unknown field", malformed=True)
        self.body = body

    def _name(self, name: str | None) -> str:
        if name is None:
            return self.prefix or "body"
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str | None, reason: str, malformed: bool) -> None:
        self.problems.append((self._name(name), reason, malformed))

    def has(self, name: str) -> bool:
        return self.body.get(name) is not None

    def integer(self, name: str, low: int = 0) -> int | None:
        value = self.body.get(name)
        if value is None:
            self.problem(name, "required", malformed=True)
        elif not isinstance(value, int) or isinstance(value, bool):
            self.problem(name, f"must be an integer, got {value!r}", malformed=True)
        elif value < low:
            self.problem(name, f"must be at least {low}, got {value}", malformed=False)
        else:
            return value
        return None

    def number(self, name: str, low: float = -math.inf, high: float = math.inf) -> float | None:
        value = self.body.get(name)
        if value is None:
            self.problem(name, "required", malformed=True)
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            self.problem(name, f"must be a number, got {value!r}", malformed=True)
        elif not math.isfinite(value):
            self.problem(name, f"must be a finite number, got {value!r}", malformed=False)
        elif not low <= value <= high:
            self.problem(name, f"must lie in [{low:g}, {high:g}], got {value!r}", malformed=False)
        else:
            return float(value)
        return None

    def string(self, name: str) -> str:
        value = self.body.get(name, "")
        if not isinstance(value, str):
            self.problem(name, f"must be a string, got {value!r}", malformed=True)
            return ""
        return value

    def check(self) -> None:
        if self.problems:
            raise problems_error(self.problems)


def problems_error(problems: list[Problem]) -> ApiError:
    """One answer for every (field, reason, malformed) problem; it names the first field."""
    status = 400 if any(malformed for *_, malformed in problems) else 422
    message = "; ".join(f"{field}: {reason}" for field, reason, _ in problems)
    errors = [{"field": field, "error": reason} for field, reason, _ in problems]
    return ApiError(status, message, field=problems[0][0], errors=errors)


async def read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", field="body") from None


def camel_params(params: ScheduleParams) -> dict[str, Any]:
    return {camel: getattr(params, name) for camel, name in PARAM_NAMES.items()}


SMOOTHING_PARAMS = ("rewardEma", "maxChangeFactor")
"""Flat in the API's params, nested under guidance.smoothing in a job spec (and off when both are unset)."""


def overridden_params(current: ScheduleParams, changes: dict[str, Any]) -> ScheduleParams:
    """`current` with an override's changes (job-spec names), validated like a job spec's guidance."""
    guidance = {**camel_params(current), **changes}
    smoothing = {name: guidance.pop(name) for name in SMOOTHING_PARAMS}
    if smoothing["rewardEma"] or smoothing["maxChangeFactor"] is not None:
        guidance["smoothing"] = smoothing
    try:
        return ScheduleParams.from_spec(GuidanceSpec.model_validate(guidance))
    except ValidationError as exc:
        problems = [
            (
                ".".join(["params", *(str(part) for part in err["loc"] if part != "smoothing")]),
                err["msg"].removeprefix("Value error, "),
                False,
            )
            for err in exc.errors()
        ]
    except ValueError as exc:  # a linear, concave or cosine schedule without totalSteps
        problems = [("params.totalSteps", str(exc), False)]
    raise problems_error(problems)


@dataclass
class ServiceConfig:
    job: str
    params: ScheduleParams
    token: str
    state_dir: Path | None = None
    compact_every: int = DEFAULT_COMPACT_EVERY


class GuidanceService:
    """The job's state behind the HTTP API: one lock, mutations and their fsync in a thread."""

    def __init__(self, config: ServiceConfig):
        if not config.token:
            raise ValueError("the controller needs a non-empty bearer token")
        self.config = config
        self.metrics = ControllerMetrics(config.job)
        self.durable: DurableController | None = None
        self.broken: str | None = None  # why the state can no longer be trusted to match the disk
        self._lock = asyncio.Lock()
        self._token = config.token.encode()

    @property
    def ready(self) -> bool:
        return self.durable is not None and self.broken is None

    async def load(self) -> None:
        c = self.config
        durable = await asyncio.to_thread(DurableController.open, c.job, c.params, c.state_dir, c.compact_every)
        self.metrics.observe_state(durable.controller)
        if durable.controller.history:
            self.metrics.observe_step(durable.controller.history[-1], new=False)
        self.durable = durable

    def authorised(self, header: str | None) -> str | None:
        """None if the Authorization header carries the token, else why not (never the token)."""
        if not header:
            return "no Authorization header"
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            return "the Authorization header is not 'Bearer <token>'"
        if not hmac.compare_digest(credentials.strip().encode(), self._token):
            return "wrong bearer token"
        return None

    async def read(self, fn: Callable[[DurableController], Any]) -> Any:
        async with self._lock:
            return fn(self._durable())

    async def mutate(self, fn: Callable[[DurableController], Any]) -> Any:
        """Run `fn(durable)` in a thread under the lock (it fsyncs); a failed write breaks the service."""
        async with self._lock:
            durable = self._durable()
            try:
                result = await asyncio.to_thread(fn, durable)
            except OSError as exc:
                self.broken = f"writing the journal failed: {exc}"
                log.critical("%s; memory is now ahead of the disk, refusing service until restarted", self.broken)
                raise ApiError(
                    503, f"the controller could not persist the change ({exc}); it needs a restart"
                ) from None
            self.metrics.observe_state(durable.controller)
            return result

    def _durable(self) -> DurableController:
        if self.broken:
            raise ApiError(503, f"the controller needs a restart: {self.broken}")
        if self.durable is None:
            raise ApiError(503, "the controller is still loading its state")
        return self.durable

    def position(self, durable: DurableController) -> dict[str, Any]:
        """Where the schedule stands: the answer to an override."""
        c = durable.controller
        return {
            "job": durable.job,
            "step": c.step,
            "length": c.length,
            "schedule": c.params.schedule,
            "params": camel_params(c.params),
        }

    def guidance(self, durable: DurableController) -> dict[str, Any]:
        """The position and the last step still in the history, all the operator reads."""
        history = durable.controller.history
        return {**self.position(durable), "lastStep": step_answer(history[-1]) if history else None}


def step_answer(record: StepRecord) -> dict[str, Any]:
    return {
        "step": record.step,
        "reward": record.reward,
        "lengthUsed": record.length_used,
        "nextLength": record.next_length,
        "reportedAt": record.reported_at,
        "metrics": dict(record.metrics),
        "sandboxLayers": sandbox_layers(record.metrics),
    }


# --- handlers ------------------------------------------------------------------------------------

SERVICE = web.AppKey("service", GuidanceService)


async def healthz(request: web.Request) -> web.Response:
    broken = request.app[SERVICE].broken
    return web.json_response(
        {"status": "broken", "reason": broken} if broken else {"status": "ok"}, status=503 if broken else 200
    )


async def readyz(request: web.Request) -> web.Response:
    ready = request.app[SERVICE].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_guidance(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(await service.read(service.guidance))


async def get_state(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(await service.read(lambda d: {"job": d.job, "snapshot": d.controller.snapshot()}))


async def post_step(request: web.Request) -> web.Response:
    """Report finished step k with r_k and its statistics; answers l_{k+1}. A retry is idempotent."""
    service = request.app[SERVICE]
    payload = Payload(await read_json(request), {"step", "reward", "metrics"})
    step, reward = payload.integer("step"), payload.number("reward", *REWARD_RANGE)
    values: dict[str, float] = {}
    if payload.has("metrics"):
        stats = Payload(payload.body["metrics"], set(REPORT_METRICS), prefix="metrics", problems=payload.problems)
        for name in sorted(stats.body.keys() & REPORT_METRICS.keys()):
            value = stats.number(name, REPORT_METRICS[name].low, REPORT_METRICS[name].high)
            if value is not None:
                values[name] = value
    try:
        payload.check()
    except ApiError:
        service.metrics.count_report("invalid")
        raise
    assert step is not None and reward is not None  # check() raised on any field that did not read

    def accept(durable: DurableController) -> tuple[ReportAnswer, StepRecord]:
        try:
            report = durable.report(step, reward, values)
        except StepConflict as exc:
            raise ApiError(409, str(exc), field="step", expectedStep=durable.controller.step) from None
        return report, durable.controller.history[-1]

    try:
        report, record = await service.mutate(accept)
    except ApiError as exc:
        if exc.status == 409:
            service.metrics.count_report("conflict")
        raise
    service.metrics.count_report("duplicate" if report.duplicate else "accepted")
    if not report.duplicate:
        service.metrics.observe_step(record, new=True)
        log.debug("step %d reported (reward %.4g): next length %d", step, reward, report.next_length)
    return web.json_response(
        {"step": step, "nextLength": report.next_length, "nextStep": step + 1, "duplicate": report.duplicate}
    )


async def post_rewind(request: web.Request) -> web.Response:
    """Return the schedule to its state after `step` steps: the trainer resumed from that checkpoint."""
    service = request.app[SERVICE]
    payload = Payload(await read_json(request), {"step"})
    step = payload.integer("step")
    payload.check()
    assert step is not None  # check() raised if it did not read
    try:
        length = await service.mutate(lambda d: d.rewind(step))
    except ValueError as exc:
        raise ApiError(409, str(exc), field="step") from None
    service.metrics.count_event("rewind")
    log.info("job %s rewound to step %d: length %d", service.config.job, step, length)
    return web.json_response({"step": step, "length": length})


async def post_override(request: web.Request) -> web.Response:
    """An operator sets the next length and/or schedule parameters; recorded as an override event."""
    service = request.app[SERVICE]
    payload = Payload(await read_json(request), {"length", "params", "reason"})
    length = payload.number("length", low=0.0) if "length" in payload.body else None
    reason = payload.string("reason")
    if "params" in payload.body:
        Payload(payload.body["params"], set(PARAM_NAMES), prefix="params", problems=payload.problems)
    elif "length" not in payload.body:
        payload.problem("length", "an override needs a length or params", malformed=True)
    payload.check()

    def override(durable: DurableController) -> dict[str, Any]:
        # Validated against the parameters in force under the lock, not a copy read before it.
        changes = payload.body.get("params")
        params = overridden_params(durable.controller.params, changes) if changes is not None else None
        durable.override(length, params, reason)
        return service.position(durable)

    answer = await service.mutate(override)
    service.metrics.count_event("override")
    log.info("job %s override (%s): %s", service.config.job, reason or "no reason given", payload.body)
    return web.json_response(answer)


async def post_restore(request: web.Request) -> web.Response:
    """Continue from the controller snapshot saved in a trainer checkpoint."""
    service = request.app[SERVICE]
    payload = Payload(await read_json(request), {"snapshot"})
    if not payload.has("snapshot"):
        payload.problem("snapshot", "required", malformed=True)
    payload.check()
    try:
        length, step = await service.mutate(lambda d: (d.restore(payload.body["snapshot"]), d.controller.step))
    except ValueError as exc:
        raise ApiError(400, str(exc), field="snapshot") from None
    service.metrics.count_event("restore")
    log.info("job %s restored from a snapshot at step %d: length %d", service.config.job, step, length)
    return web.json_response({"step": step, "length": length})


# --- middleware ----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def instrument(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as JSON, and every request counted and timed by its route (not its raw path)."""
    start = time.perf_counter()
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except web.HTTPException as exc:  # 404 and 405 from the router
        response = ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}").response()
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = ApiError(500, "internal error (see the controller's log)").response()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[SERVICE].metrics.observe_request(route, request.method, response.status, time.perf_counter() - start)
    return response


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in PUBLIC_PATHS:
        reason = request.app[SERVICE].authorised(request.headers.get("Authorization"))
        if reason:
            log.warning("401 for %s %s from %s: %s", request.method, request.path, request.remote, reason)
            raise ApiError(401, f"unauthorised: {reason}")
    return await handler(request)


def create_app(service: GuidanceService) -> web.Application:
    app = web.Application(middlewares=[instrument, authenticate], client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = service
    app.router.add_get(HEALTH_PATH, healthz)
    app.router.add_get(READY_PATH, readyz)
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get(GUIDANCE_PATH, get_guidance)
    app.router.add_get("/v1/state", get_state)
    app.router.add_post("/v1/steps", post_step)
    app.router.add_post("/v1/rewind", post_rewind)
    app.router.add_post("/v1/override", post_override)
    app.router.add_post("/v1/restore", post_restore)
    return app


# --- serving -------------------------------------------------------------------------------------


class RunningServer:
    """A started server: its base URL, and `close()`."""

    def __init__(self, runner: web.AppRunner, service: GuidanceService, url: str):
        self.runner, self.service, self.url = runner, service, url

    async def close(self) -> None:
        await self.runner.cleanup()
        if self.service.durable is not None:
            self.service.durable.close()


async def start_server(service: GuidanceService, host: str, port: int) -> RunningServer:
    """Listen first (so /healthz and /readyz answer during a long replay), then load the state."""
    runner = web.AppRunner(create_app(service), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    log.info("g2rpo controller for job %s listening on %s", service.config.job, url)
    server = RunningServer(runner, service, url)
    try:
        await service.load()
    except BaseException:
        await server.close()
        raise
    assert service.durable is not None  # load() returned: the state is loaded
    log.info("job %s ready at step %d", service.config.job, service.durable.controller.step)
    return server


async def serve(config: ServiceConfig, host: str, port: int) -> None:
    """Run the controller until SIGTERM or SIGINT."""
    server = await start_server(GuidanceService(config), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.close()
