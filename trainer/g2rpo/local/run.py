"""`g2rpo run FILE`: the job on this machine: CPU or one GPU, transformers generation, the guidance
controller in process (the same GuidanceController that the controller service wraps)."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from g2rpo.api.spec import G2RPOJob
from g2rpo.controller.client import InProcessGuidanceClient
from g2rpo.controller.core import GuidanceController

if TYPE_CHECKING:
    from g2rpo.train.build import RunLayout

log = logging.getLogger(__name__)


class AlreadyFinished(Exception):
    """The run folder holds this job's run, trained to its last step: nothing to train, nothing was changed."""

    def __init__(self, layout: RunLayout, checkpoint: Path, step: int):
        super().__init__(f"{checkpoint} is the run's last step ({step})")
        self.layout = layout
        self.checkpoint = checkpoint
        self.step = step


@dataclass
class LocalRunResult:
    layout: RunLayout
    seconds: float
    final_step: int
    summary: dict[str, float]


# Held-out problems asked before and after training (builtin:arithmetic jobs): enough to tell a
# 135M model's improvement from noise on these cores, few enough to cost under a minute each time.
HELDOUT_PROBLEMS = 32


def run_local(
    job: G2RPOJob, run_dir: Path, progress: bool = True, heldout_problems: int = HELDOUT_PROBLEMS
) -> LocalRunResult:
    """Train `job` here. `heldout_problems` > 0: also evaluate the model before and after (see HeldoutCheck).

    Ctrl-C or SIGTERM stops after the current step with a checkpoint, then raises StopRequested
    (g2rpo.train.lifecycle); the caller says where to resume from. A run folder whose newest checkpoint
    is already the job's last step raises AlreadyFinished before anything is loaded or written."""
    from g2rpo.train.lifecycle import StopSignals

    signals = StopSignals().install()
    try:
        return _run_local(job, run_dir, progress, heldout_problems, signals)
    finally:
        signals.restore()


def _run_local(job: G2RPOJob, run_dir: Path, progress: bool, heldout_problems: int, signals) -> LocalRunResult:
    from g2rpo.local.plot import plot_run, read_metrics
    from g2rpo.train.build import RunLayout, build_trainer, finished_step, resolve_resume, save_final_model
    from g2rpo.train.callbacks import ProgressCallback, StepLineCallback
    from g2rpo.train.lifecycle import StopAtStepBoundary, StopRequested

    started = time.monotonic()
    layout = RunLayout.for_job(job, run_dir)
    driving = job.spec.guidance_reward.name
    resume = resolve_resume(job.spec, layout.checkpoint_dir)
    if resume:
        step = finished_step(job.spec, Path(resume))
        if step is not None:
            raise AlreadyFinished(layout, Path(resume), step)
        log.info("resuming from %s", resume)
    trainer = build_trainer(
        job,
        layout,
        guidance_client_factory=lambda params: InProcessGuidanceClient(GuidanceController(params)),
        extra_callbacks=[
            StopAtStepBoundary(signals),
            ProgressCallback(driving) if progress else StepLineCallback(driving),
        ],
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the bar or the step lines replace its per-step dicts
    heldout = HeldoutCheck.for_job(job, heldout_problems, progress)
    before = heldout.before_training(trainer, layout.run_dir, resumed=bool(resume)) if heldout else None
    with hf_progress_bars_off(), logs_above_the_bar(progress):
        trainer.train(resume_from_checkpoint=resume)
        if signals.stopped_by:
            raise StopRequested(signals.stopped_by)
        save_final_model(trainer, layout, merge_adapter=job.spec.model.merged_final)
    records = [r for r in read_metrics(layout.metrics_file) if "g2rpo/accuracy" in r]
    if records:
        plot_run(
            layout.metrics_file,
            layout.plot_file,
            title=f"{job.metadata.name}: {driving} reward and guidance length",
            reward=driving,
        )
    summary = summarise(records, driving)
    if heldout:
        summary.update(heldout.compare(before, heldout.evaluate(trainer, "after training"), layout.run_dir))
    return LocalRunResult(
        layout=layout,
        seconds=time.monotonic() - started,
        final_step=trainer.state.global_step,
        summary=summary,
    )


@contextmanager
def hf_progress_bars_off():
    """No transformers bars while training and saving: the "Writing model shards" bar of every
    checkpoint and of the final model breaks into g2rpo's step bar and stays behind at 100%."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def logs_above_the_bar(progress: bool):
    """Log lines printed above the step bar, not into its line (tqdm's logging redirect: the console
    handlers of these loggers write through tqdm.write while the block runs)."""
    if not progress:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger(), logging.getLogger("transformers")]):
        yield


@dataclass
class HeldoutCheck:
    """Unguided pass@1 on held-out builtin:arithmetic problems, before and after training.

    The problems come from `g2rpo eval`'s held-out split: drawn by the training generator with
    seeds no job uses, and none shares its arithmetic chain with a training problem. They are
    posed with the job's system prompt and decoded with the paper's settings (temperature 0.6,
    top-p 0.95, top-k 20), one sample each, at most maxCompletionLength new tokens: the same
    budget the policy has in training, so the truncation rate says whether that budget fits.
    Other datasets have no held-out split here; evaluate them with `g2rpo eval`.
    """

    problems: list
    system_prompt: str | None
    max_new_tokens: int
    progress: bool

    @classmethod
    def for_job(cls, job: G2RPOJob, n: int, progress: bool) -> HeldoutCheck | None:
        dataset = job.spec.dataset
        if n <= 0 or not dataset.is_builtin_arithmetic:
            return None
        from g2rpo.eval import load_math_problems

        problems = load_math_problems("builtin:arithmetic", split="heldout", n=n, seed=0, train=dataset.arithmetic)
        return cls(problems, dataset.system_prompt, job.spec.training.max_completion_length, progress)

    def before_training(self, trainer, run_dir: Path, resumed: bool):
        """The check before training, asked once per run folder: a first run asks it and keeps the result in
        heldout.json at once; a resumed run reads it back (the model it would ask now has trained already).
        None when a resumed run has no kept result (its first run skipped the check)."""
        from g2rpo.eval.core import EvalReport

        kept = _read_json(run_dir / HELDOUT_FILE).get("before") if resumed else None
        if kept is not None:
            report = EvalReport.from_json(kept)
            print(f"\nheld-out problems, unguided, before training (kept from the first run):\n{report.table()}")
            return report
        if resumed:
            log.info("no held-out result from before training in %s: only the check after training runs", run_dir)
            return None
        report = self.evaluate(trainer, "before training")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / HELDOUT_FILE).write_text(json.dumps({"before": report.to_json()}, indent=1))
        return report

    def evaluate(self, trainer, when: str):
        from g2rpo.eval import evaluate

        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            report = evaluate(
                model,
                trainer.processing_class,
                self.problems,
                task="math",
                samples=1,
                max_new_tokens=self.max_new_tokens,
                batch_size=16,
                seed=0,
                progress=self.progress,
                system_prompt=self.system_prompt,
            )
        finally:
            model.train(was_training)
        print(f"\nheld-out problems, unguided, {when}:\n{report.table()}", flush=True)
        return report

    @staticmethod
    def compare(before, after, run_dir: Path) -> dict[str, float]:
        """The summary lines, and heldout.json in the run folder with both reports (`before` may be None)."""
        reports = {"before": before, "after": after} if before else {"after": after}
        (run_dir / HELDOUT_FILE).write_text(json.dumps({k: r.to_json() for k, r in reports.items()}, indent=1))
        summary = {}
        for when, report in reports.items():
            summary[f"heldout_accuracy_{when}"] = report.pass_at_1
        for when, report in reports.items():
            summary[f"heldout_truncated_{when}"] = report.truncation_rate
        return summary


HELDOUT_FILE = "heldout.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def summarise(records: list[dict], driving_reward: str = "accuracy") -> dict[str, float]:
    """Run-level means of the per-step driving reward (guided vs unguided is the headline).

    The metrics file holds it as g2rpo/accuracy* whichever reward drives the schedule (the
    controller's contract, docs/metrics.md); the summary names it: accuracy, else e.g. code_reward.
    """
    name = "accuracy" if driving_reward == "accuracy" else f"{driving_reward}_reward"
    summary: dict[str, float] = {}
    for suffix in ("", "_guided", "_unguided"):
        key = f"g2rpo/accuracy{suffix}"
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[name + suffix] = sum(values) / len(values)
    if records:
        summary["final_guidance_length"] = records[-1]["g2rpo/guidance_length"]
    return summary
