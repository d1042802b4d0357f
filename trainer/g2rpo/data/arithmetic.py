"""`builtin:arithmetic`: generated multi-step arithmetic word problems, with reference reasoning.

Why generate data at all: no package on PyPI ships GSM8K or MATH for this Python, and the training
loop must run offline with a real model. These problems fit a tiny policy (SmolLM2-135M): small
integers, every intermediate result a whole number in [1, value_limit], division only when exact,
so a one-step problem is within its reach and every extra step makes it measurably harder. The
number of steps is the difficulty tier, which gives the curriculum a real key to sort on and the
guided roll-outs a real trajectory (`solution`) to start from.

Every row: `problem` (story and question), `answer` (the final integer as a string), `solution`
(`<think>` with one `Step i: a op b = c.` line per step, then `The answer is \\boxed{c}.`, the
shape the format and accuracy rewards expect) and `steps` (the tier). `random.Random(seed)` is the
only source of randomness, so the same parameters always give the same list.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

from g2rpo.api.spec import ArithmeticDatasetSpec

PEOPLE = [
    ("Mia", "She"),
    ("Liam", "He"),
    ("Ava", "She"),
    ("Noah", "He"),
    ("Zoe", "She"),
    ("Omar", "He"),
    ("Priya", "She"),
    ("Kenji", "He"),
    ("Lucia", "She"),
    ("Tom", "He"),
    ("Amara", "She"),
    ("Diego", "He"),
    ("Hana", "She"),
    ("Felix", "He"),
    ("Nora", "She"),
    ("Ravi", "He"),
]
OBJECTS = [
    "apples",
    "marbles",
    "stickers",
    "cookies",
    "pencils",
    "coins",
    "books",
    "stamps",
    "shells",
    "cards",
    "balloons",
    "toy cars",
    "beads",
    "crayons",
    "oranges",
    "buttons",
]
FRIENDS = ["a friend", "a classmate", "a neighbour", "the teacher", "grandpa", "an uncle"]
CONTAINERS = ["boxes", "bags", "jars", "baskets", "piles"]

ADD_PHRASES = [
    "buys {b} more",
    "finds {b} more",
    "gets {b} more from {friend}",
    "wins {b} more at a fair",
    "receives {b} more as a gift",
    "collects {b} more",
]
SUBTRACT_PHRASES = [
    "gives away {b}",
    "loses {b}",
    "sells {b}",
    "gives {b} to {friend}",
    "trades away {b}",
    "donates {b} to a school",
]
MULTIPLY_PHRASES = [
    "ends up with {b} times as many as before",
    "makes the collection {b} times as big",
    "gets enough to have {b} times as many",
]
DIVIDE_PHRASES = [
    "splits them equally into {b} {container} and keeps one of them",
    "divides them into {b} equal groups and keeps just one group",
]
CONNECTORS = ["Then", "After that,", "Next,", "Later,"]
QUESTIONS = [
    "How many {objects} does {name} have now?",
    "How many {objects} does {name} have in the end?",
    "How many {objects} does {name} end up with?",
]
MAX_MULTIPLIER = 5  # larger products are out of a 135M model's reach


@dataclass(frozen=True)
class Operation:
    symbol: str
    phrases: list[str]
    apply: Callable[[int, int], int]


ADD = Operation("+", ADD_PHRASES, operator.add)
SUBTRACT = Operation("-", SUBTRACT_PHRASES, operator.sub)
MULTIPLY = Operation("*", MULTIPLY_PHRASES, operator.mul)
DIVIDE = Operation("/", DIVIDE_PHRASES, operator.floordiv)  # only offered for exact divisors


def value_limit(max_operand: int) -> int:
    """The largest value any step may produce: a few hundred for the default operands."""
    return max(100, 10 * max_operand)


def generate(params: ArithmeticDatasetSpec) -> list[dict]:
    """`params.num_problems` problems; tiers min_steps..max_steps appear equally often (counts differ by at most 1)."""
    rng = random.Random(params.seed)
    tiers = list(range(params.min_steps, params.max_steps + 1))
    steps_per_problem = [tiers[i % len(tiers)] for i in range(params.num_problems)]
    rng.shuffle(steps_per_problem)
    return [_problem(rng, steps, params.max_operand) for steps in steps_per_problem]


def _problem(rng: random.Random, num_steps: int, max_operand: int) -> dict:
    name, pronoun = rng.choice(PEOPLE)
    objects = rng.choice(OBJECTS)
    value = rng.randint(2, max(2, max_operand))
    story = [f"{name} has {value} {objects}."]
    step_lines = []
    for step in range(1, num_steps + 1):
        operation, operand = _next_operation(rng, value, max_operand)
        result = operation.apply(value, operand)
        phrase = rng.choice(operation.phrases).format(
            b=operand, friend=rng.choice(FRIENDS), container=rng.choice(CONTAINERS)
        )
        subject = pronoun if step == 1 else f"{rng.choice(CONNECTORS)} {pronoun.lower()}"
        story.append(f"{subject} {phrase}.")
        step_lines.append(f"Step {step}: {value} {operation.symbol} {operand} = {result}.")
        value = result
    story.append(rng.choice(QUESTIONS).format(objects=objects, name=name))
    solution = "<think>\n" + "\n".join(step_lines) + f"\n</think>\nThe answer is \\boxed{{{value}}}."
    return {"problem": " ".join(story), "answer": str(value), "solution": solution, "steps": num_steps}


def _next_operation(rng: random.Random, value: int, max_operand: int) -> tuple[Operation, int]:
    """A random operation and operand whose result stays a whole number in [1, value_limit]."""
    limit = value_limit(max_operand)
    choices: list[tuple[Operation, list[int]]] = [
        (ADD, list(range(1, min(max_operand, limit - value) + 1))),
        (SUBTRACT, list(range(1, min(max_operand, value - 1) + 1))),
        (MULTIPLY, list(range(2, min(max_operand, MAX_MULTIPLIER, limit // value) + 1))),
        (DIVIDE, [d for d in range(2, min(max_operand, value // 2) + 1) if value % d == 0]),
    ]
    feasible = [(operation, operands) for operation, operands in choices if operands]
    operation, operands = rng.choice(feasible)
    return operation, rng.choice(operands)


def generate_compact(params: ArithmeticDatasetSpec) -> list[dict]:
    """Like `generate`, in a short symbolic form for character-level tiny models (bench/efficacy).

    Same operations, value range and tiers as the word problems, a fraction of the tokens:
    problem "Start at 7. Apply +3, -2, *2.", solution
    "<think>\\n7+3=10\\n10-2=8\\n8*2=16\\n</think>\\n\\\\boxed{16}". The same rewards score it.
    """
    rng = random.Random(params.seed)
    tiers = list(range(params.min_steps, params.max_steps + 1))
    steps_per_problem = [tiers[i % len(tiers)] for i in range(params.num_problems)]
    rng.shuffle(steps_per_problem)
    return [_compact_problem(rng, steps, params.max_operand) for steps in steps_per_problem]


def _compact_problem(rng: random.Random, num_steps: int, max_operand: int) -> dict:
    value = rng.randint(2, max(2, max_operand))
    start, moves, step_lines = value, [], []
    for _ in range(num_steps):
        operation, operand = _next_operation(rng, value, max_operand)
        result = operation.apply(value, operand)
        moves.append(f"{operation.symbol}{operand}")
        step_lines.append(f"{value}{operation.symbol}{operand}={result}")
        value = result
    problem = f"Start at {start}. Apply {', '.join(moves)}."
    solution = "<think>\n" + "\n".join(step_lines) + f"\n</think>\n\\boxed{{{value}}}"
    return {"problem": problem, "answer": str(value), "solution": solution, "steps": num_steps}
