"""HumanEval (164 Python problems), zero-shot code completion.

Protocol: the problem's prompt (signature + docstring) as is; greedy completion of up to 512 new tokens,
stopped at a new top-level ``def``/``class``/``if``/``print``; pass@1 *only* when code execution is explicitly
allowed (otherwise reported as not run): prompt + completion run in the sandbox and only answer calls, the
problem's tests run in a trusted process that alone decides "passed" (:func:`.sandbox.run_humaneval`).
Completions made elsewhere are scored by :func:`score_completions` (``hybridlora eval --score-completions``).
"""
from __future__ import annotations

from pathlib import Path

from .data import hf_load, read_jsonl, resolve_source

NAME = "humaneval"
HF_ID = "openai/openai_humaneval"
DEFAULT_N = 164
NUM_FEWSHOT = 0
KIND = "generate"
MAX_NEW_TOKENS = 512
STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n```", "<|endoftext|>", "</s>")
PROTOCOL = ("0-shot, all 164 problems, greedy <=512 new tokens until a new top-level def/class/if/print, "
            "pass@1 by sandboxed execution only with explicit permission")
_FILE = "humaneval/HumanEval.jsonl.gz"


def load(data_dir: str | Path | None = None) -> tuple[list[dict], None]:
    root = resolve_source(NAME, data_dir, _FILE, HF_ID)
    rows = read_jsonl(root / _FILE) if root is not None else list(hf_load(HF_ID)["test"])
    items = [{"example_id": r["task_id"], "task_id": r["task_id"], "prompt": r["prompt"], "test": r["test"],
              "entry_point": r["entry_point"]} for r in rows]
    return items, None


def prompt_parts(item: dict, shots: None) -> tuple[str, list[str], str]:
    return "", [], item["prompt"]


def trim_completion(text: str, stop: tuple[str, ...] = STOP) -> str:
    """Cut ``text`` at the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


# ------------------------------------------------------------------------------------------------------------
# Completions made elsewhere
STANDARD_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""The stop sequences of the Codex paper (Chen et al. 2021, section 2.3) and of lm-eval's ``humaneval`` task:
completions stored untrimmed are cut at the first of these before they are scored."""
STANDARD_TRIM = "cut at the first \\nclass, \\ndef, \\n#, \\nif or \\nprint (the Codex paper's and lm-eval's stops)"


def read_completions(path: str | Path) -> list[dict]:
    """Rows of a completions file (JSON lines with ``task_id`` and ``completion``, optionally gzipped).

    Raises :class:`~.data.BenchmarkError` naming the file and line for anything malformed or repeated.
    """
    import gzip
    import json

    from .data import BenchmarkError

    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"--score-completions {path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    rows, seen = [], {}
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BenchmarkError(f"{where}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                        or not isinstance(row.get("completion"), str):
                    raise BenchmarkError(f"{where}: each line needs a string 'task_id' and a string 'completion'")
                if row["task_id"] in seen:
                    raise BenchmarkError(f"{where}: task_id {row['task_id']!r} repeats line {seen[row['task_id']]}")
                seen[row["task_id"]] = lineno
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: cannot read ({exc})") from None
    if not rows:
        raise BenchmarkError(f"{path}: no completions in the file")
    return rows


def score_completions(rows: list[dict], problems: dict[str, dict], *, trim: bool = True,
                      workers: int | None = None, timeout_s: float = 10.0) -> list[dict]:
    """Execute each row's completion against its problem (by ``task_id``) in the sandbox.

    Returns one record per row, in order, in the benchmark's record format: ``benchmark``, ``example_id``
    (the task id, or the row's own ``example_id`` when it has one), ``index``, ``task_id``, ``correct``
    (0/1), ``status`` and ``detail`` (the sandbox's), ``completion`` (what was executed), ``raw_completion``
    (the row's text, untouched) and ``trim``. Unknown task ids raise :class:`~.data.BenchmarkError`.
    """
    from .data import BenchmarkError
    from .sandbox import run_many

    unknown = [r["task_id"] for r in rows if r["task_id"] not in problems]
    if unknown:
        raise BenchmarkError(f"{len(unknown)} completion(s) for task ids that are not HumanEval problems "
                             f"(e.g. {unknown[0]!r}); task ids look like 'HumanEval/0'")
    executed = [trim_completion(r["completion"], STANDARD_STOP) if trim else r["completion"] for r in rows]
    items = [(problems[r["task_id"]], code) for r, code in zip(rows, executed)]
    results = run_many(items, workers=workers, timeout_s=timeout_s)
    # "error" is the sandbox's own failure, never the candidate's doing: run those once more. What
    # stays an error counts as not passed (a completion must not escape scoring by causing one).
    again = [i for i, res in enumerate(results) if res.status == "error"]
    for i, res in zip(again, run_many([items[i] for i in again], workers=workers, timeout_s=timeout_s)):
        results[i] = res
    records = []
    for index, (row, code, res) in enumerate(zip(rows, executed, results)):
        records.append({"benchmark": NAME, "example_id": str(row.get("example_id", row["task_id"])), "index": index,
                        "task_id": row["task_id"], "correct": int(res.passed), "status": res.status,
                        "detail": res.detail, "completion": code, "raw_completion": row["completion"],
                        "trim": STANDARD_TRIM if trim else "none", "num_fewshot": NUM_FEWSHOT})
    return records
