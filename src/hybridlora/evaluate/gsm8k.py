"""GSM8K (grade-school math), generative.

Protocol: 8-shot with one fixed seeded set of training problems (their full worked answers ending in
``#### n``); evaluated on a seeded 256-problem test subset; greedy decoding of up to 256 new tokens, stopped at
the next ``Question:``; the answer is the number after ``####``, else the last number in the completion;
compared numerically with the gold number.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .data import BenchmarkError, hf_load, read_jsonl, resolve_source, seeded_shots

NAME = "gsm8k"
HF_ID = "openai/gsm8k"
DEFAULT_N = 256
NUM_FEWSHOT = 8
KIND = "generate"
MAX_NEW_TOKENS = 256
STOP = ("Question:", "</s>", "<|im_end|>", "<|endoftext|>")
PROTOCOL = ("8-shot (fixed seeded train problems), seeded 256-problem test subset, greedy <=256 new tokens "
            "until 'Question:', answer = number after '####' else the last number, numeric match")

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str | None) -> str | None:
    """'1,000' / '$5.00' / '7.' -> a canonical decimal string ('1000', '5', '7'); None when not a number."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


def extract_answer(completion: str) -> str | None:
    """The number after the first ``####``, else the last number anywhere; normalised, or None."""
    marker = completion.find("####")
    if marker >= 0:
        found = _NUMBER.search(completion[marker + 4:])
        if found:
            return normalize_number(found.group(0))
    numbers = _NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


def _item(row: dict, split: str, index: int) -> dict:
    fields = row if isinstance(row, dict) else {}
    missing = [key for key in ("question", "answer") if not isinstance(fields.get(key), str)]
    if missing:
        raise BenchmarkError(f"gsm8k: {split} row {index} has no {' or '.join(repr(k) for k in missing)} text; every "
                             "row needs {\"question\": ..., \"answer\": \"... #### <number>\"} (see shared/data/README.md)")
    answer = row["answer"]
    if "####" not in answer:
        raise BenchmarkError(f"gsm8k: {split} row {index} has no '#### <answer>'")
    return {"example_id": f"gsm8k/{split}/{index}", "question": row["question"], "answer": answer,
            "gold": normalize_number(answer.split("####")[-1].strip())}


def load(data_dir: str | Path | None = None, split: str = "test") -> tuple[list[dict], list[dict]]:
    """(evaluation items of ``split``, the fixed few-shot examples from train)."""
    root = resolve_source(NAME, data_dir, f"gsm8k/{split}.jsonl", HF_ID)
    if root is not None:
        shots = root / "gsm8k" / "train.jsonl"
        if not shots.is_file():
            raise BenchmarkError(f"gsm8k: the {NUM_FEWSHOT} few-shot examples come from {shots}, which is missing; "
                                 "copy gsm8k/train.jsonl into the data folder (see shared/data/README.md)")
        rows = {s: read_jsonl(root / "gsm8k" / f"{s}.jsonl") for s in {split, "train"}}
    else:
        data = hf_load(HF_ID, "main")
        rows = {s: list(data[s]) for s in {split, "train"}}
    items = [_item(r, split, i) for i, r in enumerate(rows[split])]
    train = [_item(r, "train", i) for i, r in enumerate(rows["train"])]
    return items, seeded_shots(train, NUM_FEWSHOT)


def render(item: dict, with_answer: bool) -> str:
    text = f"Question: {item['question'].strip()}\nAnswer:"
    return text + f" {item['answer'].strip()}\n\n" if with_answer else text


def prompt_parts(item: dict, shots: list[dict]) -> tuple[str, list[str], str]:
    return "", [render(s, True) for s in shots], render(item, False)


def score(item: dict, completion: str) -> dict:
    predicted = extract_answer(completion)
    return {"correct": int(predicted is not None and predicted == item["gold"]), "prediction": predicted,
            "gold": item["gold"]}
