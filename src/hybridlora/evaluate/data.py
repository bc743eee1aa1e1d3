"""Shared data plumbing for the benchmarks: where items come from, seeded subsets, prompt trimming.

Every benchmark module turns its source (a local directory laid out like ``shared/data`` or, when the hub is
reachable, the Hugging Face dataset) into plain dict items with a stable ``example_id`` taken from the source
(file name + row, task id, ...), never from the subset position, so that ids survive a change of subset size.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

SUBSET_SEED = 1234
DATA_ENV = "HYBRIDLORA_DATA"


class BenchmarkError(ValueError):
    """Bad benchmark input (unknown name, missing data, malformed rows); the message says what to do."""


def resolve_source(benchmark: str, data_dir: str | Path | None, relative: str, hf_id: str) -> Path | None:
    """The local directory to read (returns it) or None for the Hugging Face dataset ``hf_id``.

    ``data_dir`` (or $HYBRIDLORA_DATA) wins when it holds ``relative``; otherwise the hub, if reachable.
    Neither -> one error naming both places.
    """
    root = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if root is not None:
        path = Path(root)
        if (path / relative).exists():
            return path
    from hybridlora.models import hub_reachable

    if hub_reachable():
        return None
    where = f"{Path(root) / relative}" if root is not None else f"<data-dir>/{relative} (no --data-dir / ${DATA_ENV} given)"
    raise BenchmarkError(f"{benchmark}: no local data at {where}, and the Hugging Face hub is unreachable for "
                         f"{hf_id}; pass --data-dir pointing at a folder laid out like shared/data")


def hf_load(hf_id: str, *args: Any, **kwargs: Any) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise BenchmarkError(f"loading {hf_id} from the hub needs `pip install datasets` "
                             f"(or pass --data-dir with a local copy)") from exc
    return datasets.load_dataset(hf_id, *args, **kwargs)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a (gzipped) JSON-lines file; one :class:`BenchmarkError` for any file that cannot be read."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise BenchmarkError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise unreadable(path, exc, lineno + 1) from exc
    return rows


def unreadable(path: Path, exc: BaseException, lineno: int | None = None) -> BenchmarkError:
    """The one-line error for a benchmark data file that cannot be read, saying what to do."""
    fix = "restore it from a good copy of the data folder (see shared/data/README.md and its SHA256SUMS)"
    if isinstance(exc, UnicodeDecodeError):
        at = f":{lineno}" if lineno else ""
        return BenchmarkError(f"{path}{at}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r}); {fix}")
    if isinstance(exc, (EOFError, gzip.BadGzipFile, zlib.error)):
        return BenchmarkError(f"{path}: not a complete gzip file ({exc}); {fix}")
    if isinstance(exc, FileNotFoundError):
        return BenchmarkError(f"{path}: not found; {fix}")
    return BenchmarkError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc}); check its "
                          f"permissions, or {fix}")


def seeded_subset(items: Sequence[dict], n: int | None, *, seed: int = SUBSET_SEED,
                  limit: int | None = None) -> list[dict]:
    """A fixed subset of ``n`` items (seeded sample, kept in source order), then its first ``limit`` items.

    The same (items, n, seed) always gives the same subset; ``limit`` only shortens it, so a smaller run is a
    prefix of the full one.
    """
    chosen = list(items)
    if n is not None and n < len(chosen):
        keep = sorted(random.Random(seed).sample(range(len(chosen)), n))
        chosen = [chosen[i] for i in keep]
    if limit is not None:
        if limit < 0:
            raise BenchmarkError(f"limit must be >= 0, got {limit}")
        chosen = chosen[:limit]
    return chosen


def seeded_shots(pool: Sequence[dict], k: int, *, seed: int = SUBSET_SEED) -> list[dict]:
    """``k`` fixed few-shot examples drawn from ``pool`` (same shots for every question)."""
    if k > len(pool):
        raise BenchmarkError(f"need {k} few-shot examples, the pool has {len(pool)}")
    return [pool[i] for i in random.Random(seed + 1).sample(range(len(pool)), k)]


def fit_prompt(header: str, shots: Sequence[str], query: str, fits: Callable[[str], bool]) -> tuple[str, int]:
    """Join header + shots + query, dropping the oldest shot while ``fits`` says the prompt is too long.

    Returns (prompt, number of shots kept). With every shot gone the prompt is returned as is: the model
    boundary then keeps its last ``max_length`` tokens.
    """
    shots = list(shots)
    while True:
        prompt = header + "".join(shots) + query
        if not shots or fits(prompt):
            return prompt, len(shots)
        shots.pop(0)


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def mc_block(question: str, choices: Iterable[str]) -> str:
    """``question`` followed by lettered choices and the ``Answer:`` cue (the multiple-choice layout)."""
    lines = [question.strip()]
    lines += [f"{letter}. {text.strip()}" for letter, text in zip(letters(26), choices)]
    return "\n".join(lines) + "\nAnswer:"
