"""Fixtures for the operator's tests: a KMock API server on loopback and the real operator (kopf)
running in-process against it. conftest.py registers the fixtures (`cluster`, `start_operator`) for
every test module.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kopf
import pytest_asyncio

from g2rpo_operator.handlers import Operator, build, kopf_settings, register_client_login
from g2rpo_operator.kube import KubeApi
from g2rpo_operator.settings import OperatorSettings

from kmock_support import JOBS, PVCS, Emulator, free_port, new_emulator, serving

NAMESPACE = "default"
CLAIM = "g2rpo-checkpoints"
# Port 9 (discard) refuses connections at once: no controller unless a test starts one.
NO_CONTROLLER = "http://127.0.0.1:9"


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def job_manifest(name: str = "demo", **spec: Any) -> dict:
    """A small but complete G2RPOJob (2 trainer pods x 8 GPUs); keyword arguments are merged into spec."""
    base = {
        "model": {"name": "Qwen/Qwen3-1.7B-Base"},
        "dataset": {"name": "open-r1/OpenR1-Math-220k"},
        "checkpoint": {"everySteps": 10, "volumeClaim": CLAIM},
        "trainer": {"replicas": 2, "gpusPerReplica": 8},
    }
    return {
        "apiVersion": "g2rpo.dev/v1alpha1",
        "kind": "G2RPOJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": deep_merge(base, spec),
    }


@dataclass
class Cluster:
    emulator: Emulator
    url: str
    namespace: str = NAMESPACE

    async def apply(self, manifest: dict) -> dict:
        return await self.emulator.create_object(JOBS, self.namespace, manifest)

    async def create_claim(
        self, name: str = CLAIM, modes: tuple[str, ...] = ("ReadWriteMany",), phase: str = "Bound"
    ) -> None:
        """A claim as the PV controller leaves it: requested access modes, and a phase (Bound by default)."""
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {"accessModes": list(modes), "resources": {"requests": {"storage": "1Ti"}}},
            "status": {"phase": phase, "accessModes": list(modes)} if phase == "Bound" else {"phase": phase},
        }
        await self.emulator.create_object(PVCS, self.namespace, claim)

    def job(self, name: str = "demo") -> dict | None:
        return self.emulator.stored(JOBS, self.namespace, name)

    def status(self, name: str = "demo") -> dict:
        return (self.job(name) or {}).get("status") or {}


class RunningOperator:
    """An operator on its own thread and event loop, as isolated from the test's loop (which serves
    KMock) as a separate process would be; kopf cancels every task of its loop when it stops."""

    def __init__(self, operator: Operator, registry: kopf.OperatorRegistry, settings: kopf.OperatorSettings):
        self.operator = operator
        self.kopf_settings = settings
        self.health_url = f"http://127.0.0.1:{free_port()}/healthz"
        self._registry = registry
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        main = kopf.operator(
            registry=self._registry,
            settings=self.kopf_settings,
            standalone=self.operator.settings.standalone,
            clusterwide=not self.operator.settings.namespaces,
            namespaces=self.operator.settings.namespaces,
            liveness_endpoint=self.health_url,
        )
        self._task = self._loop.create_task(main)
        self._started.set()
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            # A sync handler may still be running in kopf's thread pool: let it end before its loop does.
            self.kopf_settings.execution.executor.shutdown(wait=True)
            self._loop.close()

    async def stop(self) -> None:
        """Kill it as a SIGKILL would look to the API server: no clean-up, no last writes."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            await asyncio.to_thread(self._thread.join, 30)


def launch(api: KubeApi, settings: OperatorSettings, server_url: str | None = None) -> RunningOperator:
    """The operator as __main__ builds it; `server_url` replaces kopf's credentials (a loopback fake)."""
    registry = kopf.OperatorRegistry()
    operator = build(api, settings, registry)
    if server_url is None:
        register_client_login(registry)
    else:  # only this login: a fake's tests never reach a real cluster through a kubeconfig

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=server_url, priority=1000)

    ks = kopf_settings(settings)
    ks.posting.enabled = server_url is None  # kopf's Events use generateName, which KMock does not support
    return RunningOperator(operator, registry, ks)


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    emulator = new_emulator()
    async with serving(emulator) as url:
        yield Cluster(emulator, url)


@pytest_asyncio.fixture
async def start_operator(cluster: Cluster) -> AsyncIterator[Callable[..., Awaitable[RunningOperator]]]:
    """Start the real operator (kopf + g2rpo_operator) against the cluster; stopped after the test."""
    running: list[RunningOperator] = []

    async def start(api: KubeApi | None = None, **overrides: Any) -> RunningOperator:
        """`api` replaces the operator's client for the cluster; `overrides` are OperatorSettings fields."""
        values = {
            # Changes must arrive through watches: a full API resync would hide a missing one.
            "resync_seconds": 3600.0,
            "poll_seconds": 0.2,
            "http_timeout_seconds": 1.0,
            "controller_url_template": NO_CONTROLLER,
            "standalone": True,
        }
        api = api or KubeApi.for_url(cluster.url)
        running.append(launch(api, OperatorSettings(**{**values, **overrides}), cluster.url))
        return running[-1]

    yield start
    for op in running:
        await op.stop()


def crd_json_schema(strict: bool = True) -> dict:
    """The CRD's openAPIV3Schema as a JSON Schema (draft 4, whose boolean exclusive bounds OpenAPI 3.0
    shares): `nullable` becomes a null type; `strict` forbids unknown fields where properties are
    listed, as `kubectl apply`'s strict field validation does."""
    from g2rpo.api.crd import render_crd

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: convert(value) for key, value in node.items() if key != "nullable"}
        if node.get("nullable"):
            out["type"] = [node["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        if strict and "properties" in node and node.get("properties") is not None:
            out["additionalProperties"] = False
        return out

    schema = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    result = convert(schema)
    result["properties"]["metadata"]["additionalProperties"] = True
    return result
