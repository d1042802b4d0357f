"""spec.tracking as what transformers' tracking callbacks read: TrainingArguments.report_to and run_name, and
environment variables.

There is no second logging path: TRL's GRPOTrainer.log merges its `_metrics` (where G2RPOTrainer puts the
g2rpo/* statistics of each step) into the logs it hands to every callback's on_log, and the TensorBoard,
MLflow and W&B callbacks of transformers (transformers/integrations/integration_utils.py) each write only on
the world's process zero. So each metric reaches every selected backend once, beside TRL's own.

What each callback reads (transformers 5.17, integration_utils.py):
- TensorBoardCallback: TENSORBOARD_LOGGING_DIR (default <output_dir>/runs/<time>_<host>; TrainingArguments
  has no logging_dir any more).
- MLflowCallback.setup: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_TAGS (a JSON object); the run's
  name is args.run_name (it does not read MLFLOW_RUN_NAME). The client reads its credentials itself
  (mlflow/environment_variables.py: MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD).
- WandbCallback.setup: WANDB_PROJECT (default "huggingface"); the run's name is args.run_name. wandb.init
  reads WANDB_ENTITY, WANDB_MODE, WANDB_TAGS (comma-separated), WANDB_DIR and WANDB_API_KEY (wandb/env.py).

Secrets never pass through here: on a cluster the operator sets them from Secret references
(TrackingSpec.secret_references); locally they come from the user's environment or login.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from g2rpo.api.spec import G2RPOJob, SpecError

TENSORBOARD_FOLDER = "tensorboard"
"""Under the run folder: the local run's output folder, or the job's folder on the checkpoint volume."""
DEFAULT_WANDB_PROJECT = "g2rpo"
CLIENT_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""The module each backend's transformers callback imports (transformers' is_*_available checks)."""
JOB_TAG = "g2rpo.job"


def run_name(job: G2RPOJob) -> str:
    return job.spec.tracking.run_name or job.metadata.name


def tracking_environment(job: G2RPOJob, run_dir: Path) -> dict[str, str]:
    """The environment variables of the selected backends (none of them secret)."""
    tracking = job.spec.tracking
    tags = {**tracking.tags, JOB_TAG: job.metadata.name}
    env: dict[str, str] = {}
    if "tensorboard" in tracking.backends:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_dir / TENSORBOARD_FOLDER)
    if "mlflow" in tracking.backends:
        mlflow = tracking.mlflow
        if mlflow is not None and mlflow.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = mlflow.tracking_uri
        if mlflow is not None and mlflow.experiment:
            env["MLFLOW_EXPERIMENT_NAME"] = mlflow.experiment
        env["MLFLOW_TAGS"] = json.dumps(tags)
    if "wandb" in tracking.backends:
        wandb = tracking.wandb
        if wandb is not None and wandb.project:
            env["WANDB_PROJECT"] = wandb.project
        if wandb is not None and wandb.mode:
            env["WANDB_MODE"] = wandb.mode
        if wandb is not None and wandb.entity:
            env["WANDB_ENTITY"] = wandb.entity
        env["WANDB_TAGS"] = ",".join(f"{key}:{value}" if value else key for key, value in tags.items())
        env["WANDB_DIR"] = str(run_dir)  # wandb writes <run folder>/wandb/<run>/ (offline: all of the run)
    return env


def check_clients_installed(job: G2RPOJob) -> None:
    """A SpecError naming tracking.backends when a selected backend's client is not installed here.

    transformers would fail too, but only once the trainer is being built, naming its callback."""
    missing = [name for name in job.spec.tracking.backends if importlib.util.find_spec(CLIENT_MODULES[name]) is None]
    if missing:
        raise SpecError(
            [
                (
                    ("spec", "tracking", "backends"),
                    f"{', '.join(missing)} selected but not installed here: pip install 'g2rpo[tracking]'",
                )
            ]
        )


def apply_tracking_environment(job: G2RPOJob, run_dir: Path) -> dict[str, str]:
    """Set tracking_environment in this process (the callbacks read it when training begins); returns it.

    The spec's values win over inherited ones; variables it does not set (WANDB_MODE when unset, the
    secrets) are left as they are, so spec.trainer.env, envFromSecret or a local shell can supply them.
    A project nobody named is g2rpo's, not transformers' "huggingface".
    """
    env = tracking_environment(job, run_dir)
    if "wandb" in job.spec.tracking.backends:
        env.setdefault("WANDB_PROJECT", os.environ.get("WANDB_PROJECT", DEFAULT_WANDB_PROJECT))
        # wandb.init moves to the temp folder when WANDB_DIR is not writable (wandb/sdk/wandb_init.py): make it exist.
        run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env
