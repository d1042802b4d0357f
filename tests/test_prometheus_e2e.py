"""End to end on loopback: the cluster trainer entry point (`python -m g2rpo.train`, tiny model)
reports to a real controller service, a real Prometheus scrapes the controller during the run and
evaluates the shipped alert rules; every metric family, every alert's selectors and every query of
the Grafana dashboard return data.

Prometheus comes from Debian's package (`make tools` installs it). Alert expressions only fire
after minutes or hours, so each alert is checked twice: the real Prometheus loads and evaluates
the rule without error, and a probe built from the rule's own selectors returns data.

The real operator (`python -m g2rpo_operator`, the Deployment's command) runs against KMock, the
loopback stand-in for the Kubernetes API (no cluster here), reconciles a G2RPOJob and is scraped
too, for the dashboard's operator panels. Faults are injected, named as such: KMock answers the
operator's first create of a ConfigMap, a Service and a Deployment with a 500, so that the
reconcile-error series exist and move (the operator retries with backoff and goes on). The
controller gets two requests without the token (401s), for its error panel. The scrape config adds the `namespace` label a ServiceMonitor or
PodMonitor would (the dashboard filters on it).
The rollout row reads vLLM's own metrics, and vLLM cannot run here (CUDA only): a stand-in exporter
serves every per-engine metric that vLLM 0.31 registers, under its name, type and labels as read from
the wheel's source (tests/fixtures/vllm-metrics.json, tools/vllm_metrics.py), with values that move;
it is scraped with the `g2rpo_job` label the chart's rollout PodMonitor/ServiceMonitor relabelling
adds and with the chart's own metric relabelling: this Prometheus 2 negotiates OpenMetrics, for which
prometheus_client 0.26 (vLLM's) writes `vllm:x` samples as `vllm_x` (prometheus/client_python#1177),
so the dashboard only gets data when that rule renames them back. It proves the queries and names,
not vLLM's values.
Each panel's result over the run is drawn with matplotlib; with G2RPO_WRITE_DOCS=1 the PNGs are
written to docs/dashboard/ (committed, so a person can see what the dashboard shows).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from controller_support import controller_service, tiny_cluster_job

ROOT = Path(__file__).resolve().parents[1]
# `make tools` puts prometheus into .tools/bin (tools/install_prometheus.py); one on PATH does too.
PROMETHEUS = shutil.which("prometheus", path=f"{ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
RULES = ROOT / "charts" / "g2rpo" / "files" / "prometheus" / "g2rpo-alerts.rules.yaml"  # the source
DASHBOARD = ROOT / "charts" / "g2rpo" / "dashboards" / "g2rpo.json"
DOCS = ROOT / "docs" / "dashboard"
NAMESPACE = "default"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval gives for a 1 s scrape over a short range
TOKEN = "e2e-token"
JOB = "e2e-tiny"
STEPS = 6
# Series only a job with a code reward has (the sandbox's layers; tests/test_operator_kmock.py covers them).
CODE_REWARD_ONLY = {"g2rpo_sandbox_layer_active"}

# alert -> a query over the alert's own selectors that returns data as soon as they match series
PROBES = {
    "G2RPOJobStoppedReporting": "time() - g2rpo_last_report_timestamp_seconds",
    "G2RPOAccuracyRewardCollapse": 'avg_over_time(g2rpo_accuracy_reward{rollouts="all"}[15m])',
    "G2RPOGuidancePinnedAtMax": (
        "g2rpo_guidance_length_tokens - g2rpo_guidance_max_length_tokens"
        ' and on (namespace, g2rpo_job) g2rpo_schedule_info{schedule="adaptive"} == 1'
    ),
    "G2RPOAdvantageStdNearZero": "g2rpo_advantage_std",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="needs Prometheus: `make tools` installs it"),
]


def _vllm_stand_in(stack: contextlib.ExitStack) -> int:
    """Serve vLLM 0.31's per-engine metrics (names, types, labels from its source) with moving values until
    `stack` closes; the port."""
    import random

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

    registry = CollectorRegistry()
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    recorded = json.loads((ROOT / "tests" / "fixtures" / "vllm-metrics.json").read_text())["metrics"]
    metrics = [
        (m["type"], kinds[m["type"]](m["name"], m["help"] or m["name"], m["labels"], registry=registry))
        for m in recorded
        if m["labels"] == ["model_name", "engine"]
    ]
    assert len(metrics) >= 20
    port = _free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    stack.callback(server.shutdown)
    stop = threading.Event()
    stack.callback(stop.set)

    def tick() -> None:
        while not stop.wait(0.2):
            for kind, metric in metrics:
                child = metric.labels(model_name="tiny", engine="0")
                if kind == "counter":
                    child.inc(random.randint(1, 50))
                elif kind == "gauge":
                    child.set(random.random())
                else:
                    child.observe(random.random())

    threading.Thread(target=tick, daemon=True).start()
    return port


def _chart_rollout_metric_relabelings() -> list[dict]:
    """The chart's rollout PodMonitor `metricRelabelings`, as the Prometheus Operator writes them into the
    scrape config (camelCase keys to Prometheus' snake_case)."""
    helm = ROOT / ".tools" / "bin" / "helm"
    args = [
        str(helm),
        "template",
        "g2rpo",
        str(ROOT / "charts" / "g2rpo"),
        "--set",
        "monitoring.podMonitor.enabled=true",
    ]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    (monitor,) = [d for d in yaml.safe_load_all(rendered) if d and d["metadata"]["name"].endswith("-rollouts")]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{keys.get(k, k): v for k, v in rule.items()} for rule in endpoint["metricRelabelings"]]


def _start_operator(api_url: str, controller_port: int, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """`python -m g2rpo_operator` against the API at `api_url` (a kubeconfig, as outside a cluster)."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": api_url}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    metrics_port = _free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(tmp_path / "kubeconfig"),
        "G2RPO_STANDALONE": "true",
        "G2RPO_METRICS_PORT": str(metrics_port),
        "G2RPO_HEALTH_PORT": str(_free_port()),
        "G2RPO_RESYNC_SECONDS": "1",
        # the job's controller is the real one this test runs
        "G2RPO_CONTROLLER_URL_TEMPLATE": f"http://127.0.0.1:{controller_port}",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "g2rpo_operator"],
        env=env,
        stdout=open(tmp_path / "operator.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    return process, metrics_port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None


def _query(prometheus: str, expr: str) -> list[dict]:
    body = _get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body is not None, f"Prometheus did not answer {expr}"
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL) of every dashboard query, with Grafana's variables filled in."""
    board = json.loads(DASHBOARD.read_text())
    fill = {"$job": JOB, "$namespace": NAMESPACE, "$__rate_interval": RATE_INTERVAL}
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in fill.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unfilled variable in {expr}"
            queries.append((panel["title"], target.get("legendFormat", ""), expr))
    return queries


def _query_range(prometheus: str, expr: str, start: float, end: float) -> list[dict]:
    params = {"query": expr, "start": start, "end": end, "step": 1}
    body = _get(f"{prometheus}/api/v1/query_range?" + urllib.parse.urlencode(params))
    assert body is not None, f"Prometheus did not answer {expr}"
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _draw_panels(prometheus: str, start: float, end: float, folder: Path) -> list[Path]:
    """One PNG per dashboard panel: its queries' results over the run, titled and labelled like the panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(DASHBOARD.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fill = {"$job": JOB, "$namespace": NAMESPACE, "$__rate_interval": RATE_INTERVAL}
    panels = [p for p in board["panels"] if p.get("targets")]
    for number, panel in enumerate(panels, 1):
        figure, axes = plt.subplots(figsize=(6.4, 3.2), dpi=100)
        drawn = 0
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in fill.items():
                expr = expr.replace(variable, value)
            for series in _query_range(prometheus, expr, start, end):
                times = [float(t) - start for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                legend = re.sub(
                    r"\{\{(\w+)\}\}",
                    lambda m: series["metric"].get(m.group(1), ""),  # noqa: B023 (called at once, by re.sub)
                    target.get("legendFormat", ""),
                )
                style = "--" if legend in ("minLength", "maxLength") else "-"
                axes.plot(times, values, style, label=legend or expr[:40], linewidth=1.8)
                drawn += 1
        defaults = panel["fieldConfig"]["defaults"]
        axis = defaults.get("custom", {}).get("axisLabel") or defaults.get("unit", "")
        axes.set_title(panel["title"], fontsize=11)
        axes.set_xlabel("seconds since the run started")
        axes.set_xlim(0, end - start)  # one time axis for every panel, as on the dashboard
        unit = {"percentunit": "fraction", "s": "seconds"}.get(defaults.get("unit"), "")
        axes.set_ylabel(f"{axis} ({unit})" if unit else axis)
        if "min" in defaults or "max" in defaults:
            axes.set_ylim(defaults.get("min"), defaults.get("max"))
        if drawn:
            axes.legend(fontsize=8, loc="best")
        else:
            axes.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=axes.transAxes, color="gray")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        name = folder / f"{number:02d}-{re.sub(r'[^a-z0-9]+', '-', panel['title'].lower()).strip('-')}.png"
        figure.savefig(name)
        plt.close(figure)
        written.append(name)
    return written


def test_trainer_controller_prometheus(tiny_model_dir, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(tiny_cluster_job(tiny_model_dir, JOB, max_steps=4))
    prometheus_port = _free_port()
    prometheus = f"http://127.0.0.1:{prometheus_port}"
    processes: list[subprocess.Popen] = []
    stack = contextlib.ExitStack()
    try:
        service = stack.enter_context(controller_service(job_file, tmp_path, TOKEN))
        controller, controller_port = service.url, service.port

        from kmock_support import JOBS, PVCS, SECRETS, serving_in_thread

        api = stack.enter_context(serving_in_thread())
        emulator, api_url, on_api = api
        # Injected faults (see the docstring): the API server fails the operator's first create of
        # each of three kinds of children, so reconciles fail, back off, and succeed.
        for path in (
            "api/v1/namespaces/{ns}/configmaps",
            "api/v1/namespaces/{ns}/services",
            "apis/apps/v1/namespaces/{ns}/deployments",
        ):
            (
                emulator[f"post /{path.format(ns=NAMESPACE)}"][:1]
                << 500
                << {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "InternalError",
                    "message": "injected by tests/test_prometheus_e2e.py",
                    "code": 500,
                }
            )
        operator, operator_port = _start_operator(api_url, controller_port, tmp_path)
        processes.append(operator)
        # Prometheus scrapes through the whole run, so rates and the PNGs show the run as it went.
        target = {"targets": [f"127.0.0.1:{controller_port}"], "labels": {"namespace": NAMESPACE}}
        operator_target = {"targets": [f"127.0.0.1:{operator_port}"], "labels": {"namespace": "g2rpo-system"}}
        rollout_labels = {"namespace": NAMESPACE, "g2rpo_job": JOB}  # what the chart's relabelling adds
        rollout_target = {"targets": [f"127.0.0.1:{_vllm_stand_in(stack)}"], "labels": rollout_labels}
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "g2rpo-controller", "static_configs": [target]},
                {"job_name": "g2rpo-operator", "static_configs": [operator_target]},
                {
                    "job_name": "g2rpo-rollout",
                    "static_configs": [rollout_target],
                    "metric_relabel_configs": _chart_rollout_metric_relabelings(),
                },
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        processes.append(
            subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                stdout=open(tmp_path / "prometheus.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        _wait_for(lambda: _get(f"{prometheus}/-/ready"), 60, "Prometheus to start")
        _wait_for(lambda: _query(prometheus, f'g2rpo_step{{g2rpo_job="{JOB}"}}'), 60, "the first scrape")
        _wait_for(lambda: _query(prometheus, "g2rpo_operator_jobs"), 60, "the operator's first scrape")
        started = time.time()
        # The job is submitted once Prometheus watches, so that the dashboard sees the operator react.
        on_api(
            emulator.create_object(
                PVCS,
                NAMESPACE,
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "g2rpo-checkpoints"},
                    "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
                },
            )
        )
        # The controller token the operator would create: this controller's, so the operator can read it.
        on_api(
            emulator.create_object(
                SECRETS,
                NAMESPACE,
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": f"{JOB}-token"},
                    "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
                },
            )
        )
        on_api(
            emulator.create_object(
                JOBS,
                NAMESPACE,
                {
                    "apiVersion": "g2rpo.dev/v1alpha1",
                    "kind": "G2RPOJob",
                    "metadata": {"name": JOB, "namespace": NAMESPACE},
                    "spec": yaml.safe_load(job_file.read_text())["spec"]
                    | {"checkpoint": {"volumeClaim": "g2rpo-checkpoints"}},
                },
            )
        )

        def train() -> None:
            trainer = subprocess.run(
                [sys.executable, "-m", "g2rpo.train", "--job", str(job_file), "--run-dir", str(tmp_path / "run")],
                env={
                    **os.environ,
                    "G2RPO_CONTROLLER_URL": controller,
                    "G2RPO_CONTROLLER_TOKEN_FILE": str(tmp_path / "token"),
                    "CUDA_VISIBLE_DEVICES": "",
                },
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert trainer.returncode == 0, trainer.stderr[-4000:]

        train()
        checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
        saved = json.loads((checkpoint / "guidance_state.json").read_text())
        # The job is extended: the trainer resumes from checkpoint-4 and restores the controller to it.
        job_file.write_text(tiny_cluster_job(tiny_model_dir, JOB, max_steps=STEPS))
        train()
        request = urllib.request.Request(f"{controller}/v1/state", headers={"Authorization": f"Bearer {TOKEN}"})
        state = json.loads(urllib.request.urlopen(request, timeout=5).read())["snapshot"]
        assert state["state"]["step"] == STEPS
        assert state["state"]["rewards"][:4] == saved["state"]["rewards"]
        assert [e["event"] for e in state["events"]] == ["restore"]
        # A client without the token, twice, a few scrapes apart: the first 401 creates the series,
        # the second moves its rate (Prometheus cannot see a series' first increment).
        assert _get(f"{controller}/v1/state") is None
        time.sleep(3)
        assert _get(f"{controller}/v1/state") is None

        _wait_for(lambda: _query(prometheus, f'g2rpo_step{{g2rpo_job="{JOB}"}} == {STEPS}'), 60, "a scrape")
        _wait_for(
            lambda: _query(prometheus, f'g2rpo_http_requests_total{{g2rpo_job="{JOB}",status="401"}} == 2'),
            30,
            "the 401s to be scraped",
        )
        time.sleep(2)  # two more scrapes: every rate has its last sample
        finished = time.time()

        exposition = _get(f"{controller}/metrics").decode()
        families = re.findall(r"^# TYPE (g2rpo_\w+) (\w+)", exposition, flags=re.MULTILINE)
        assert len(families) >= 10
        for family, kind in families:
            if family in CODE_REWARD_ONLY:
                continue
            name = family + "_bucket" if kind == "histogram" else family
            found = _query(prometheus, f'{name}{{g2rpo_job="{JOB}"}}')
            assert found, f"{name} has no data in Prometheus"
        guided = _query(prometheus, f'g2rpo_accuracy_reward{{g2rpo_job="{JOB}",rollouts="guided"}}')
        assert guided, "the guided accuracy reward reached Prometheus"

        rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        assert set(PROBES) == {r["alert"] for r in rules}, "every alert needs a probe here"
        for rule in rules:
            for selector in re.findall(r"g2rpo_\w+(?:\{[^}]*\})?", PROBES[rule["alert"]]):
                assert selector in rule["expr"] or selector == "g2rpo_job", f"{selector} is not in {rule['alert']}"
            assert _query(prometheus, PROBES[rule["alert"]]), f"{rule['alert']}'s selectors match no series"
            _query(prometheus, rule["expr"])  # the real expression evaluates without error

        # Every dashboard query returns data over the run.
        for title, legend, expr in _dashboard_queries():
            result = _query_range(prometheus, expr, started, finished)
            assert result, f"dashboard panel {title!r} ({legend}): no data for {expr}"
            assert any(float(v) == float(v) for series in result for _, v in series["values"]), f"{title}: only NaN"
        results = {s["metric"]["result"] for s in _query(prometheus, "g2rpo_operator_reconciles_total")}
        assert results == {"ok", "error"}, results  # the injected 500s were retried, then reconciles went on
        errors = _query(prometheus, 'g2rpo_operator_errors_total{kind="api_retryable"}')
        assert errors and float(errors[0]["value"][1]) >= 2, errors  # a moving rate, not only a new series
        assert _query(prometheus, 'g2rpo_operator_jobs{phase="Pending"} == 1'), "the operator tracks the job"
        status = (emulator.stored(JOBS, NAMESPACE, JOB) or {}).get("status", {})
        assert status.get("phase") == "Pending", status  # written by the operator (KMock runs no pods)
        accuracy = _query(prometheus, f'g2rpo_accuracy_reward{{g2rpo_job="{JOB}", namespace="{NAMESPACE}"}}')
        assert {s["metric"]["rollouts"] for s in accuracy} == {"all", "guided", "unguided"}
        written = _draw_panels(
            prometheus, started, finished, DOCS if os.environ.get("G2RPO_WRITE_DOCS") else tmp_path / "png"
        )
        assert len(written) == sum(1 for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets"))

        def evaluated_rules():
            groups = json.loads(_get(f"{prometheus}/api/v1/rules"))["data"]["groups"]
            loaded = [r for g in groups for r in g["rules"]]
            return loaded if loaded and all(r.get("lastEvaluation", "").startswith("20") for r in loaded) else None

        loaded = _wait_for(evaluated_rules, 30, "rule evaluation")
        assert {r["name"] for r in loaded} == set(PROBES)
        assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded), loaded
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        stack.close()
