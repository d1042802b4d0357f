"""`g2rpo run FILE`: the job on this machine: CPU or one GPU, transformers generation, the guidance
controller in process (the same GuidanceController that the controller service wraps)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from g2rpo.controller.client import InProcessGuidanceClient
from g2rpo.controller.core import GuidanceController
from g2rpo.spec import G2RPOJob

if TYPE_CHECKING:
    from g2rpo.train.build import RunLayout

log = logging.getLogger(__name__)


@dataclass
class LocalRunResult:
    layout: RunLayout
    seconds: float
    final_step: int
    summary: dict[str, float]


def run_local(job: G2RPOJob, run_dir: Path, progress: bool = True) -> LocalRunResult:
    """Train `job` here. Ctrl-C or SIGTERM stops after the current step with a checkpoint, then
    raises StopRequested (g2rpo.train.lifecycle); the caller says where to resume from."""
    from g2rpo.train.lifecycle import StopSignals

    signals = StopSignals().install()
    try:
        return _run_local(job, run_dir, progress, signals)
    finally:
        signals.restore()


def _run_local(job: G2RPOJob, run_dir: Path, progress: bool, signals) -> LocalRunResult:
    from g2rpo.local.plot import plot_run, read_metrics
    from g2rpo.train.build import RunLayout, build_trainer, resolve_resume, save_final_model
    from g2rpo.train.callbacks import ProgressCallback
    from g2rpo.train.lifecycle import StopAtStepBoundary, StopRequested

    started = time.monotonic()
    layout = RunLayout.for_job(job, run_dir)
    resume = resolve_resume(job.spec, layout.checkpoint_dir)
    trainer = build_trainer(
        job,
        layout,
        guidance_client_factory=lambda params: InProcessGuidanceClient(GuidanceController(params)),
        extra_callbacks=[StopAtStepBoundary(signals), *([ProgressCallback()] if progress else [])],
    )
    if progress:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the progress bar replaces the per-step log dicts
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    if signals.stopped_by:
        raise StopRequested(signals.stopped_by)
    save_final_model(trainer, layout)
    records = [r for r in read_metrics(layout.metrics_file) if "g2rpo/accuracy" in r]
    if records:
        plot_run(layout.metrics_file, layout.plot_file, title=f"{job.metadata.name}: accuracy reward and guidance length")
    return LocalRunResult(
        layout=layout,
        seconds=time.monotonic() - started,
        final_step=trainer.state.global_step,
        summary=summarise(records),
    )


def summarise(records: list[dict]) -> dict[str, float]:
    """Run-level means of the per-step accuracy rewards (guided vs unguided is the headline)."""
    summary: dict[str, float] = {}
    for key in ("g2rpo/accuracy", "g2rpo/accuracy_guided", "g2rpo/accuracy_unguided"):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[key.removeprefix("g2rpo/")] = sum(values) / len(values)
    if records:
        summary["final_guidance_length"] = records[-1]["g2rpo/guidance_length"]
    return summary
