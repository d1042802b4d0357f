"""The Grafana dashboard (charts/g2rpo/dashboards/g2rpo.json): type-checked against Grafana's own
schema (`@grafana/schema` with `tsc --noEmit`, from `make tools`), and readable: a `job` variable
from `g2rpo_job`, the panels the issue lists, units and axis labels on every graph.

The dashboard is inlined in a .ts file as object literals typed `Dashboard`, and each panel
`satisfies Panel<Options, FieldConfig>` of its plugin (time series, stat) or `RowPanel`: TypeScript's excess
property checks then refuse unknown or misspelt keys and wrong types anywhere in them (importing
the .json file instead widens its types and checks almost nothing). Every PromQL expression is
run against a real Prometheus in tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "g2rpo" / "dashboards" / "g2rpo.json"
SCHEMA_DIR = ROOT / "tools" / "node"
VLLM_METRICS = ROOT / "tests" / "fixtures" / "vllm-metrics.json"
TSC = SCHEMA_DIR / "node_modules" / ".bin" / "tsc"
PANEL_TYPES = {
    "timeseries": "Panel<TimeSeriesOptions, TimeSeriesFieldConfig>",
    "stat": "Panel<StatOptions>",
    "row": "RowPanel",
}
# Grafana's schema types these fields as TypeScript string enums, which a JSON string literal cannot
# satisfy: the emitter writes the enum member with that value instead (an unknown value fails).
ENUM_FIELDS = {
    ("color", "mode"): "FieldColorModeId",
    ("thresholds", "mode"): "ThresholdsMode",
    ("custom", "drawStyle"): "GraphDrawStyle",
    ("custom", "showPoints"): "VisibilityMode",
    ("custom", "axisPlacement"): "AxisPlacement",
    ("legend", "displayMode"): "LegendDisplayMode",
    ("tooltip", "mode"): "TooltipDisplayMode",
    ("tooltip", "sort"): "SortOrder",
    ("options", "colorMode"): "BigValueColorMode",
    ("options", "graphMode"): "BigValueGraphMode",
    ("options", "textMode"): "BigValueTextMode",
    ("options", "justifyMode"): "BigValueJustifyMode",
    ("options", "orientation"): "VizOrientation",
}
ENUM_SOURCES = ("raw/dashboard/x/types.gen.d.ts", "common/common.gen.d.ts")
HEADER = (
    "import type { Dashboard, Panel, RowPanel } from '@grafana/schema';\n"
    f"import {{ {', '.join(sorted(set(ENUM_FIELDS.values())))} }} from '@grafana/schema';\n"
    "import type { Options as TimeSeriesOptions, FieldConfig as TimeSeriesFieldConfig }"
    " from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';\n"
    "import type { Options as StatOptions }"
    " from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';\n"
)
TSCONFIG = {
    "compilerOptions": {
        "strict": True,
        "noEmit": True,
        "module": "nodenext",
        "moduleResolution": "nodenext",
        "target": "es2022",
        "skipLibCheck": True,
        "types": [],
    },
    "files": ["dashboard.ts"],
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def enum_members(name: str) -> dict[str, str]:
    """value -> member of a string enum declared in @grafana/schema's dashboard types."""
    types = SCHEMA_DIR / "node_modules/@grafana/schema/dist/types"
    source = "".join((types / name).read_text() for name in ENUM_SOURCES)
    body = re.search(rf"export declare enum {name} {{(.*?)}}", source, re.S).group(1)
    return {value: member for member, value in re.findall(r'(\w+) = "([^"]*)"', body)}


def to_ts(value, path: tuple[str, ...] = ()) -> str:
    """The JSON value as a TypeScript literal, with enum-typed fields written as enum members."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {to_ts(v, (*path, k))}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_ts(v, path) for v in value) + "]"
    enum = ENUM_FIELDS.get(path[-2:])
    if enum and isinstance(value, str):
        members = enum_members(enum)
        return f"{enum}.{members[value]}" if value in members else json.dumps(value)  # unknown: tsc refuses it
    return json.dumps(value)


def typecheck(board: dict, folder: Path) -> subprocess.CompletedProcess:
    """`tsc --noEmit` on the dashboard as typed literals; the folder sits beside node_modules."""
    panels = []
    body = ""
    for number, panel in enumerate(board["panels"]):
        body += f"const panel{number} = {to_ts(panel)} satisfies {PANEL_TYPES[panel['type']]};\n"
        panels.append(f"panel{number}")
    rest = {key: value for key, value in board.items() if key != "panels"}
    body += f"export const dashboard: Dashboard = {{ ...{to_ts(rest)}, panels: [{', '.join(panels)}] }};\n"
    (folder / "dashboard.ts").write_text(HEADER + body)
    (folder / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    return subprocess.run([str(TSC), "-p", str(folder)], capture_output=True, text=True, timeout=300)


@pytest.fixture
def scratch():
    """A folder inside tools/node, so that the .ts file resolves its node_modules."""
    folder = SCHEMA_DIR / ".check"
    folder.mkdir(exist_ok=True)
    yield folder
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


@pytest.mark.skipif(not TSC.exists(), reason="`make tools` installs @grafana/schema and typescript")
def test_dashboard_type_checks_against_grafana_schema(scratch):
    done = typecheck(dashboard(), scratch)
    assert done.returncode == 0, done.stdout + done.stderr
    # The check can fail: a misspelt key and a wrong type are both refused.
    broken = copy.deepcopy(dashboard())
    broken["panels"][1]["fieldConfig"]["defaults"]["unti"] = "s"
    broken["panels"][2]["gridPos"]["h"] = "8"
    done = typecheck(broken, scratch)
    assert done.returncode != 0
    assert (
        "'\"unti\"' does not exist" in done.stdout and "Type 'string' is not assignable to type 'number'" in done.stdout
    )


def test_job_variable_and_every_query_filtered_by_it():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["job"]["query"]["query"].endswith(", g2rpo_job)")
    assert variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            if "g2rpo_operator_" not in target["expr"]:  # the operator is per install, not per job
                assert 'g2rpo_job=~"$job"' in target["expr"], (panel["title"], target["expr"])


def test_panels_cover_the_training_signals_with_units_and_axis_labels():
    board = dashboard()
    graphs = [p for p in board["panels"] if p["type"] == "timeseries"]
    titles = {p["title"] for p in board["panels"]}
    assert {
        "Accuracy reward",
        "Guidance length l_k",
        "Reward mean and std",
        "Advantage std",
        "Zero-variance groups",
        "Step rate",
        "Tokens decoded per second",
        "Completion length",
        "Controller request latency",
        "Controller errors",
        "Reconciles by result",
        "Reconcile errors by kind",
    } <= titles
    for panel in graphs:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] and defaults["custom"]["axisLabel"], panel["title"]
        assert panel["description"], panel["title"]
    accuracy = next(p for p in graphs if p["title"] == "Accuracy reward")
    assert accuracy["targets"][0]["legendFormat"] == "{{rollouts}}"  # all / guided / unguided
    length = next(p for p in graphs if p["title"] == "Guidance length l_k")
    assert [re.match(r"\w+", t["expr"]).group() for t in length["targets"]] == [
        "g2rpo_guidance_length_tokens",
        "g2rpo_guidance_min_length_tokens",
        "g2rpo_guidance_max_length_tokens",
    ]
    # No two panels overlap on Grafana's 24-column grid.
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, panel["title"]
        cells |= mine


def test_rollout_row_reads_the_metrics_vllm_exports_by_their_exposed_names():
    """The rollout row's queries name only metrics that vLLM 0.31 registers (tests/fixtures/vllm-metrics.json,
    read from the wheel's vllm/v1/metrics/loggers.py by tools/vllm_metrics.py), each with the suffix its
    type gets in the exposition: prometheus_client exposes a Counter `x` as `x_total` and a Histogram's
    buckets as `x_bucket`; a gauge keeps its name."""
    exported = {m["name"]: m["type"] for m in json.loads(VLLM_METRICS.read_text())["metrics"]}
    board = dashboard()
    start = next(i for i, p in enumerate(board["panels"]) if p["title"] == "Rollout (vLLM)")
    row = board["panels"][start + 1 :]
    assert {p["title"] for p in row} == {
        "Generation throughput",
        "KV-cache usage",
        "Requests running and waiting",
        "Prefix-cache hit rate",
        "Request latency",
    }
    suffix = {"counter": "_total", "histogram": "_bucket", "gauge": ""}
    used = set()
    for panel in row:
        for target in panel["targets"]:
            names = re.findall(r"vllm:\w+", target["expr"])
            assert names, (panel["title"], target["expr"])
            for name in names:
                base = next((n for n in exported if name == n + suffix[exported[n]]), None)
                assert base, f"{panel['title']}: {name} is not a series vLLM 0.31 exposes"
                used.add(base)
    assert {"vllm:generation_tokens", "vllm:kv_cache_usage_perc", "vllm:num_requests_running"} <= used
    assert {"vllm:num_requests_waiting", "vllm:prefix_cache_hits", "vllm:e2e_request_latency_seconds"} <= used
