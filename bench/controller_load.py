"""Load benchmark of the controller service on loopback (never run as a test).

    .venv/bin/python bench/controller_load.py [--rate 1000] [--concurrency 16] [--duration 5]

Starts `python -m g2rpo.controller` as a subprocess with a journal in a temporary directory
(fsync on every report, as in production), then drives it open-loop at a fixed target rate
through `--concurrency` client connections, and prints one row per workload:

- report:   POST /v1/steps with new steps 0, 1, 2, ... A job's steps form one chain (the
            controller rejects a step from the future), so step k leaves only once k-1 has been
            acknowledged: one sender, as from a trainer's rank 0, whatever --concurrency says; the
            rate it sustains is bounded by one report's latency, fsync included.
- guidance: GET /v1/guidance, truly concurrent (the reads rank 0, dashboards and the operator do).

Latency is measured per request from send to answer (p50, p99, max), and for p99 also from the
request's scheduled time, which adds any wait behind a slow predecessor (no coordinated
omission). Target: p99 under 5 ms at 1,000 reports/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

TOKEN = "bench-token"
PARAMS = {"schedule": "adaptive", "initialLength": 1024, "minLength": 1, "maxLength": 4096, "window": 2}
STATS = {
    "accuracy": 0.5,
    "accuracy_guided": 0.6,
    "accuracy_unguided": 0.45,
    "reward_mean": 0.55,
    "reward_std": 0.3,
    "advantage_std": 0.9,
    "zero_std_groups": 0.1,
    "guidance_length": 1024.0,
    "guided_fraction": 0.25,
    "completion_length": 800.0,
    "decoded_tokens": 98304.0,
}


@dataclass
class Phase:
    name: str
    count: int
    service: list[float] = field(default_factory=list)  # send -> answer, seconds
    scheduled: list[float] = field(default_factory=list)  # scheduled send time -> answer
    errors: int = 0
    elapsed: float = 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def run_phase(session: aiohttp.ClientSession, url: str, phase: Phase, rate: float, concurrency: int) -> None:
    """Open loop: request i is due at start + i/rate; `concurrency` workers send them."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ordered = phase.name == "report"
    acked = [asyncio.Event() for _ in range(phase.count)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(phase.count):
        queue.put_nowait(i)
    start = time.perf_counter()

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if ordered and i:
                await acked[i - 1].wait()
            sent = time.perf_counter()
            try:
                if ordered:
                    body = {"step": i, "reward": 0.3 + 0.4 * ((i * 7919) % 100) / 100, "metrics": STATS}
                    request = session.post(url + "/v1/steps", json=body, headers=headers)
                else:
                    request = session.get(url + "/v1/guidance", headers=headers)
                async with request as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            done = time.perf_counter()
            acked[i].set()
            if ok:
                phase.service.append(done - sent)
                phase.scheduled.append(done - due)
            else:
                phase.errors += 1

    # A chain has one report in flight at a time, as from a trainer's rank 0: one sender, so the
    # measurement is not the cost of handing the next step between client tasks.
    await asyncio.gather(*(worker() for _ in range(1 if ordered else concurrency)))
    phase.elapsed = time.perf_counter() - start


async def drive(url: str, rate: float, concurrency: int, duration: float, workloads: list[str]) -> list[Phase]:
    phases = [Phase(name, count=int(rate * duration)) for name in workloads]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        warmup = Phase("guidance", count=200)
        await run_phase(session, url, warmup, rate, concurrency)
        for phase in phases:
            await run_phase(session, url, phase, rate, concurrency)
    return phases


def disk_probe(directory: Path, n: int = 500) -> tuple[float, float]:
    """p50 and p99 (ms) of a 500-byte append + fdatasync in `directory`: the journal's floor."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    times = []
    try:
        for _ in range(n):
            start = time.perf_counter()
            os.write(fd, b"x" * 499 + b"\n")
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return pct(times, 0.5), pct(times, 0.99)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the controller exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"the controller was not ready in 30 s:\n{log.read_text()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="target requests per second (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="client connections (default: %(default)s)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per workload (default: %(default)s)")
    p.add_argument("--workloads", default="report,guidance", help="comma-separated: report, guidance")
    p.add_argument(
        "--state-dir", type=Path, help="journal directory (default: a temporary one; put it on the disk to test)"
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="g2rpo-bench-") as tmp:
        state_dir = args.state_dir or Path(tmp) / "state"
        probe = disk_probe(state_dir)
        (Path(tmp) / "token").write_text(TOKEN)
        port, log = free_port(), Path(tmp) / "controller.log"
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "g2rpo.controller", "--job", "bench", "--params", json.dumps(PARAMS)]
        command += ["--state-dir", str(state_dir), "--token-file", str(Path(tmp) / "token"), "--log-level", "warning"]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, proc, log)
            phases = asyncio.run(drive(url, args.rate, args.concurrency, args.duration, args.workloads.split(",")))
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    print(
        f"controller on loopback, journal fsync'ed per report; target {args.rate:g}/s, "
        f"concurrency {args.concurrency}, {args.duration:g} s per workload, {os.cpu_count()} CPUs"
    )
    print(f"append + fdatasync in the state directory alone: p50 {probe[0]:.2f} ms, p99 {probe[1]:.2f} ms\n")
    widths = {"workload": 10, "requests": 8, "errors": 6, "req/s": 6, "p50 ms": 7, "p99 ms": 7, "max ms": 7}
    widths["p99 from schedule ms"] = 20
    print(" ".join(name.rjust(width) for name, width in widths.items()))
    for ph in phases:
        row = [ph.name, ph.count, ph.errors, f"{len(ph.service) / ph.elapsed:.0f}", f"{pct(ph.service, 0.5):.2f}"]
        row += [f"{pct(ph.service, 0.99):.2f}", f"{max(ph.service) * 1000:.2f}", f"{pct(ph.scheduled, 0.99):.2f}"]
        print(" ".join(str(value).rjust(width) for value, width in zip(row, widths.values(), strict=True)))
    return 1 if any(ph.errors for ph in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
