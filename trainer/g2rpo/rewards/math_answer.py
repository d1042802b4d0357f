"""The math accuracy reward (`accuracy`): 1.0 when the completion's final answer equals the reference.

Extraction, from the completion's answer section (the text after `</think>`, see `format.py`;
the think block holds scratch numbers that must not count):

1. The last complete `\\boxed{...}` (or `\\fbox{...}`), braces nested to any depth; `\\boxed 5`
   (no braces) takes the next token. A `\\boxed{` cut off before its closing brace is skipped.
2. Else the last plain statement of an answer: "The answer is 42", "Final answer: 3/4",
   "answer = 5" or a GSM8K line "#### 12". The value runs to the end of its sentence; a leading
   `$...$` is taken whole, and a number followed by words ("42 apples") keeps the number.
3. Else there is no answer: 0.0. The reward never guesses the last number of free text, which
   would pay for a stray intermediate value.

Comparison: a fast exact path first: when both sides are plain rationals ("42", "42.0", "-3",
"1,000", "3/4", "\\frac{3}{4}", "0.75") they are compared as fractions; a match is final, and so is
a mismatch of two integers. Everything else goes to `math_verify` (gold and prediction are both
wrapped in `\\boxed{}` so that its parser reads them whole), which knows LaTeX, sets,
intervals, equations such as `x = 5` and rounding of decimals.

math_verify guards parsing and comparison with SIGALRM, which only works in the main thread and
raises elsewhere. TRL calls reward functions from the main thread, and there the guard stays (2 s
per step). Off the main thread it is turned off. To keep that path from hanging, and the main
thread from stalling on it, predictions that would make sympy build astronomically large numbers
are refused before math_verify sees them: power towers (`9^{9^{9}}`), exponents of five or more
digits, factorials of numbers of four or more digits, and answers over 1000 characters. Such an
answer scores 0.0 even when it happens to be right; none of the usual datasets has one as a
reference.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any

from math_verify import parse, verify

from g2rpo.rewards.format import answer_section, column, completion_text, scores_or_zero

MATH_VERIFY_TIMEOUT_S = 2
MAX_ANSWER_CHARS = 1000

_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*")
_UNBRACED_TOKEN = re.compile(r"[^\s$]+")
_PLAIN_ANSWER = re.compile(
    r"\banswer\b\s*(?:is\b\s*:?|:|=)\s*(?P<value>[^\n]+)|^[ \t]*####\s*(?P<gsm8k>[^\n]+)",
    re.IGNORECASE | re.MULTILINE,
)
_INLINE_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_SENTENCE_END = re.compile(r"[.;,!?](?:\s|$)")
_NUMBER_THEN_WORDS = re.compile(r"([-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?)\s+[A-Za-z]")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_SLASH_FRACTION = re.compile(r"([-+]?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"([-+]?)\\[dt]?frac(?:\{([-+]?\d+)\}\{(\d+)\}|(\d)(\d))")
_EXPENSIVE = re.compile(
    r"\^\s*\{[^{}]*\^"  # an exponent holding an exponent: 9^{9^{9}}
    r"|\^\s*\d+\s*\^"  # a tower written without braces: 9^9^9
    r"|(?:\^|\*\*)\s*\{?\s*\d{5,}"  # an exponent of five or more digits
    r"|\d{4,}\s*!"  # a factorial of a four-digit number
)


def extract_answer(text: str) -> str | None:
    """The final answer stated in a completion's text, or None when it states none."""
    section = answer_section(text)
    if section is None:
        return None
    boxed = _last_boxed(section)
    if boxed is not None:
        return boxed.strip()
    return _last_plain_answer(section)


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED.finditer(text))):
        start = match.end()
        if text.startswith("{", start):
            content = _braced_content(text, start)
            if content is not None:
                return content
        else:
            token = _UNBRACED_TOKEN.match(text, start)
            if token:
                return token.group().rstrip(".,;")
    return None


def _braced_content(text: str, open_index: int) -> str | None:
    """The text inside the brace at `open_index` and its matching close; None when unclosed."""
    depth = 0
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
    return None


def _last_plain_answer(text: str) -> str | None:
    matches = list(_PLAIN_ANSWER.finditer(text.replace("**", "")))
    if not matches:
        return None
    value = (matches[-1].group("value") or matches[-1].group("gsm8k")).strip()
    math = _INLINE_MATH.match(value)
    if math:
        return next(group for group in math.groups() if group is not None).strip()
    sentence_end = _SENTENCE_END.search(value)
    if sentence_end:
        value = value[: sentence_end.start()]
    number = _NUMBER_THEN_WORDS.match(value)
    if number:
        value = number.group(1)
    return value.strip().rstrip(".") or None


def as_fraction(answer: str) -> Fraction | None:
    """The exact value of a plain rational answer ("-3", "1,000", "0.75", "3/4", "\\frac{3}{4}")."""
    text = answer.strip().strip("$").replace(" ", "").replace("{,}", "")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        if _DECIMAL.fullmatch(text):
            return Fraction(text)
        slash = _SLASH_FRACTION.fullmatch(text)
        if slash:
            return Fraction(int(slash.group(1)), int(slash.group(2)))
        latex = _LATEX_FRACTION.fullmatch(text)
        if latex:
            sign, numerator, denominator = (
                latex.group(1),
                latex.group(2) or latex.group(4),
                latex.group(3) or latex.group(5),
            )
            value = Fraction(int(numerator), int(denominator))
            return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(reference: str, predicted: str) -> bool:
    """Whether a predicted final answer equals the reference (exact fractions, else math_verify)."""
    reference_value, predicted_value = as_fraction(reference), as_fraction(predicted)
    if reference_value is not None and predicted_value is not None:
        if reference_value == predicted_value:
            return True
        if reference_value.denominator == 1 and predicted_value.denominator == 1:
            return False
    if len(predicted) > MAX_ANSWER_CHARS or _EXPENSIVE.search(predicted):
        return False
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = _parse_reference(reference, timeout)
    if not gold:
        return False
    prediction = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    return bool(prediction) and verify(gold, prediction, timeout_seconds=timeout)


@lru_cache(maxsize=4096)
def _parse_reference(reference: str, timeout: int | None) -> list:
    """The parsed reference, once per distinct reference: each one recurs once per roll-out."""
    if "$" in reference or "\\boxed" in reference:
        return parse(reference, parsing_timeout=timeout)
    return parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)


def accuracy_score(completion: Any, reference: Any) -> float:
    if reference is None:
        return 0.0
    predicted = extract_answer(completion_text(completion))
    if not predicted:
        return 0.0
    return 1.0 if answers_match(str(reference).strip(), predicted) else 0.0


def accuracy_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
    """TRL reward `accuracy`: 1.0 when the completion's final answer equals the row's `answer`."""
    return scores_or_zero(accuracy_score, completions, column(answer, len(completions)))


accuracy_reward.__name__ = "accuracy"
