"""Training data: named domains, local files and Hugging Face datasets, normalised to chat-style examples.

Every source becomes a list of :class:`Example` — a stable id plus ``messages`` (``{"role", "content"}`` with
roles ``system``/``user``/``assistant``). Domains (the study's three):

``gsm8k``       question -> worked answer ending ``#### n`` (train split only; the test split is never trained on)
``codealpaca``  instruction (+ input) -> output
``chat``        multi-turn conversations. Hub: ``HuggingFaceH4/ultrachat_200k`` (split ``train_sft``, as in the
                study); offline copy under ``--data-dir``: Anthropic HH-RLHF helpful-base, chosen side

Where a domain comes from: ``data_dir`` (laid out like the shared data folder) when given, else the Hugging Face
hub when it is reachable (needs the ``datasets`` package); neither -> one :class:`DataError` naming both.

Any other source is a local ``.jsonl``/``.json``/``.csv`` file or a Hugging Face dataset id (``owner/name`` or
``hf:owner/name``, with ``split``/``config``), read through a field mapping:

``prompt``/``response``  columns of a single-turn example (``a+b`` joins several non-empty columns with a blank line)
``messages``             a column holding a list of ``{"role", "content"}`` (or ShareGPT ``{"from", "value"}``) turns
``system``               optional column with a system prompt
``id``                   optional column with a stable row id (default: ``<name>/<row number>``)

Without a mapping the columns are guessed (``messages``, ``conversations``, ``prompt``/``response``,
``prompt``/``completion``, ``instruction+input``/``output``, ``question``/``answer``, ``input``/``output``).
Rows with missing or empty fields are skipped and counted, never fatal.

Benchmark guard: with ``data_dir`` given, any example whose user turn is a GSM8K *test* question (whitespace-
and case-normalised exact match) is dropped and counted, whatever the source, so benchmark test items are never
trained on. The manifest records whether the guard was on.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


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
    description: str = ""


DOMAINS: dict[str, Domain] = {
    "gsm8k": Domain("gsm8k", "gsm8k/train.jsonl", "openai/gsm8k", "main", "train",
                    description="grade-school math: question -> worked answer ending '#### n'"),
    "codealpaca": Domain("codealpaca", "codealpaca/code_alpaca_2k.json", "sahil2801/CodeAlpaca-20k", None, "train",
                         description="code instructions: instruction (+ input) -> output"),
    "chat": Domain("chat", "hh-rlhf/hh_rlhf_helpful_base_test_chosen.jsonl", "HuggingFaceH4/ultrachat_200k", None,
                   "train_sft", description="multi-turn chat (hub: UltraChat 200k; offline: HH-RLHF helpful-base)"),
}
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
FIELD_KEYS = ("prompt", "response", "messages", "system", "id")
# column guesses for files and hub datasets without a field mapping, first match wins
GUESSES: tuple[dict[str, str], ...] = (
    {"messages": "messages"}, {"messages": "conversations"},
    {"prompt": "prompt", "response": "response"}, {"prompt": "prompt", "response": "completion"},
    {"prompt": "instruction+input", "response": "output"}, {"prompt": "question", "response": "answer"},
    {"prompt": "input", "response": "output"},
)
FILE_TYPES = (".jsonl", ".json", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class DataSplit:
    """A seeded train subset plus a held-out validation slice, and the manifest of ids used."""
    train: list[Example]
    val: list[Example]
    manifest: dict[str, Any] = field(default_factory=dict)


# --- row -> Example ------------------------------------------------------------------------------
def _text(row: dict, key: str) -> str | None:
    """The stripped non-empty text of ``row[key]`` (``a+b``: the non-empty ones joined by a blank line)."""
    parts = []
    for k in key.split("+"):
        value = row.get(k)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
            parts.append(str(value).strip())
        elif "+" not in key or k == key.split("+")[0]:
            return None  # the only (or the first, main) column is missing or empty
    return "\n\n".join(parts) if parts else None


def _pair(prompt: str, response: str, system: str | None = None) -> tuple[dict[str, str], ...]:
    head = ({"role": "system", "content": system},) if system else ()
    return head + ({"role": "user", "content": prompt}, {"role": "assistant", "content": response})


def _gsm8k(row: dict, idx: int) -> tuple[Example | None, str | None]:
    q, a = _text(row, "question"), _text(row, "answer")
    if q is None or a is None:
        return None, "missing question/answer"
    if "####" not in a:
        return None, "answer has no '#### n' line"
    return Example(f"gsm8k/train/{idx:05d}", _pair(q, a)), None


def _codealpaca(row: dict, idx: int) -> tuple[Example | None, str | None]:
    ins, out = _text(row, "instruction"), _text(row, "output")
    if ins is None or out is None:
        return None, "missing instruction/output"
    return Example(f"codealpaca/{idx:05d}", _pair(_text(row, "instruction+input") or ins, out)), None


def _messages(raw: Any) -> tuple[tuple[dict[str, str], ...] | None, str | None]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None, "messages is not a list"
    if not isinstance(raw, (list, tuple)) or not raw:
        return None, "missing messages"
    out = []
    for m in raw:
        if not isinstance(m, dict):
            return None, "message is not an object"
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            return None, f"unknown role {role!r}"
        if not isinstance(content, str) or not content.strip():
            return None, "empty message"
        out.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant turn"
    return tuple(out), None


def _row_id(row: dict, idx: int, id_field: str, prefix: str) -> str:
    rid = row.get(id_field)
    return str(rid) if rid not in (None, "") else f"{prefix}/{idx:05d}"


def _chat(row: dict, idx: int, *, messages_field: str = "messages", id_field: str = "id",
          prefix: str = "chat", system_field: str | None = None) -> tuple[Example | None, str | None]:
    msgs, why = _messages(row.get(messages_field))
    if msgs is None:
        return None, why
    system = _text(row, system_field) if system_field else None
    if system and msgs[0]["role"] != "system":
        msgs = ({"role": "system", "content": system},) + msgs
    return Example(_row_id(row, idx, id_field, prefix), msgs), None


def _ultrachat(row: dict, idx: int) -> tuple[Example | None, str | None]:
    ex, why = _chat(row, idx, id_field="", prefix="ultrachat_200k/train_sft")
    if ex is None or not row.get("prompt_id"):
        return ex, why
    return Example(f"ultrachat_200k/{row['prompt_id']}", ex.messages), None


def _mapped_converter(fields: dict[str, str], prefix: str) -> Callable[[dict, int], tuple[Example | None, str | None]]:
    id_field, system_field = fields.get("id", "id"), fields.get("system")
    if "messages" in fields:
        return lambda row, i: _chat(row, i, messages_field=fields["messages"], id_field=id_field, prefix=prefix,
                                    system_field=system_field)
    prompt, response = fields["prompt"], fields["response"]

    def convert(row: dict, i: int):
        p, r = _text(row, prompt), _text(row, response)
        if p is None or r is None:
            return None, f"missing {prompt}/{response}"
        system = _text(row, system_field) if system_field else None
        return Example(_row_id(row, i, id_field, prefix), _pair(p, r, system)), None

    return convert


def resolve_fields(fields: dict[str, str] | None, columns: Iterable[str], source: str) -> dict[str, str]:
    """The field mapping to use: ``fields`` checked, or guessed from ``columns``."""
    columns = set(columns)
    if fields:
        fields = dict(fields)
        unknown = set(fields) - set(FIELD_KEYS)
        if unknown:
            raise DataError(f"{source}: unknown field key(s) {', '.join(sorted(unknown))}; use {', '.join(FIELD_KEYS)}")
        if "messages" in fields and ({"prompt", "response"} & set(fields)):
            raise DataError(f"{source}: map either messages or prompt/response, not both")
        if "messages" not in fields and not {"prompt", "response"} <= set(fields):
            raise DataError(f"{source}: the field mapping needs messages=COL, or both prompt=COL and response=COL")
        if columns:
            main = ([fields["messages"]] if "messages" in fields
                    else [fields["prompt"].split("+")[0], fields["response"]])
            absent = [c for c in main if c not in columns]
            if absent:
                raise DataError(f"{source}: no column {', '.join(absent)} (columns: {', '.join(sorted(columns))})")
        return fields
    for guess in GUESSES:
        if all(v.split("+")[0] in columns for v in guess.values()):
            return dict(guess)
    raise DataError(f"{source}: cannot tell which columns hold the prompt and response (columns: "
                    f"{', '.join(sorted(columns)) or 'none'}); map them: prompt=COL response=COL, or messages=COL "
                    "(CLI: --field prompt=COL --field response=COL)")


# --- reading files -------------------------------------------------------------------------------
def read_rows(path: Path) -> Iterable[dict | None]:
    """Rows of a .jsonl / .json (array) / .csv file. A row that does not parse (or is no object) yields ``None``;
    a file that cannot be read or is not UTF-8 raises one :class:`DataError` saying where and what to do."""
    try:
        yield from _rows(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (at byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check the file and its permissions") from None


def _rows(path: Path) -> Iterable[dict | None]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: row {number} is not UTF-8 text (at byte {exc.start} of the row); "
                                    "save the file as UTF-8") from None
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


def _first_columns(rows: list[dict | None]) -> list[str]:
    return list(next((r for r in rows if isinstance(r, dict)), {}))


# --- the Hugging Face hub --------------------------------------------------------------------------
def _offline_env() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in flags)


def load_hub_dataset(hub_id: str, *, config: str | None = None, split: str = "train", data_dir: str | None = None,
                     offline_hint: str) -> Any:
    """``datasets.load_dataset(hub_id, config, split=split)``, or a :class:`DataError` that names the hub id and
    ``offline_hint`` (the local alternative). With HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, the datasets cache is
    tried; otherwise an unreachable hub fails at once instead of after long network retries."""
    from ..models import hub_reachable

    where = f"{hub_id}" + (f" (config {config})" if config else "") + f", split {split}"
    if not _offline_env() and not hub_reachable():
        raise DataError(f"the Hugging Face hub is not reachable, so {where} cannot be loaded; connect to the hub, "
                        f"or {offline_hint}")
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"loading {where} from the hub needs the `datasets` package (pip install datasets); "
                        f"or {offline_hint}") from exc
    kwargs: dict[str, Any] = {"split": split}
    if data_dir:
        kwargs["data_dir"] = data_dir
    try:
        return datasets.load_dataset(hub_id, config, **kwargs)
    except Exception as exc:  # network, gated repo, unknown split/config: one line, both options
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not load {where} from the Hugging Face hub ({msg}); {offline_hint}") from exc


# --- benchmark guard -------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def benchmark_questions(data_dir: str | Path | None) -> dict[str, str]:
    """Normalised benchmark test prompts (GSM8K test questions) -> label; empty without a data folder."""
    if data_dir is None:
        return {}
    test = Path(data_dir).expanduser() / "gsm8k" / "test.jsonl"
    if not test.is_file():
        return {}
    out = {}
    for i, row in enumerate(read_rows(test)):
        if row and isinstance(row.get("question"), str):
            out[_norm(row["question"])] = f"gsm8k/test/{i:05d}"
    return out


def _guard(examples: list[Example], skipped: Counter, questions: dict[str, str]) -> list[Example]:
    if not questions:
        return examples
    kept = []
    for ex in examples:
        if any(m["role"] == "user" and _norm(m["content"]) in questions for m in ex.messages):
            skipped["GSM8K test item (benchmark, never trained on)"] += 1
        else:
            kept.append(ex)
    return kept


# --- sources ---------------------------------------------------------------------------------------
def source_kind(source: str) -> str:
    """"domain" | "synthetic" | "file" | "hub" for a --data value (an existing file wins over a hub-id-like
    name)."""
    from .. import synthetic

    if source in DOMAINS:
        return "domain"
    if source in synthetic.TASKS:
        return "synthetic"
    path = Path(source).expanduser()
    if path.is_file():
        return "file"
    if source.startswith("hf:") or (_HUB_ID.match(source) and path.suffix.lower() not in FILE_TYPES):
        return "hub"
    if path.suffix.lower() in FILE_TYPES:
        raise DataError(f"data file {source} not found")
    raise DataError(f"unknown data {source!r}: use one of {', '.join(DOMAINS)}, a synthetic task "
                    f"({', '.join(synthetic.TASKS)}), a .jsonl/.json/.csv file, or a Hugging Face dataset id (owner/name)")


def load_examples(source: str, *, data_dir: str | Path | None = None, fields: dict[str, str] | None = None,
                  split: str | None = None, config: str | None = None) -> tuple[list[Example], Counter, str]:
    """All usable examples of a source: (examples, skipped reasons -> counts, where from).

    ``split``/``config`` select a Hugging Face dataset's split (default ``train``) and configuration.
    """
    kind = source_kind(source)
    if kind == "synthetic":
        if fields:
            raise DataError(f"{source} is a synthetic task with fixed fields; a field mapping applies to files and "
                            "hub datasets only")
        examples, skipped, origin = _synthetic_examples(source)
    elif kind == "domain":
        if fields:
            raise DataError(f"{source} is a built-in domain with fixed fields; a field mapping applies to files "
                            "and hub datasets only")
        domain = DOMAINS[source]
        convert = {"gsm8k": _gsm8k, "codealpaca": _codealpaca, "chat": _chat}[source]
        if data_dir is not None:
            file = Path(data_dir).expanduser() / domain.local_path
            if not file.is_file():
                raise DataError(f"{source}: {file} not found; --data-dir must point at the shared data folder "
                                f"(holding {domain.local_path})")
            examples, skipped = _convert(read_rows(file), convert)
            origin = str(file.resolve())
        else:
            ds = load_hub_dataset(domain.hub_id, config=domain.hub_config, split=domain.hub_split,
                                  data_dir=domain.hub_data_dir,
                                  offline_hint=f"pass --data-dir DIR with a local copy at DIR/{domain.local_path}")
            examples, skipped = _convert(iter(ds), _ultrachat if source == "chat" else convert)
            origin = f"hf:{domain.hub_id}/{domain.hub_split}"
    elif kind == "file":
        path = Path(source).expanduser()
        rows = list(read_rows(path))
        columns = _first_columns(rows)
        if path.suffix.lower() == ".csv" and not columns:
            try:
                with path.open(encoding="utf-8", newline="") as fh:
                    columns = next(csv.reader(fh), [])
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: cannot be read as UTF-8 CSV ({exc}); check the file") from None
        mapping = resolve_fields(fields, columns, source)
        examples, skipped = _convert(rows, _mapped_converter(mapping, path.stem))
        origin = str(path.resolve())
    else:
        hub_id = source[3:] if source.startswith("hf:") else source
        split = split or "train"
        ds = load_hub_dataset(hub_id, config=config, split=split,
                              offline_hint="download it and pass the local .jsonl/.json/.csv file as --data")
        columns = list(getattr(ds, "column_names", None) or _first_columns(list(ds)[:1]))
        mapping = resolve_fields(fields, columns, source)
        examples, skipped = _convert(iter(ds), _mapped_converter(mapping, f"{hub_id}/{split}"))
        origin = f"hf:{hub_id}" + (f"/{config}" if config else "") + f"/{split}"
    examples = _guard(examples, skipped, benchmark_questions(data_dir))
    if not examples:
        raise DataError(f"{source}: no usable examples (skipped: {dict(skipped) or 'none'})")
    return examples, skipped, origin


SYNTHETIC_EXAMPLES = 4000
"""Training examples a synthetic task offers (generated from its training stream; a study takes max_examples)."""


def synthetic_example(name: str, index: int, prompt: str, answer: str) -> Example:
    """One synthetic (prompt, answer) pair as a single-turn example (the demo models' pretraining uses it too)."""
    return Example(f"{name}/train/{index:05d}", _pair(prompt, answer))


def _synthetic_examples(name: str) -> tuple[list[Example], Counter, str]:
    from .. import synthetic

    rows = synthetic.pairs(name, SYNTHETIC_EXAMPLES, seed=0, split=synthetic.TRAIN_STREAM)
    examples = [synthetic_example(name, i, p, a) for i, (p, a) in enumerate(rows)]
    return examples, Counter(), f"generated: hybridlora.synthetic v{synthetic.VERSION}, {name}, train stream, seed 0"


def load_split(source: str, *, data_dir: str | Path | None = None, max_examples: int | None = None,
               val_examples: int | None = None, seed: int = 3407, fields: dict[str, str] | None = None,
               split: str | None = None, config: str | None = None) -> DataSplit:
    """A seeded, deterministic train subset and held-out validation slice.

    The examples are shuffled once with ``seed``; the first ``val_examples`` (default: 5 % of the data, at
    least 1 and at most 200) are validation, the next ``max_examples`` (default: all the rest) are training.
    So the validation slice does not depend on ``max_examples``, and a smaller subset is a prefix of a larger one.
    """
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be at least 1 (got {max_examples})")
    examples, skipped, origin = load_examples(source, data_dir=data_dir, fields=fields, split=split, config=config)
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
    guard = benchmark_questions(data_dir)
    manifest = {
        "source": source, "origin": origin, "seed": seed, "usable_examples": n,
        "skipped_rows": dict(skipped), "num_train": len(train), "num_val": len(val),
        "benchmark_guard": f"on: {len(guard)} GSM8K test questions excluded from training" if guard
        else "off: no GSM8K test file (pass --data-dir)",
        "train_ids": [e.id for e in train], "val_ids": [e.id for e in val],
    }
    if fields:
        manifest["fields"] = dict(fields)
    return DataSplit(train, val, manifest)
