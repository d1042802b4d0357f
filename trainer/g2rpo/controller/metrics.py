"""What the controller knows, as Prometheus metrics (documented in docs/metrics.md).

Every family is named `g2rpo_*` and carries a `g2rpo_job` label: the G2RPOJob's name (not `job`,
which Prometheus sets to the scrape job's name).

Each app has its own registry rather than prometheus-client's global one, so that several
controllers (tests, benchmarks) can live in one process, and /metrics shows only this job.

`REPORT_METRICS` is the one list of per-step statistics the trainer may report: the service
validates reports against it and this module exports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from g2rpo.controller.core import GuidanceController, StepRecord


@dataclass(frozen=True)
class ReportMetric:
    """A per-step statistic the trainer reports, with the range a valid value lies in."""

    low: float
    high: float
    help: str


REPORT_METRICS: dict[str, ReportMetric] = {
    "accuracy": ReportMetric(0.0, 1.0, "mean accuracy reward over all roll-outs of the step"),
    "accuracy_guided": ReportMetric(0.0, 1.0, "mean accuracy reward of the guided roll-outs (absent when alpha=0)"),
    "accuracy_unguided": ReportMetric(0.0, 1.0, "mean accuracy reward of the unguided roll-outs (absent when alpha=1)"),
    "reward_mean": ReportMetric(-math.inf, math.inf, "mean of the weighted total reward"),
    "reward_std": ReportMetric(0.0, math.inf, "standard deviation of the total reward"),
    "advantage_std": ReportMetric(0.0, math.inf, "standard deviation of the advantages (paper Fig. 5b)"),
    "zero_std_groups": ReportMetric(0.0, 1.0, "fraction of groups whose rewards are all equal (no gradient)"),
    "guidance_length": ReportMetric(0.0, math.inf, "guidance length the step used, in tokens"),
    "guided_fraction": ReportMetric(0.0, 1.0, "fraction of roll-outs that were guided"),
    "guided_groups": ReportMetric(0.0, 1.0, "fraction of groups with a guided roll-out (guidance.groups)"),
    "completion_length": ReportMetric(0.0, math.inf, "mean completion length, in tokens"),
    "decoded_tokens": ReportMetric(0.0, math.inf, "tokens decoded during the step"),
}

SANDBOX_LAYERS = ("landlock", "seccomp", "uid_drop", "netns", "rlimits", "audit_hook")
"""The code reward's sandbox layers (g2rpo.rewards.sandbox.sandbox_layers); jobs with a code reward
report each as `sandbox_<layer>`: 1 when it walls programs in on the trainer's node, 0 when missing."""
REPORT_METRICS.update(
    {
        f"sandbox_{layer}": ReportMetric(0.0, 1.0, f"1 when the code sandbox's {layer} layer holds")
        for layer in SANDBOX_LAYERS
    }
)


def sandbox_layers(metrics: dict[str, float]) -> dict[str, bool] | None:
    """Which of the sandbox's layers hold, from a step's report; None when it reported none."""
    layers = {layer: metrics[f"sandbox_{layer}"] >= 1 for layer in SANDBOX_LAYERS if f"sandbox_{layer}" in metrics}
    return layers or None


#: Latency buckets around the service's target (p99 under 5 ms).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

PREFIX = "g2rpo_"


class ControllerMetrics:
    """The controller's metric families, bound to one job."""

    def __init__(self, job: str):
        self.job = job
        self.registry = CollectorRegistry()
        # Labelled children by (family, label values): `labels()` takes a lock and builds a key on
        # every call, a tenth of a report's server time without this cache.
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self._schedule: str | None = None
        r, j = self.registry, ["g2rpo_job"]

        def gauge(name: str, doc: str, labels: list[str] = j) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        self.guidance_length = gauge(
            "guidance_length_tokens", "Guidance length l_k for the next step, in tokens."
        ).labels(job)
        self.min_length = gauge("guidance_min_length_tokens", "Lower bound of the guidance length (minLength).").labels(
            job
        )
        self.max_length = gauge("guidance_max_length_tokens", "Upper bound of the guidance length (maxLength).").labels(
            job
        )
        self.schedule = gauge("schedule_info", "The guidance schedule in force (value 1).", ["g2rpo_job", "schedule"])
        self.step = gauge("step", "Steps completed (the number of the step the controller expects next).").labels(job)
        # Per-step series are created by their first value: an unset series would read 0 (a
        # "guided accuracy" for a job without guided roll-outs, a last report at 1970).
        self.schedule_reward = gauge(
            "schedule_reward", "r_k: the reward mean that drove the schedule at the last step."
        )
        accuracy = gauge(
            "accuracy_reward", "Mean accuracy reward of the last step, by roll-out kind.", ["g2rpo_job", "rollouts"]
        )
        self.step_gauges: dict[str, tuple[Gauge, tuple[str, ...]]] = {
            "accuracy": (accuracy, (job, "all")),
            "accuracy_guided": (accuracy, (job, "guided")),
            "accuracy_unguided": (accuracy, (job, "unguided")),
            "reward_mean": (gauge("reward_mean", "Mean weighted total reward of the last step."), (job,)),
            "reward_std": (gauge("reward_std", "Standard deviation of the total reward at the last step."), (job,)),
            "advantage_std": (gauge("advantage_std", "Standard deviation of the advantages at the last step."), (job,)),
            "zero_std_groups": (
                gauge("zero_std_group_fraction", "Fraction of the last step's groups whose rewards are all equal."),
                (job,),
            ),
            "guided_fraction": (
                gauge("guided_fraction", "Fraction of the last step's roll-outs that were guided."),
                (job,),
            ),
            "guided_groups": (
                gauge("guided_group_fraction", "Fraction of the last step's groups with a guided roll-out."),
                (job,),
            ),
            "completion_length": (
                gauge("completion_length_tokens", "Mean completion length of the last step, in tokens."),
                (job,),
            ),
        }
        sandbox = gauge(
            "sandbox_layer_active",
            "Code reward jobs: 1 when the sandbox layer walls model-written programs in, 0 when the node or the "
            "pod's security policy does not allow it.",
            ["g2rpo_job", "layer"],
        )
        self.step_gauges.update({f"sandbox_{layer}": (sandbox, (job, layer)) for layer in SANDBOX_LAYERS})
        self.decoded_tokens = Counter(
            PREFIX + "decoded_tokens", "Tokens decoded by the trainer, summed over new step reports.", j, registry=r
        )
        self.last_report = gauge("last_report_timestamp_seconds", "Unix time of the last new step report.")
        self.reports = Counter(
            PREFIX + "step_reports",
            "Step reports by outcome (accepted, duplicate, conflict, invalid).",
            ["g2rpo_job", "outcome"],
            registry=r,
        )
        self.events = Counter(
            PREFIX + "controller_events", "Rewinds, overrides and restores.", ["g2rpo_job", "event"], registry=r
        )
        self.requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests by route, method and status.",
            ["g2rpo_job", "route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request latency by route and method.",
            ["g2rpo_job", "route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _child(self, family: MetricWrapperBase, *labels: str) -> Any:
        child = self._children.get((family, labels))
        if child is None:
            child = self._children[(family, labels)] = family.labels(*labels)
        return child

    def observe_state(self, controller: GuidanceController) -> None:
        """The schedule's position: after loading, a report, a rewind, an override or a restore."""
        params = controller.params
        self.guidance_length.set(controller.length)
        self.min_length.set(params.min_length)
        self.max_length.set(params.max_length)
        self.step.set(controller.step)
        if params.schedule != self._schedule:
            if self._schedule is not None:
                self.schedule.remove(self.job, self._schedule)
                del self._children[(self.schedule, (self.job, self._schedule))]
            self._child(self.schedule, self.job, params.schedule).set(1)
            self._schedule = params.schedule

    def observe_step(self, record: StepRecord, new: bool) -> None:
        """A step's statistics; `new` is False when re-exporting the last one after a restart."""
        self._child(self.schedule_reward, self.job).set(record.reward)
        for name, value in record.metrics.items():
            if name in self.step_gauges:
                family, labels = self.step_gauges[name]
                self._child(family, *labels).set(value)
        if new and "decoded_tokens" in record.metrics:
            self._child(self.decoded_tokens, self.job).inc(record.metrics["decoded_tokens"])
        self._child(self.last_report, self.job).set(record.reported_at)

    def count_report(self, outcome: str) -> None:
        self._child(self.reports, self.job, outcome).inc()

    def count_event(self, event: str) -> None:
        self._child(self.events, self.job, event).inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._child(self.requests, self.job, route, method, str(status)).inc()
        self._child(self.latency, self.job, route, method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
