"""HellaSwag (validation): pick the right ending of four, here as a lettered multiple-choice question.

Protocol: 10-shot with one fixed seeded set of validation items (no train split is available offline; those
items are removed from the evaluation pool); evaluated on a seeded 512-item subset of the rest; scored by the
log-probability of " A".." D" after ``Answer:``. Local data is klosax's preprocessed validation file
(``query`` = activity label + ": " + context, bracket markers removed); the hub version is cleaned the same way.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .data import hf_load, letters, mc_block, read_jsonl, resolve_source, seeded_shots

NAME = "hellaswag"
HF_ID = "Rowan/hellaswag"
DEFAULT_N = 512
NUM_FEWSHOT = 10
KIND = "multiple_choice"
PROTOCOL = ("10-shot (fixed seeded validation items, excluded from evaluation), seeded 512-item validation subset, "
            "endings as lettered choices, one forward per question, argmax of log p(' A'..' D')")
_FILE = "hellaswag/hellaswag_val_preprocessed.jsonl"


def _clean(text: str) -> str:
    text = re.sub(r"\[[a-z]+\]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _item(idx: int, query: str, endings: list[str], label: int) -> dict[str, Any]:
    return {"example_id": f"hellaswag/validation/{idx}", "question": query, "choices": list(endings), "gold": int(label)}


def load(data_dir: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """(evaluation pool, the fixed few-shot examples); the shots are not in the pool."""
    root = resolve_source(NAME, data_dir, _FILE, HF_ID)
    if root is not None:
        items = [_item(r["idx"], r["query"], r["endings"], r["label"]) for r in read_jsonl(root / _FILE)]
    else:
        rows = hf_load(HF_ID)["validation"]
        items = [_item(i, _clean(f"{r['activity_label']}: {r['ctx']}"), [_clean(e) for e in r["endings"]], r["label"])
                 for i, r in enumerate(rows)]
    shots = seeded_shots(items, NUM_FEWSHOT)
    taken = {s["example_id"] for s in shots}
    return [i for i in items if i["example_id"] not in taken], shots


def render(item: dict, with_answer: bool) -> str:
    text = mc_block(item["question"], item["choices"])
    return text + f" {letters(4)[item['gold']]}\n\n" if with_answer else text


def prompt_parts(item: dict, shots: list[dict]) -> tuple[str, list[str], str]:
    return "", [render(s, True) for s in shots], render(item, False)
