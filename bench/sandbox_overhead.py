"""Per-program cost of the code reward's sandbox against a bare `python -c` run (never run as a test).

    .venv/bin/python bench/sandbox_overhead.py [--repetitions 30] [--program "print(sum(range(1000)))"]

Runs the same small program, interleaved so that machine load hits both alike: once as
`sys.executable -c PROGRAM` (subprocess.run, output captured) and once through
`g2rpo.rewards.sandbox.run_python` (every layer this machine allows, as the trainer runs it).
Prints the median wall time of each and their ratio, then the median setup cost of each layer
inside the child, as its layer probe reports it. The one-off layer probe runs before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from g2rpo.rewards import sandbox


def _bare(program: str) -> float:
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"the bare run failed: {completed.stderr.decode()}")
    return elapsed


def _sandboxed(program: str) -> float:
    started = time.perf_counter()
    result = sandbox.run_python(program, timeout_s=30.0, memory_mb=512)
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"the sandboxed run failed: {result.reason}: {result.stderr}")
    return elapsed


def _setup_ms() -> dict[str, float]:
    config = {"drop_to": None, "probe": True}
    if sandbox.sandbox_layers()["uid_drop"]:
        config["drop_to"] = [sandbox.UNPRIVILEGED_ID, sandbox.UNPRIVILEGED_ID]
    result = sandbox._run_child("", config, timeout_s=30.0, memory_mb=512, max_output_bytes=65536)
    return json.loads(result.stdout)["setup_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=30, help="runs of each kind, interleaved")
    parser.add_argument("--program", default="print(sum(i * i for i in range(1000)))", help="the program run")
    args = parser.parse_args()
    layers = sandbox.sandbox_layers()
    print("layers:", ", ".join(f"{name}={'on' if active else 'off'}" for name, active in layers.items()))
    for reason in sandbox.sandbox_layer_gaps().values():
        print("  off:", reason)
    _bare(args.program), _sandboxed(args.program)  # warm the page cache for both
    bare, sandboxed, setups = [], [], []
    for _ in range(args.repetitions):
        bare.append(_bare(args.program))
        sandboxed.append(_sandboxed(args.program))
        setups.append(_setup_ms())
    bare_ms, sandboxed_ms = statistics.median(bare) * 1000, statistics.median(sandboxed) * 1000
    print(f"bare python -c:  median {bare_ms:7.1f} ms over {args.repetitions} runs")
    print(f"sandboxed:       median {sandboxed_ms:7.1f} ms over {args.repetitions} runs")
    print(f"ratio sandboxed / bare: {sandboxed_ms / bare_ms:.2f}")
    print(
        "setup inside the child (median ms):",
        ", ".join(f"{step} {statistics.median(setup[step] for setup in setups):.2f}" for step in setups[0]),
    )


if __name__ == "__main__":
    main()
