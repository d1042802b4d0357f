"""The code reward (`code`): 1.0 when the completion's program passes the row's tests in the sandbox.

The program is the last ```python (or ```py, ```python3) fenced block of the answer section (the
text after `</think>`), else its last fenced block of any language, else the whole answer
section. It runs as `program`, then a marker line, then the row's `tests` (assert statements,
or any code that exits non-zero on failure) in `sandbox.run_python`, with the spec's time and
memory limits. Reward 1.0 when the run exits 0 within the limits *and* printed the marker;
anything else, a crash, a timeout, a sandbox error, a row without tests, is 0.0.

Why the marker: `program + tests` exits 0 as well when the program itself ends the process
before the tests run (`sys.exit(0)`, `os._exit(0)`, `quit()`), a reward hack that policies
find. The marker is a fresh random token per run, printed between program and tests, so the
program cannot print it in advance; tests that end with `sys.exit(0)` (unittest.main) still pass.
The sandbox keeps the first and last 32 KiB of output, so only a program that prints more than
that before its tests *and* tests that print more than that after the marker lose it.

A batch runs concurrently: one sandbox subprocess per completion, as many at a time as this
process has CPUs (its affinity mask, which follows a pod's cpuset). What walls the program in,
and what the pod must allow for each layer: docs/sandbox.md.
"""

from __future__ import annotations

import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import Any

from g2rpo.rewards.format import answer_section, column, completion_text, score_or_zero
from g2rpo.rewards.sandbox import run_python, sandbox_layers

_FENCED_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_LANGUAGES = frozenset({"python", "py", "python3"})


def extract_program(text: str) -> str | None:
    """The program in a completion's text; None when the think block never closes."""
    section = answer_section(text)
    if section is None:
        return None
    blocks = [(match.group(1).lower(), match.group(2)) for match in _FENCED_BLOCK.finditer(section)]
    python_blocks = [code for language, code in blocks if language in _PYTHON_LANGUAGES]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return section


def program_passes(completion: Any, tests: Any, *, timeout_s: float, memory_mb: int) -> float:
    """1.0 when the completion's program, then the marker, then `tests` run clean in the sandbox."""
    if not isinstance(tests, str) or not tests.strip():
        return 0.0
    program = extract_program(completion_text(completion))
    if not program or not program.strip():
        return 0.0
    marker = f"g2rpo-tests-start-{secrets.token_hex(16)}"
    source = f"{program}\n\nprint({marker!r}, flush=True)\n{tests}"
    result = run_python(source, timeout_s=timeout_s, memory_mb=memory_mb)
    return 1.0 if result.ok and marker in result.stdout else 0.0


def _usable_cpus() -> int:
    """The cores this process may run on (a pod's cpuset), not the node's: os.cpu_count() counts those."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_code_reward(*, timeout_s: float, memory_mb: int):
    """The TRL reward `code` with the spec's limits.

    Probes the sandbox's layers now, at start-up, so the log says once how strong the wall is
    (each missing layer with its reason) before the first step, not in the middle of one.
    """
    sandbox_layers()

    def code_reward(completions: list, tests: list | None = None, **kwargs: Any) -> list[float]:
        tests = column(tests, len(completions))

        def score(completion: Any, row_tests: Any) -> float:
            return program_passes(completion, row_tests, timeout_s=timeout_s, memory_mb=memory_mb)

        with ThreadPoolExecutor(max_workers=_usable_cpus()) as pool:
            return list(pool.map(score_or_zero, repeat(score), completions, tests))

    code_reward.__name__ = code_reward.__qualname__ = "code"
    return code_reward
