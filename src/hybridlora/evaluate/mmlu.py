"""MMLU (hendrycks test): 57 subjects, four choices.

Protocol: 5-shot with the five dev questions of the *same subject* as header examples; evaluated on a seeded
512-question subset of the test split; scored by the log-probability of " A".." D" after ``Answer:``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from .data import BenchmarkError, hf_load, letters, mc_block, resolve_source, unreadable

NAME = "mmlu"
HF_ID = "cais/mmlu"
DEFAULT_N = 512
NUM_FEWSHOT = 5
KIND = "multiple_choice"
PROTOCOL = ("5-shot (same-subject dev questions), seeded 512-question test subset, one forward per question, "
            "argmax of log p(' A'..' D') at the last prompt position")


def _read_csv(path: Path, subject: str, split: str) -> list[dict[str, Any]]:
    items = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row_no, row in enumerate(csv.reader(handle)):
                if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                    raise BenchmarkError(f"{path}: row {row_no} is not `question,A,B,C,D,answer`")
                items.append({"example_id": f"{subject}/{split}/{row_no}", "subject": subject, "question": row[0],
                              "choices": row[1:5], "gold": "ABCD".index(row[5].strip())})
    except (OSError, UnicodeDecodeError) as exc:
        raise unreadable(path, exc) from exc
    return items


def load(data_dir: str | Path | None = None, split: str = "test") -> tuple[list[dict], dict[str, list[dict]]]:
    """(evaluation items of ``split``, dev items by subject)."""
    root = resolve_source(NAME, data_dir, f"mmlu/{split}", HF_ID)
    if root is not None:
        def read(which: str) -> list[dict]:
            out = []
            for path in sorted((root / "mmlu" / which).glob(f"*_{which}.csv")):
                out += _read_csv(path, path.name[: -len(f"_{which}.csv")], which)
            return out
        items, dev = read(split), read("dev")
    else:
        data = hf_load(HF_ID, "all")
        def convert(rows, which):
            counters: dict[str, int] = {}
            out = []
            for row in rows:
                subject = row["subject"]
                counters[subject] = counters.get(subject, -1) + 1
                out.append({"example_id": f"{subject}/{which}/{counters[subject]}", "subject": subject,
                            "question": row["question"], "choices": list(row["choices"]), "gold": int(row["answer"])})
            return out
        items = convert(data["validation" if split == "val" else split], split)
        dev = convert(data["dev"], "dev")
    if not items:
        raise BenchmarkError(f"mmlu: no {split} questions found")
    by_subject: dict[str, list[dict]] = {}
    for item in dev:
        by_subject.setdefault(item["subject"], []).append(item)
    return items, by_subject


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def render(item: dict, with_answer: bool) -> str:
    text = mc_block(item["question"], item["choices"])
    return text + f" {letters(4)[item['gold']]}\n\n" if with_answer else text


def prompt_parts(item: dict, shots: dict[str, list[dict]]) -> tuple[str, list[str], str]:
    own = shots.get(item["subject"], [])[:NUM_FEWSHOT]
    return header(item["subject"]), [render(s, True) for s in own], render(item, False)
