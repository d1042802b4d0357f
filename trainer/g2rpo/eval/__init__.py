"""`g2rpo eval`: pass@1 of a model, a checkpoint or a job's final model on math or HumanEval.

    from g2rpo.eval import EvalProblem, EvalReport, evaluate, load_math_problems, load_humaneval_problems

The names load on first use: the `g2rpo` command imports this package for its argument parser,
and `g2rpo validate` should not pay for the rewards' and datasets' imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EvalProblem": "g2rpo.eval.problems",
    "load_humaneval_problems": "g2rpo.eval.problems",
    "load_math_problems": "g2rpo.eval.problems",
    "EvalReport": "g2rpo.eval.core",
    "ProblemResult": "g2rpo.eval.core",
    "evaluate": "g2rpo.eval.core",
    "score_completions": "g2rpo.eval.core",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers only; at run time __getattr__ below imports on first use
    from g2rpo.eval.core import EvalReport, ProblemResult, evaluate, score_completions  # noqa: F401
    from g2rpo.eval.problems import EvalProblem, load_humaneval_problems, load_math_problems  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'g2rpo.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
