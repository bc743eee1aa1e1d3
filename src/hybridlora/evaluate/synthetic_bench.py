"""What the synthetic benchmarks share (``syn_recall``, ``syn_copy``, ``syn_arith``, ``syn_count``, ``syn_first``,
``syn_recall_inverse``, ``syn_reverse``; one module each, tasks in :mod:`hybridlora.synthetic`).

Protocol: zero-shot; a fixed pool of 512 test items generated from the task's *test* stream (seed 0, never the
training stream), the study's seeded subset of it; the prompt is the task's plain-template rendering (the format
the demo models were pretrained and are fine-tuned in); greedy decoding of up to 8 new tokens, stopped at a
newline; exact match of the stripped completion with the generated answer. The items need no data folder: they
are the same on every machine.
"""
from __future__ import annotations

from .. import synthetic

POOL = 512
DEFAULT_N = 256
NUM_FEWSHOT = 0
KIND = "generate"
MAX_NEW_TOKENS = 8
STOP = ("\n", "###")
PROTOCOL = ("zero-shot, seeded subset of 512 generated test items (test stream, seed 0), plain-template prompt, "
            "greedy <=8 new tokens until a newline, exact match")


def load(name: str) -> tuple[list[dict], list]:
    """(the task's test items, no few-shot examples)."""
    items = [{"example_id": f"{name}/test/{i}", "prompt": prompt, "gold": answer}
             for i, (prompt, answer) in enumerate(synthetic.pairs(name, POOL, seed=0, split=synthetic.TEST_STREAM))]
    return items, []


def prompt_parts(item: dict, shots: list) -> tuple[str, list[str], str]:
    return "", [], synthetic.render(item["prompt"])


def score(item: dict, completion: str) -> dict:
    predicted = completion.strip()
    return {"correct": int(predicted == item["gold"]), "prediction": predicted, "gold": item["gold"]}
