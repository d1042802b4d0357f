"""The format reward, and the completion handling that every reward shares.

TRL hands reward functions either plain strings or conversational completions (a list of
messages, `[{"role": "assistant", "content": ...}]`); `completion_text` turns both into one string.
`scores_or_zero` scores row by row and turns any exception into 0.0 (logged): one odd completion
must cost its own reward, never the training run.

The reasoning convention is `<think> reasoning </think> answer`. `answer_section` gives the part
of a completion that counts as its answer: the text after the last `</think>`, or the whole text
when the completion has no think tags at all. A completion that opens `<think>` and never closes
it (typically cut off at the length limit) has no answer: its numbers and code are scratch work,
and rewarding them would teach the model that closing the think block does not matter.

Format (`format`): 1.0 when the completion is exactly one `<think>...</think>` block followed by a
non-empty answer, whitespace allowed around both; else 0.0. The reasoning inside may be empty:
the reward checks structure, and the accuracy reward judges content.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_THINK_THEN_ANSWER = re.compile(r"\s*<think>.*?</think>\s*\S.*", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is, a conversational one as its assistant contents."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, Sequence):
        return ""
    parts = []
    for message in completion:
        if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
            parts.append(_content_text(message.get("content")))
    return "\n".join(parts)


def _content_text(content: Any) -> str:
    """Message content is a string, or (multimodal chat format) a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return ""


def column(values: Sequence | None, count: int) -> list:
    """A dataset column as TRL passes it (one value per completion); missing means all None."""
    if values is None or isinstance(values, (str, bytes)) or len(values) != count:
        return [None] * count
    return list(values)


def score_or_zero(score: Callable[..., float], *row: Any) -> float:
    """`score(*row)`, or 0.0 when it raises: an odd completion costs its reward, never the run."""
    try:
        return float(score(*row))
    except Exception:
        logger.warning("%s raised on a completion; reward 0.0", score.__name__, exc_info=True)
        return 0.0


def scores_or_zero(score: Callable[..., float], *columns: Sequence) -> list[float]:
    """`score_or_zero` applied row by row over aligned columns."""
    return [score_or_zero(score, *row) for row in zip(*columns, strict=True)]


def answer_section(text: str) -> str | None:
    """The part of a completion that counts as its answer; None when the think block never closes."""
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE) :]
    if THINK_OPEN in text:
        return None
    return text


def format_score(completion: Any) -> float:
    text = completion_text(completion)
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return 0.0
    return 1.0 if _THINK_THEN_ANSWER.fullmatch(text) else 0.0


def format_reward(completions: list, **kwargs: Any) -> list[float]:
    """TRL reward `format`: 1.0 for `<think>...</think>` then a non-empty answer, else 0.0."""
    return scores_or_zero(format_score, completions)


format_reward.__name__ = "format"
