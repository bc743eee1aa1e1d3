"""ARC-Challenge (AI2 reasoning challenge, the hard set): 3-5 choices, labelled A-E or 1-5.

Protocol: 25-shot with one fixed seeded set of training questions; evaluated on the 299-question Dev
(= HF ``validation``) split; scored by the log-probability of the answer letter (" A".." E", numeric labels
shown as letters) after ``Answer:``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import BenchmarkError, hf_load, letters, mc_block, read_jsonl, resolve_source, seeded_shots

NAME = "arc_challenge"
HF_ID = "allenai/ai2_arc"
DEFAULT_N = 299
NUM_FEWSHOT = 25
KIND = "multiple_choice"
PROTOCOL = ("25-shot (fixed seeded training questions), Dev/validation split (299), one forward per question, "
            "argmax of log p(' A'..) at the last prompt position")
_FILES = {"train": "Train", "validation": "Dev", "dev": "Dev", "test": "Test"}


def _item(row: dict[str, Any]) -> dict[str, Any]:
    question = row["question"]
    if isinstance(question, dict):  # the AI2 jsonl layout
        stem, choices = question["stem"], question["choices"]
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
    else:  # the HF layout
        stem, texts, labels = question, list(row["choices"]["text"]), list(row["choices"]["label"])
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise BenchmarkError(f"arc: {row.get('id')}: answer {key!r} not among labels {labels}")
    return {"example_id": row["id"], "question": stem, "choices": texts, "labels": labels, "gold": labels.index(key)}


def load(data_dir: str | Path | None = None, split: str = "validation") -> tuple[list[dict], list[dict]]:
    """(evaluation items of ``split``, the fixed few-shot examples from train)."""
    if split not in _FILES:
        raise BenchmarkError(f"arc: unknown split {split!r} (train, validation, test)")
    root = resolve_source(NAME, data_dir, "arc/ARC-Challenge", HF_ID)
    if root is not None:
        def read(which: str) -> list[dict]:
            return [_item(r) for r in read_jsonl(root / "arc" / "ARC-Challenge" / f"ARC-Challenge-{_FILES[which]}.jsonl")]
        items, train = read(split), read("train")
    else:
        data = hf_load(HF_ID, "ARC-Challenge")
        items = [_item(r) for r in data["validation" if split == "dev" else split]]
        train = [_item(r) for r in data["train"]]
    return items, seeded_shots(train, NUM_FEWSHOT)


def render(item: dict, with_answer: bool) -> str:
    text = mc_block(item["question"], item["choices"])
    return text + f" {letters(len(item['choices']))[item['gold']]}\n\n" if with_answer else text


def prompt_parts(item: dict, shots: list[dict]) -> tuple[str, list[str], str]:
    return "", [render(s, True) for s in shots], render(item, False)
