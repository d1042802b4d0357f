"""Benchmark: reconcile latency and memory of the operator for N G2RPOJobs on KMock.

    .venv/bin/python bench/operator_reconcile.py [--jobs 100] [--resync SECONDS] [--steady 120]

The operator runs as it does in its pod: `python -m g2rpo_operator` in its own process, configured
through G2RPO_* variables and a kubeconfig, so its memory and CPU are its own. The API server is
KMock (tests/kmock_support.py) in this process. Reported:
- latency per job, from the job's POST to all its children stored (the benchmark plays the
  Deployment and Job controllers: the trainer Job comes once the rollout is Available), and to its
  first status write;
- the operator's reconcile pass duration (its own histogram) and the API calls it made;
- resident memory before the jobs and with all of them, and CPU in the steady state (resync only);
- API requests per job per minute in the steady state (nothing changes): the cost of keeping watch.
KMock is single-threaded Python sharing the machine with the operator: here it, not the operator,
bounds the latencies (a real API server answers GETs from its watch cache in well under 1 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kmock_support import BATCH_JOBS, CHILD_RESOURCES, DEPLOYMENTS, JOBS, PVCS, free_port, new_emulator, serving  # noqa: E402
from operator_fixtures import NAMESPACE, job_manifest  # noqa: E402

CHILDREN_PER_JOB = 11
"""ConfigMap, Secret, 3 NetworkPolicies, 3 Services, 2 Deployments, the trainer Job (created last)."""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kubeconfig(url: str, folder: Path) -> Path:
    path = folder / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{url}"}}}}]
users: [{{name: bench, user: {{token: bench}}}}]
contexts: [{{name: kmock, context: {{cluster: kmock, user: bench, namespace: {NAMESPACE}}}}}]
current-context: kmock
"""
    )
    return path


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the operator exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("the operator did not become healthy")


async def make_available(emulator, name: str) -> None:
    generation = emulator.stored(DEPLOYMENTS, NAMESPACE, name)["metadata"]["generation"]
    status = {"observedGeneration": generation, "updatedReplicas": 1, "availableReplicas": 1}
    await emulator.patch_object(DEPLOYMENTS, NAMESPACE, name, {"status": status}, status=True)


def operator_requests(emulator) -> int:
    """Requests served to anyone but KMock's own client (the benchmark's writes): the operator's."""
    return sum(count for agent, count in emulator.served.items() if agent != "kmock")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(jobs: int, resync: float | None, steady: float, settle: float) -> None:
    emulator = new_emulator()
    emulator.record_requests = False
    async with serving(emulator) as url:
        with tempfile.TemporaryDirectory() as folder:
            metrics_port, health_port = free_port(), free_port()
            env = {
                **os.environ,
                "KUBECONFIG": str(kubeconfig(url, Path(folder))),
                "G2RPO_STANDALONE": "true",
                **({"G2RPO_RESYNC_SECONDS": str(resync)} if resync is not None else {}),
                "G2RPO_METRICS_PORT": str(metrics_port),
                "G2RPO_HEALTH_PORT": str(health_port),
                "G2RPO_CONTROLLER_URL_TEMPLATE": "http://127.0.0.1:9",
            }
            log = open(Path(folder) / "operator.log", "w")
            process = subprocess.Popen(
                [sys.executable, "-m", "g2rpo_operator"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                try:
                    await wait_healthy(health_port, process)
                except RuntimeError:
                    log.flush()
                    print((Path(folder) / "operator.log").read_text()[-30000:], file=sys.stderr)
                    raise
                await asyncio.sleep(1)
                idle_rss = rss_mib(process.pid)
                claim = {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "g2rpo-checkpoints"},
                    "spec": {"accessModes": ["ReadWriteMany"]},
                    "status": {"phase": "Bound", "accessModes": ["ReadWriteMany"]},
                }
                await emulator.create_object(PVCS, NAMESPACE, claim)
                names = [f"job-{i:03d}" for i in range(jobs)]
                posted: dict[str, float] = {}
                children_at: dict[str, float] = {}
                available: set[str] = set()
                status_at: dict[str, float] = {}
                start = time.monotonic()
                for name in names:
                    posted[name] = time.monotonic()
                    await emulator.create_object(JOBS, NAMESPACE, job_manifest(name))
                deadline = time.monotonic() + 120
                while len(children_at) < jobs or len(status_at) < jobs:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"converged {len(children_at)}/{jobs} jobs in 120 s")
                    now = time.monotonic()
                    counts: dict[str, int] = {}
                    phases: set[str] = set()
                    for (res, _, name), obj in emulator.objects.items():  # no copies: keep KMock responsive
                        if obj.deleted:
                            continue
                        if res in CHILD_RESOURCES:
                            owner = name.rsplit("-", 1)[0]
                            counts[owner] = counts.get(owner, 0) + 1
                        elif res == JOBS and (obj.get("status") or {}).get("phase"):
                            phases.add(name)
                    for name in names:
                        if name not in available and counts.get(name) == CHILDREN_PER_JOB - 1:
                            available.add(name)  # play the Deployment controller: the gang may start
                            for component in ("controller", "rollout"):
                                await make_available(emulator, f"{name}-{component}")
                        if name not in children_at and counts.get(name) == CHILDREN_PER_JOB:
                            children_at[name] = now
                            ready = {"status": {"active": 2, "ready": 2}}  # and the Job controller: all ranks ready
                            await emulator.patch_object(BATCH_JOBS, NAMESPACE, f"{name}-trainer", ready, status=True)
                        if name not in status_at and name in phases:
                            status_at[name] = now
                    await asyncio.sleep(0.05)
                converged = time.monotonic() - start
                loaded_rss = rss_mib(process.pid)
                await asyncio.sleep(settle)  # let the passes the creations triggered finish
                cpu_before = cpu_seconds(process.pid)
                before = scrape(metrics_port)
                served_before = operator_requests(emulator)
                await asyncio.sleep(steady)
                cpu_steady = cpu_seconds(process.pid) - cpu_before
                steady_requests = operator_requests(emulator) - served_before
                after = scrape(metrics_port)
                steady_rss = rss_mib(process.pid)
            finally:
                process.terminate()
                try:  # off the loop: KMock (on this loop) must keep answering while the operator stops
                    await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    print((Path(folder) / "operator.log").read_text()[-5000:], file=sys.stderr)
                    raise
                log.close()
            api_calls = operator_requests(emulator)

    child_latency = [children_at[n] - posted[n] for n in names]
    status_latency = [status_at[n] - posted[n] for n in names]
    passes = after["g2rpo_operator_reconcile_seconds_count"] - before["g2rpo_operator_reconcile_seconds_count"]
    pass_time = after["g2rpo_operator_reconcile_seconds_sum"] - before["g2rpo_operator_reconcile_seconds_sum"]
    resync_text = "the operator's default" if resync is None else f"{resync:g} s"
    print(f"jobs: {jobs}, resync: {resync_text}, steady state measured over {steady:g} s, {os.cpu_count()} CPUs")
    for label, values in (("POST -> all children", child_latency), ("POST -> first status", status_latency)):
        p50, p95, top = statistics.median(values), percentile(values, 0.95), max(values)
        print(f"{label:22s} p50 {p50 * 1000:7.0f} ms   p95 {p95 * 1000:7.0f} ms   max {top * 1000:7.0f} ms")
    print(f"all {jobs} jobs converged in {converged:.2f} s")
    if passes:
        print(f"steady-state reconcile pass: {pass_time / passes * 1000:.1f} ms mean over {passes:.0f} passes")
    print(f"steady-state CPU: {cpu_steady / steady * 100:.1f} % of one core")
    print(
        f"operator RSS: {idle_rss:.0f} MiB idle, {loaded_rss:.0f} MiB with {jobs} jobs, "
        f"{steady_rss:.0f} MiB after {steady:g} s ({(steady_rss - idle_rss) * 1024 / jobs:.0f} KiB per job)"
    )
    print(f"API requests by the operator (kopf + reconciler): {api_calls}")
    per_job_minute = steady_requests / jobs / (steady / 60)
    print(
        f"steady state (nothing changes): {steady_requests} API requests in {steady:g} s = "
        f"{per_job_minute:.2f} requests per job per minute"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--steady", type=float, default=120.0, help="seconds of steady state to measure")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait after convergence first")
    parser.add_argument("--resync", type=float, default=None, help="G2RPO_RESYNC_SECONDS (default: the operator's)")
    args = parser.parse_args()
    asyncio.run(bench(args.jobs, args.resync, args.steady, args.settle))


if __name__ == "__main__":
    main()
