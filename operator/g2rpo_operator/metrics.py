"""The operator's own Prometheus metrics, on their own registry and port.

Reconcile counts and durations by trigger (start: a job's first pass; watch: a child, claim or
spec event; poll: a running job's cache-only pass; resync: the periodic full read) and result,
API/controller errors by kind, and jobs by phase (a gauge recomputed from the phases the operator last wrote). An own registry keeps several
operators in one process (tests) apart and leaves the default process collectors out.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from g2rpo.api.status import Phase

PHASES: tuple[Phase, ...] = ("Pending", "Running", "Suspended", "Succeeded", "Failed")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "g2rpo_operator_reconciles_total", "Reconcile passes.", ["trigger", "result"], registry=self.registry
        )
        self.errors = Counter(
            "g2rpo_operator_errors_total",
            "Failed reconcile passes by error kind; refused: a pass whose write of a child the API server refused.",
            ["kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "g2rpo_operator_reconcile_seconds",
            "Duration of a reconcile pass.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.jobs = Gauge("g2rpo_operator_jobs", "G2RPOJobs by phase.", ["phase"], registry=self.registry)
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            self.jobs.labels(phase).set(0)

    def observe_phase(self, key: str, phase: str | None) -> None:
        """Record a job's phase (None: the job is gone) and refresh the per-phase gauge."""
        with self._lock:
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            counts = Tally(self._phases.values())
            for name in PHASES:
                self.jobs.labels(name).set(counts.get(name, 0))

    def tracked_jobs(self) -> int:
        with self._lock:
            return len(self._phases)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0 picks a free one); returns the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_port
