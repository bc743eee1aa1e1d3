"""Training data: named domains and local files, normalised to chat-style examples.

Every source becomes a list of :class:`Example` — a stable id plus ``messages`` (``{"role", "content"}`` with
roles ``system``/``user``/``assistant``). Domains:

``gsm8k``       question -> worked answer ending ``#### n`` (train split only; the test split is never read)
``codealpaca``  instruction (+ input) -> output
``chat``        multi-turn conversations (offline copy: Anthropic HH-RLHF helpful-base, chosen side)

A local ``.jsonl``/``.json``/``.csv`` file is read with a field mapping (``prompt``/``response`` columns, or a
``messages`` column). Rows with missing or empty fields are skipped and counted, never fatal.
Where the data comes from: ``data_dir`` (the shared data folder layout) when given; otherwise the Hugging Face
hub when it is reachable (needs the ``datasets`` package); neither -> :class:`DataError` naming both options.
"""
from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


class DataError(ValueError):
    """Training data that cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class Example:
    id: str
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Domain:
    name: str
    local_path: str  # relative to the shared data folder
    hub_id: str
    hub_config: str | None
    hub_split: str
    hub_data_dir: str | None = None


DOMAINS: dict[str, Domain] = {
    "gsm8k": Domain("gsm8k", "gsm8k/train.jsonl", "openai/gsm8k", "main", "train"),
    "codealpaca": Domain("codealpaca", "codealpaca/code_alpaca_2k.json", "sahil2801/CodeAlpaca-20k", None, "train"),
    "chat": Domain("chat", "hh-rlhf/hh_rlhf_helpful_base_test_chosen.jsonl", "Anthropic/hh-rlhf", None, "test",
                   hub_data_dir="helpful-base"),
}
ROLES = ("system", "user", "assistant")


@dataclass
class DataSplit:
    """A seeded train subset plus a held-out validation slice, and the manifest of ids used."""
    train: list[Example]
    val: list[Example]
    manifest: dict[str, Any] = field(default_factory=dict)


# --- row -> Example ------------------------------------------------------------------------------
def _text(row: dict, key: str, *, allow_empty: bool = False) -> str | None:
    value = row.get(key)
    if value is None or not isinstance(value, (str, int, float)):
        return None
    value = str(value)
    if not value.strip() and not allow_empty:
        return None
    return value


def _gsm8k(row: dict, idx: int) -> tuple[Example | None, str | None]:
    q, a = _text(row, "question"), _text(row, "answer")
    if q is None or a is None:
        return None, "missing question/answer"
    if "####" not in a:
        return None, "answer has no '#### n' line"
    return Example(f"gsm8k/train/{idx:05d}", ({"role": "user", "content": q.strip()},
                                              {"role": "assistant", "content": a.strip()})), None


def _codealpaca(row: dict, idx: int) -> tuple[Example | None, str | None]:
    ins, out = _text(row, "instruction"), _text(row, "output")
    if ins is None or out is None:
        return None, "missing instruction/output"
    extra = _text(row, "input")
    prompt = ins.strip() + (f"\n\n{extra.strip()}" if extra else "")
    return Example(f"codealpaca/{idx:05d}", ({"role": "user", "content": prompt},
                                             {"role": "assistant", "content": out.strip()})), None


def _messages(raw: Any) -> tuple[tuple[dict[str, str], ...] | None, str | None]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None, "messages is not a list"
    if not isinstance(raw, list) or not raw:
        return None, "missing messages"
    out = []
    for m in raw:
        if not isinstance(m, dict):
            return None, "message is not an object"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return None, f"unknown role {role!r}"
        if not isinstance(content, str) or not content.strip():
            return None, "empty message"
        out.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant turn"
    return tuple(out), None


def _chat(row: dict, idx: int, *, messages_field: str = "messages", id_field: str = "id",
          prefix: str = "chat") -> tuple[Example | None, str | None]:
    msgs, why = _messages(row.get(messages_field))
    if msgs is None:
        return None, why
    rid = row.get(id_field)
    return Example(str(rid) if rid not in (None, "") else f"{prefix}/{idx:05d}", msgs), None


def _prompt_response(row: dict, idx: int, prompt: str, response: str, id_field: str, prefix: str):
    p, r = _text(row, prompt), _text(row, response)
    if p is None or r is None:
        return None, f"missing {prompt}/{response}"
    rid = row.get(id_field)
    ex_id = str(rid) if rid not in (None, "") else f"{prefix}/{idx:05d}"
    return Example(ex_id, ({"role": "user", "content": p.strip()}, {"role": "assistant", "content": r.strip()})), None


# --- reading files -------------------------------------------------------------------------------
def read_rows(path: Path) -> Iterable[dict]:
    """Rows of a .jsonl / .json (array) / .csv file. A .jsonl line that does not parse yields ``None``."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield row if isinstance(row, dict) else None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects")
        for row in data:
            yield row if isinstance(row, dict) else None
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            yield from csv.DictReader(fh)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")


def _convert(rows: Iterable[dict | None], convert) -> tuple[list[Example], Counter]:
    examples, skipped, seen = [], Counter(), set()
    for idx, row in enumerate(rows):
        if row is None:
            skipped["unparseable row"] += 1
            continue
        ex, why = convert(row, idx)
        if ex is None:
            skipped[why] += 1
        elif ex.id in seen:
            skipped["duplicate id"] += 1
        else:
            seen.add(ex.id)
            examples.append(ex)
    return examples, skipped


def _local_converter(path: Path, fields: dict[str, str] | None):
    fields = dict(fields or {})
    id_field = fields.get("id", "id")
    prefix = path.stem
    if "messages" in fields:
        return lambda row, i: _chat(row, i, messages_field=fields["messages"], id_field=id_field, prefix=prefix)
    prompt, response = fields.get("prompt", "prompt"), fields.get("response", "response")

    def convert(row, i):
        if "messages" not in fields and prompt not in row and "messages" in row:
            return _chat(row, i, id_field=id_field, prefix=prefix)
        return _prompt_response(row, i, prompt, response, id_field, prefix)

    return convert


_CONVERTERS = {"gsm8k": _gsm8k, "codealpaca": _codealpaca, "chat": _chat}


def _hub_rows(domain: Domain) -> Iterable[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"loading {domain.name} from the hub ({domain.hub_id}) needs the `datasets` package; "
                        "install it, or pass --data-dir with a local copy") from exc
    kwargs = {"split": domain.hub_split}
    if domain.hub_data_dir:
        kwargs["data_dir"] = domain.hub_data_dir
    ds = datasets.load_dataset(domain.hub_id, domain.hub_config, **kwargs)
    if domain.name == "chat":  # the hub has raw "chosen" transcripts: split them into turns
        return (_hh_to_messages(r["chosen"], i) for i, r in enumerate(ds))
    return iter(ds)


def _hh_to_messages(text: str, idx: int) -> dict:
    import re

    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.strip())
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]
    return {"id": f"hh-rlhf/helpful-base/test/{idx:05d}", "messages": msgs}


def load_examples(source: str, *, data_dir: str | Path | None = None,
                  fields: dict[str, str] | None = None) -> tuple[list[Example], Counter, str]:
    """All usable examples of a domain or local file: (examples, skipped reasons -> counts, where from)."""
    path = Path(source).expanduser()
    if source not in DOMAINS:
        if not path.is_file():
            raise DataError(f"unknown data {source!r}: use one of {', '.join(DOMAINS)} or a .jsonl/.json/.csv file")
        examples, skipped = _convert(read_rows(path), _local_converter(path, fields))
        origin = str(path)
    else:
        domain = DOMAINS[source]
        convert = _CONVERTERS[source]
        if data_dir is not None:
            file = Path(data_dir).expanduser() / domain.local_path
            if not file.is_file():
                raise DataError(f"{source}: {file} not found; --data-dir must point at the shared data folder "
                                f"(holding {domain.local_path})")
            examples, skipped = _convert(read_rows(file), convert)
            origin = str(file)
        else:
            from ..models import hub_reachable

            if not hub_reachable():
                raise DataError(f"{source}: the Hugging Face hub is not reachable and no --data-dir was given; "
                                f"connect to the hub (dataset {domain.hub_id}) or pass --data-dir DIR with "
                                f"{domain.local_path} under it")
            examples, skipped = _convert(_hub_rows(domain), convert)
            origin = f"hf:{domain.hub_id}"
    if not examples:
        raise DataError(f"{source}: no usable examples (skipped: {dict(skipped) or 'none'})")
    return examples, skipped, origin


def load_split(source: str, *, data_dir: str | Path | None = None, max_examples: int | None = None,
               val_examples: int | None = None, seed: int = 3407,
               fields: dict[str, str] | None = None) -> DataSplit:
    """A seeded, deterministic train subset and held-out validation slice.

    The examples are shuffled once with ``seed``; the first ``val_examples`` (default: 5 % of the data, at
    least 1 and at most 200) are validation, the next ``max_examples`` (default: all the rest) are training.
    So the validation slice does not depend on ``max_examples``, and a smaller subset is a prefix of a larger one.
    """
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be at least 1 (got {max_examples})")
    examples, skipped, origin = load_examples(source, data_dir=data_dir, fields=fields)
    n = len(examples)
    if val_examples is None:
        val_examples = min(200, max(1, math.ceil(0.05 * n))) if n > 1 else 0
    if val_examples < 0 or val_examples >= n:
        raise DataError(f"{source}: val_examples={val_examples} leaves no training data ({n} usable examples)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in order[:val_examples]]
    rest = order[val_examples:]
    train = [examples[i] for i in (rest if max_examples is None else rest[:max_examples])]
    manifest = {
        "source": source, "origin": origin, "seed": seed, "usable_examples": n,
        "skipped_rows": dict(skipped), "num_train": len(train), "num_val": len(val),
        "train_ids": [e.id for e in train], "val_ids": [e.id for e in val],
    }
    return DataSplit(train, val, manifest)
