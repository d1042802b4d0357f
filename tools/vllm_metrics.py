"""Record the Prometheus metrics vLLM's server exports, read from the pinned vLLM wheel's own source.

The rollout pod runs `trl vllm-serve`, which in TRL 1.16 execs `vllm serve` (trl/scripts/vllm_serve.py,
`main`), vLLM's OpenAI-compatible server: it serves `GET /metrics` on its HTTP port
(vllm/entrypoints/serve/instrumentator/metrics.py, `attach_router`), and its V1 engine registers the
engine metrics in vllm/v1/metrics/loggers.py (`PrometheusStatLogger`, on unless
`--disable-log-stats`). vLLM cannot be installed next to the CPU stack (it pins transformers<5.18 and
CUDA wheels), so this script downloads the wheel alone (`pip download --no-deps`, ~320 MB, seconds
from PyPI), reads loggers.py with `ast` (never imports it) and writes every
`self._{gauge,counter,histogram}_cls(name="vllm:...")` call it finds, with its type, help text,
labels and line, to tests/fixtures/vllm-metrics.json. The dashboard's rollout row and the test's
vLLM stand-in are checked against that file (tests/test_dashboard.py, tests/test_prometheus_e2e.py).

    .venv/bin/python tools/vllm_metrics.py            # rewrite the fixture from the pinned wheel
    .venv/bin/python tools/vllm_metrics.py --wheel W  # from a wheel already on disk
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "vllm-metrics.json"
VLLM = "vllm==0.31.0"  # pyproject.toml's `vllm` extra and constraints/trainer-cuda.txt pin the same
SOURCE = "vllm/v1/metrics/loggers.py"
PER_ENGINE = ["model_name", "engine"]
PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.12"]
KINDS = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}


def download(folder: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            *PLATFORM,
            VLLM,
            "-d",
            folder,
        ],
        check=True,
    )
    return next(folder.glob("vllm-*.whl"))


def _constant(node: ast.expr | None) -> object:
    """A literal (or a parenthesised concatenation of string literals); None when computed at run time."""
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None


def metrics(source: str) -> list[dict[str, object]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in KINDS):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        name = _constant(keywords.get("name"))
        if not isinstance(name, str) or not name.startswith("vllm:"):
            continue
        labels = keywords.get("labelnames")
        found.append(
            {
                "name": name,
                "type": KINDS[node.func.attr],
                "help": _constant(keywords.get("documentation")),
                # `labelnames=labelnames` is the per-engine pair PrometheusStatLogger sets first; other
                # label lists are computed (e.g. + ["finished_reason"]) and recorded as None.
                "labels": PER_ENGINE if isinstance(labels, ast.Name) and labels.id == "labelnames" else None,
                "line": node.lineno,
            }
        )
    return sorted(found, key=lambda m: m["line"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="a vLLM wheel on disk (default: download the pinned one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read(SOURCE).decode()
    found = metrics(source)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps({"vllm": VLLM, "source": SOURCE, "metrics": found}, indent=1) + "\n")
    print(f"{FIXTURE.relative_to(ROOT)}: {len(found)} metrics from {wheel.name}:{SOURCE}")


if __name__ == "__main__":
    main()
