"""Names that the operator's pods and the programs in them must agree on: environment variables,
ports, mount paths, HTTP paths and command-line flags.

The operator's builders write them into the children's pod specs; the trainer (`python -m
g2rpo.train`), the controller (`g2rpo controller`) and the operator's own client read them. Each is
defined here once, so that a rename cannot reach one side only. What other programs define (vLLM's
and `trl vllm-serve`'s options and health path, accelerate's launcher flags, torch's rendezvous
variables such as WORLD_SIZE and MASTER_PORT) stays with the builder that renders it.
"""

from __future__ import annotations

# --- the trainer ranks' environment ---------------------------------------------------------------

JOB_NAME_ENV = "G2RPO_JOB_NAME"
CONTROLLER_URL_ENV = "G2RPO_CONTROLLER_URL"
"""Where rank 0 reaches the job's guidance controller."""
CONTROLLER_TOKEN_FILE_ENV = "G2RPO_CONTROLLER_TOKEN_FILE"
"""The file holding the controller's bearer token (the mounted Secret)."""
CONTROLLER_TOKEN_ENV = "G2RPO_CONTROLLER_TOKEN"
"""The token itself, when no token file is given (local use)."""
ROLLOUT_URL_ENV = "G2RPO_ROLLOUT_URL"
"""The vLLM rollout server; without it the ranks generate in process."""
ROLLOUT_GROUP_PORT_ENV = "G2RPO_ROLLOUT_GROUP_PORT"
"""The port of TRL's weight-sync group on rank 0 (ROLLOUT_GROUP_PORT unless set)."""

# --- ports ----------------------------------------------------------------------------------------

CONTROLLER_PORT = 8080
"""The controller's one port: its API, /metrics and its probes."""
ROLLOUT_PORT = 8000
"""vLLM's OpenAI-compatible server in the rollout pod."""
ROLLOUT_GROUP_PORT = 51216
"""TRL's NCCL weight-transfer port (vllm_group_port): vLLM workers connect to trainer rank 0 on it."""
RENDEZVOUS_PORT = 29500
"""The DeepSpeed rendezvous on trainer rank 0 (MASTER_PORT)."""

# --- mounts and the files in them -----------------------------------------------------------------

CONFIG_DIR = "/etc/g2rpo/config"
"""Where the job's ConfigMap is mounted."""
JOB_KEY = "job.yaml"
"""The ConfigMap key (and file) of the accepted G2RPOJob."""
ACCELERATE_KEY = "accelerate.yaml"
"""The ConfigMap key (and file) of accelerate's launcher config."""
JOB_FILE = f"{CONFIG_DIR}/{JOB_KEY}"
ACCELERATE_FILE = f"{CONFIG_DIR}/{ACCELERATE_KEY}"
TOKEN_DIR = "/etc/g2rpo/token"
"""Where the job's token Secret is mounted."""
TOKEN_KEY = "token"
"""The Secret key (and file) of the controller's bearer token."""
TOKEN_FILE = f"{TOKEN_DIR}/{TOKEN_KEY}"
CHECKPOINT_MOUNT = "/checkpoints"
"""Where the checkpoint claim is mounted; checkpoint.dir must lie under it."""
CHECKPOINT_CREDENTIALS_DIR = "/var/run/secrets/g2rpo/checkpoint"
"""Where checkpoint.credentialsSecret is mounted in the trainer pods (key files for the object store)."""

# --- the controller's HTTP paths that the operator uses --------------------------------------------

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
GUIDANCE_PATH = "/v1/guidance"
"""The step, the next guidance length and the last step's statistics (the operator's status source)."""

# --- command lines the builders write and the entry points parse ----------------------------------

TRAINER_MODULE = "g2rpo.train"
"""`python -m g2rpo.train`: one trainer rank (under accelerate launch), or the check-spec init container."""
TRAINER_JOB_FLAG = "--job"
"""The G2RPOJob file."""
TRAINER_CHECK_FLAG = "--check"
"""Validate the job for WORLD_SIZE ranks, the node's driver and the checkpoint folder, and exit (a
FAILURE_REASONS code when it cannot run)."""
DRIVER_CHECK_MODULE = "g2rpo.train.preflight"
"""`python -m g2rpo.train.preflight`: the node's NVIDIA driver against the image's CUDA (the rollout's init
container); exits EXIT_DRIVER_TOO_OLD when it is too old."""

# `g2rpo controller`: one job's guidance controller.
CONTROLLER_JOB_FLAG = "--job"
"""The job's name (the metrics' job label)."""
CONTROLLER_SCHEDULE_FROM_FLAG = "--schedule-from"
"""A G2RPOJob file whose spec.guidance is the schedule."""
CONTROLLER_STATE_DIR_FLAG = "--state-dir"
CONTROLLER_TOKEN_FILE_FLAG = "--token-file"
CONTROLLER_PORT_FLAG = "--port"
