"""pass@1 of a model on an evaluation set, scored by the training rewards themselves.

pass@1 is the mean over problems of the mean correctness of the problem's k samples (the
paper's evaluation). Math completions are scored by the training `accuracy` reward, code
completions by the training `code` reward (the program runs in the trainer's sandbox), so a
number here means what the same number means in a training log.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from g2rpo.data.load import prompt_messages
from g2rpo.eval.generation import Sampling, transformers_generate, vllm_available, vllm_generate
from g2rpo.eval.problems import EvalProblem
from g2rpo.rewards import accuracy_reward, make_code_reward

log = logging.getLogger(__name__)

Task = Literal["math", "code"]
Backend = Literal["auto", "transformers", "vllm"]
CODE_TIMEOUT_S = 10.0
CODE_MEMORY_MB = 1024


@dataclass(frozen=True)
class ProblemResult:
    id: str
    tier: str | None
    correct: list[float]  # one score per sample
    completion_tokens: list[int]
    truncated: list[bool]
    completions: list[str]

    @property
    def pass_at_1(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass(frozen=True)
class EvalReport:
    task: str
    samples: int
    settings: dict[str, Any]
    per_problem: list[ProblemResult] = field(repr=False)

    @property
    def n_problems(self) -> int:
        return len(self.per_problem)

    @property
    def pass_at_1(self) -> float:
        return _mean([p.pass_at_1 for p in self.per_problem])

    @property
    def per_tier(self) -> dict[str, float]:
        """pass@1 per tier, tiers in the order they first appear in the set; empty when it has none."""
        tiers: dict[str, list[float]] = {}
        for problem in self.per_problem:
            if problem.tier is not None:
                tiers.setdefault(problem.tier, []).append(problem.pass_at_1)
        return {tier: _mean(values) for tier, values in tiers.items()}

    @property
    def truncation_rate(self) -> float:
        """The fraction of samples that hit max_new_tokens without an EOS."""
        return _mean([float(t) for p in self.per_problem for t in p.truncated])

    @property
    def mean_completion_tokens(self) -> float:
        return _mean([float(n) for p in self.per_problem for n in p.completion_tokens])

    def to_json(self) -> dict[str, Any]:
        tier_counts: dict[str, int] = {}
        for problem in self.per_problem:
            if problem.tier is not None:
                tier_counts[problem.tier] = tier_counts.get(problem.tier, 0) + 1
        return {
            "task": self.task,
            "pass_at_1": self.pass_at_1,
            "per_tier": self.per_tier,
            "tier_problems": tier_counts,
            "n_problems": self.n_problems,
            "samples": self.samples,
            "truncation_rate": self.truncation_rate,
            "mean_completion_tokens": self.mean_completion_tokens,
            "settings": self.settings,
            "per_problem": [{**problem.__dict__, "pass_at_1": problem.pass_at_1} for problem in self.per_problem],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalReport:
        """The report that to_json wrote."""
        fields = ("id", "tier", "correct", "completion_tokens", "truncated", "completions")
        problems = [ProblemResult(**{name: problem[name] for name in fields}) for problem in data["per_problem"]]
        return cls(task=data["task"], samples=data["samples"], settings=data["settings"], per_problem=problems)

    def table(self) -> str:
        rows = [("all", self.n_problems, self.pass_at_1)]
        counts = self.to_json()["tier_problems"]
        rows += [(f"tier {tier}", counts[tier], value) for tier, value in self.per_tier.items()]
        lines = [f"{'set':<12} {'problems':>8} {'pass@1':>8}"]
        lines += [f"{name:<12} {count:>8} {value:>8.3f}" for name, count, value in rows]
        lines.append(
            f"{self.samples} sample(s) per problem; truncated {self.truncation_rate:.1%} of samples; "
            f"mean completion {self.mean_completion_tokens:.1f} tokens"
        )
        return "\n".join(lines)


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[EvalProblem],
    *,
    task: Task,
    samples: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.95,
    top_k: int = 20,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    system_prompt: str | None = None,
    backend: Backend = "auto",
    code_timeout_s: float = CODE_TIMEOUT_S,
    code_memory_mb: int = CODE_MEMORY_MB,
) -> EvalReport:
    """Sample `samples` completions per problem and score them; see the module docstring.

    `model` is a loaded causal LM (transformers backend), or a model folder / hub id, which the
    vLLM backend loads itself and the transformers backend loads with `from_pretrained`. `auto`
    picks vLLM for a path when vLLM is installed and a GPU is present, else transformers.
    Temperature 0 is greedy: every sample would be the same, so one is drawn.
    """
    if task not in ("math", "code"):
        raise ValueError(f"task must be 'math' or 'code', got {task!r}")
    if not problems:
        raise ValueError("no problems to evaluate")
    if samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("samples, max_new_tokens and batch_size must be positive")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    _check_references(problems, task)
    if temperature == 0 and samples > 1:
        log.info("temperature 0 is greedy decoding: one sample per problem instead of %d", samples)
        samples = 1
    sampling = Sampling(samples, temperature, top_p, top_k, max_new_tokens, seed)
    prompt_ids = [_prompt_ids(tokenizer, problem.prompt, system_prompt) for problem in problems]

    use_vllm = backend == "vllm" or (backend == "auto" and isinstance(model, str) and vllm_available())
    if use_vllm:
        if not isinstance(model, str):
            raise ValueError("the vLLM backend loads the model itself: pass a model folder or hub id")
        completions = vllm_generate(model, prompt_ids, sampling)
    else:
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model)
        completions = transformers_generate(
            model, tokenizer, prompt_ids, sampling, batch_size=batch_size, progress=progress
        )

    texts = [[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in row] for row in completions]
    scores = score_completions(problems, texts, task=task, timeout_s=code_timeout_s, memory_mb=code_memory_mb)
    per_problem = [
        ProblemResult(
            id=problem.id,
            tier=problem.tier,
            correct=row_scores,
            completion_tokens=[len(c.token_ids) for c in row],
            truncated=[c.truncated for c in row],
            completions=row_texts,
        )
        for problem, row, row_texts, row_scores in zip(problems, completions, texts, scores, strict=True)
    ]
    settings = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "system_prompt": system_prompt,
        "backend": "vllm" if use_vllm else "transformers",
    }
    return EvalReport(task=task, samples=samples, settings=settings, per_problem=per_problem)


def score_completions(
    problems: Sequence[EvalProblem],
    completions: Sequence[Sequence[str]],
    *,
    task: Task,
    timeout_s: float = CODE_TIMEOUT_S,
    memory_mb: int = CODE_MEMORY_MB,
) -> list[list[float]]:
    """Each completion's score (0.0 or 1.0) by the training reward of `task`; completions[i] answer problems[i]."""
    _check_references(problems, task)
    flat = [(problem, text) for problem, row in zip(problems, completions, strict=True) for text in row]
    messages = [
        [{"role": "assistant", "content": text}] for _, text in flat
    ]  # as TRL passes conversational completions
    if task == "math":
        flat_scores = accuracy_reward(completions=messages, answer=[problem.answer for problem, _ in flat])
    else:
        code_reward = make_code_reward(timeout_s=timeout_s, memory_mb=memory_mb)
        flat_scores = code_reward(completions=messages, tests=[problem.tests for problem, _ in flat])
    scores, start = [], 0
    for row in completions:
        scores.append(list(flat_scores[start : start + len(row)]))
        start += len(row)
    return scores


def _prompt_ids(tokenizer: Any, problem: str, system_prompt: str | None) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        prompt_messages(problem, system_prompt), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _check_references(problems: Sequence[EvalProblem], task: Task) -> None:
    attribute = "answer" if task == "math" else "tests"
    missing = [problem.id for problem in problems if not getattr(problem, attribute)]
    if missing:
        raise ValueError(f"{task} problems need {attribute!r}; missing in {', '.join(missing[:5])}")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")
