"""Verifiable arithmetic word problems with integer answers, and their reward check.

Each family draws its numbers from a seeded ``random.Random``; the answer is an integer
and the reward of a response is 1 when the last number it writes equals the answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

NAMES = ("Tom", "Sara", "Ben", "Lily", "Sam", "Emma", "Max", "Anna", "Leo", "Mia")
ITEMS = ("apples", "marbles", "stickers", "cookies", "pencils", "books", "stamps", "cards")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"))

# A number as a model writes it: optional sign, digits with optional thousands commas,
# optional decimal part. Its value is compared to the integer answer.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """One word problem: its family, the question text and the integer answer."""

    family: str
    question: str
    answer: int


def _add(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 5)
    question = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
    return Problem("add", question, a + b)


def _sub(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(5, 12)
    b = rng.randint(1, 4)
    question = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?"
    return Problem("sub", question, a - b)


def _mul(rng: random.Random) -> Problem:
    item = rng.choice(ITEMS)
    one, many = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 6), rng.randint(2, 4)
    question = f"A {one} holds {a} {item}. How many {item} are in {b} {many}?"
    return Problem("mul", question, a * b)


def _div(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    per, friends = rng.randint(2, 9), rng.randint(2, 6)
    total = per * friends
    question = (
        f"{name} shares {total} {item} equally among {friends} friends. "
        f"How many {item} does each friend get?"
    )
    return Problem("div", question, per)


def _two_step(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(4, 9), rng.randint(2, 4), rng.randint(1, 2)
    question = (
        f"{name} has {a} {item}. {name} finds {b} more and then loses {c}. "
        f"How many {item} does {name} have now?"
    )
    return Problem("two_step", question, a + b - c)


def _mul_add(rng: random.Random) -> Problem:
    item = rng.choice(ITEMS)
    one, many = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 6), rng.randint(2, 5), rng.randint(1, 9)
    question = (
        f"There are {b} {many} with {a} {item} in each {one}, and {c} more {item} on the table. "
        f"How many {item} are there in total?"
    )
    return Problem("mul_add", question, a * b + c)


# Asks for the step-by-step reasoning that makes answers of the long family 100-400 tokens
# long; the reward still reads the last number, which the answer line puts last.
STEP_BY_STEP = "Think step by step and explain your reasoning, then write 'Answer: N'."


def _long_steps(rng: random.Random) -> Problem:
    """Three operations (buy in containers, then lose or give some) asked step by step.

    The numbers stay small: the embedded model must solve a fair share of them for the
    rewards of a group to differ, which is what value estimation needs.
    """
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    one, many = rng.choice(CONTAINERS)
    start, boxes, per, lost = (
        rng.randint(4, 12),
        rng.randint(2, 3),
        rng.randint(2, 5),
        rng.randint(1, 4),
    )
    away = rng.choice((f"loses {lost} {item}", f"gives {lost} {item} to {friend}"))
    question = (
        f"{name} has {start} {item}. {name} buys {boxes} {many} with {per} {item} in each "
        f"{one}, then {away}. How many {item} does {name} have now? {STEP_BY_STEP}"
    )
    return Problem("long_steps", question, start + boxes * per - lost)


FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "two_step": _two_step,
    "mul_add": _mul_add,
    "long_steps": _long_steps,
}


def make_problem(family: str, rng: random.Random) -> Problem:
    """A fresh problem of ``family`` with numbers drawn from ``rng``."""
    try:
        return FAMILIES[family](rng)
    except KeyError:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}") from None


def last_number(text: str) -> float | None:
    """Value of the last number written in ``text`` (commas dropped), or None if there is none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def reward(text: str, answer: int) -> float:
    """1.0 when the last number of ``text`` equals ``answer``, else 0.0."""
    value = last_number(text)
    return float(value is not None and value == answer)
