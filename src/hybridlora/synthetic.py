"""Synthetic tasks small language models can learn on a CPU: the demo's pretraining mixture and its fine-tuning
domains, built on the lab's probes (docs/LAB.md, "Synthetic domains").

Each task turns a seeded random stream into (prompt, answer) pairs whose answer is right by construction. The
same text is used three ways: as pretraining examples (``lab demo-models``), as a fine-tuning domain
(``hybridlora train --data syn_reverse``, a study's ``domains``) and as a benchmark (``evaluate/syn_*.py``: greedy
answer, exact match). Every rendering goes through :func:`render`, the project's plain chat template (the one
``data.formatting`` uses for tokenizers without a chat template), so what a model learns in one role is what the
others ask for.

Tasks (why each is in the set: docs/LAB.md):

* ``syn_recall`` — associative recall (MAD in-context recall): pairs ``a7 c2 k9``, then a key; answer its value.
* ``syn_copy`` — copying (MAD selective copying without the blanks): repeat a short letter string.
* ``syn_arith`` — a small arithmetic language: ``a+b`` or ``a-b`` on single digits (never negative).
* ``syn_count`` — the length of a letter string (2-4): a question about the span copying reads, answered by
  counting its positions.
* ``syn_first`` — the first letter of a letter string: copying one position of the span.
* ``syn_recall_inverse`` — a new recall variant: the pairs, then a *value*; answer its key (lookup the other way).
* ``syn_reverse`` — a copying variant: the letter string backwards.

The first three are the pretraining mixture (the demo's "general ability" benchmarks); the others are fine-tuning
domains, each close to one pretraining task so that training on it can both help and interfere. The demo trains on
``syn_count`` and ``syn_first``, which its ~250k-parameter models learn in 48 LoRA steps; inverse recall and
reversing are harder domains they barely learn (docs/LAB.md has the measurements).

Standard library only: the data registry, the benchmarks, the lab and the tests all import this module.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

VERSION = 1  # bump when any task's text changes (it is part of the demo models' and data's fingerprints)
TRAIN_STREAM, TEST_STREAM = "train", "test"  # never share draws: test items are not trained on by construction

_LETTERS = string.ascii_lowercase
_DIGITS = string.digits


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], tuple[str, str]]  # one (prompt, answer) from a seeded stream
    chance: float  # accuracy of the best answer-blind guess (documented per task)
    role: str  # "pretraining" (general ability) or "domain" (fine-tuning target)
    why: str


def _pairs(rng: random.Random, distinct_values: bool) -> list[tuple[str, str]]:
    keys = rng.sample(_LETTERS, rng.randint(3, 5))
    values = rng.sample(_DIGITS, len(keys)) if distinct_values else [rng.choice(_DIGITS) for _ in keys]
    return list(zip(keys, values))


def _listing(pairs: list[tuple[str, str]]) -> str:
    return " ".join(k + v for k, v in pairs)


def recall(rng: random.Random) -> tuple[str, str]:
    pairs = _pairs(rng, distinct_values=False)
    key, value = rng.choice(pairs)
    return f"recall {_listing(pairs)} {key}", value


def recall_inverse(rng: random.Random) -> tuple[str, str]:
    pairs = _pairs(rng, distinct_values=True)  # distinct values: the key asked for is unique
    key, value = rng.choice(pairs)
    return f"inverse {_listing(pairs)} {value}", key


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 4)))


def copy(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"copy {word}", word


def reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"reverse {word}", word[::-1]


def count(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"count {word}", str(len(word))


def first(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"first {word}", word[0]


def arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"{a}+{b}", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}", str(a - b)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("syn_recall", recall, 0.1, "pretraining",
         "in-context associative recall, the capability the MAD probes find hybrids differ in; the value is one "
         "of 10 digits (chance 1/10)"),
    Task("syn_copy", copy, 1 / 26 ** 2, "pretraining",
         "copying a span verbatim (attention's strength, hard for a fixed-size recurrent state); exact match of "
         "2-4 letters (chance at most 26^-2)"),
    Task("syn_arith", arith, 1 / 19, "pretraining",
         "a small arithmetic language: facts stored in the weights (MLP memorisation), not in the context; "
         "answers 0-18 (chance 1/19)"),
    Task("syn_count", count, 1 / 3, "domain",
         "counting the letters of a span (2-4): reads the positions copying reads, but the answer is their number, "
         "which a recurrent state can accumulate; chance 1/3"),
    Task("syn_first", first, 1 / 26, "domain",
         "copying one position (the first letter) of a span: a small change to the copying circuit, so training "
         "on it can overwrite whole-span copying (forgetting); chance 1/26"),
    Task("syn_recall_inverse", recall_inverse, 1 / 3, "domain",
         "a new recall variant (look a key up by its value): reuses the recall circuit the other way round, so "
         "training on it can transfer to or interfere with syn_recall; chance: a guess among the 3-5 keys shown "
         "(at most 1/3)"),
    Task("syn_reverse", reverse, 1 / 26 ** 2, "domain",
         "copying backwards: the same positions as syn_copy read in the other order, so training on it can "
         "overwrite copying (forgetting); exact match of 2-4 letters (chance at most 26^-2)"),
)}
PRETRAINING = tuple(n for n, t in TASKS.items() if t.role == "pretraining")
DOMAINS = tuple(n for n, t in TASKS.items() if t.role == "domain")


class SyntheticError(ValueError):
    """An unknown task name or a bad count; the message lists the tasks."""


def task(name: str) -> Task:
    if name not in TASKS:
        raise SyntheticError(f"unknown synthetic task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def stream(name: str, seed: int, split: str) -> random.Random:
    """The seeded stream of one task and split (train and test streams are independent)."""
    return random.Random(f"hybridlora-synthetic-{VERSION}-{name}-{split}-{seed}")


def pairs(name: str, n: int, *, seed: int = 0, split: str = TRAIN_STREAM) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of task ``name``; the same arguments always give the same pairs."""
    if n < 0:
        raise SyntheticError(f"n must be >= 0, got {n}")
    rng = stream(name, seed, split)
    make = task(name).make
    return [make(rng) for _ in range(n)]


# The project's plain chat template (data.formatting.PLAIN_TEMPLATE / PLAIN_SEPARATOR, written out here so this
# module stays dependency-free; tests/test_synthetic.py checks that they agree).
USER_HEADER = "### User:\n"
ASSISTANT_HEADER = "\n\n### Assistant:\n"


def render(prompt: str, answer: str | None = None) -> str:
    """The text a model sees: the prompt as a user turn, then the assistant cue (and the answer, if given)."""
    return f"{USER_HEADER}{prompt}{ASSISTANT_HEADER}" + (answer or "")

