"""Read per-instance results produced elsewhere into :class:`InstanceRecord` lists.

Two layouts are understood (both described in ``docs/RESULTS_FORMAT.md``):

* **generic** — a directory with ``manifest.json`` listing runs and, per run, one JSONL
  file (optionally gzipped) per benchmark: :func:`load_generic`.
* **published** — the flat folder of the study "Where Should LoRA Go?"
  (``lora-placement-hybrid``), whose file names carry the run identity:
  :func:`load_published`.

:func:`import_results` picks the layout automatically and returns the records;
:func:`load_results` returns runs and records together. Every problem with the input is
raised as :class:`ResultsFormatError` (a ``ValueError``) with a one-line message naming
the file (and line, for JSONL content).
"""
from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

from .contract import BASE, InstanceRecord, RunInfo

__all__ = [
    "ResultsFormatError",
    "ResultSet",
    "PUBLISHED_MODEL_NAMES",
    "PUBLISHED_TRAIN_DOMAINS",
    "import_results",
    "load_results",
    "load_generic",
    "load_published",
    "parse_published_name",
    "detect_format",
]

PathLike = Union[str, Path]

MANIFEST_NAME = "manifest.json"

PUBLISHED_MODEL_NAMES: Mapping[str, str] = {
    "qwen3_5_0_8b_base": "Qwen/Qwen3.5-0.8B-Base",
    "falcon_h1_0_5b_base": "tiiuae/Falcon-H1-0.5B-Base",
}
"""Model keys in the published file names -> readable model names."""

PUBLISHED_TRAIN_DOMAINS: Mapping[str, str] = {
    "gsm8k_train": "gsm8k",
    "codealpaca": "codealpaca",
    "ultrachat": "chat",
}
"""Training-set keys in the published file names -> training domains."""

_RUN_REQUIRED = ("model", "placement", "train_domain", "seed", "files")
_RUN_OPTIONAL = ("trainable_params",)
_MANIFEST_TOP_KEYS = ("runs", "description")
_TOKEN = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")


class ResultsFormatError(ValueError):
    """Input results do not follow the expected layout; the message is one line."""


@dataclass(frozen=True)
class ResultSet:
    """Imported results: ``runs`` (one :class:`RunInfo` per run, in input order) and
    ``records`` (all :class:`InstanceRecord` of all runs, file by file, line by line)."""

    runs: List[RunInfo]
    records: List[InstanceRecord]
    completions: Dict[tuple, dict] = field(default_factory=dict)
    """Generated code of the rows that carry it (HumanEval): ``(model, placement, train_domain, seed,
    benchmark, example_id) -> {"task_id", "completion"}``, for :mod:`.code_scoring` to execute."""


# --------------------------------------------------------------------------- shared JSONL


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _iter_json_lines(path: Path) -> Iterator[Tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a (gzipped) JSONL file."""
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ResultsFormatError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ResultsFormatError(
                        f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                    )
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise ResultsFormatError(f"{path}: cannot read ({exc})") from None


def _parse_example_id(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ResultsFormatError(f"{where}: example_id must be a string or integer, got {value!r}")
    text = str(value)
    if not text:
        raise ResultsFormatError(f"{where}: example_id is empty")
    return text


def _parse_correct(obj: dict, where: str) -> Optional[bool]:
    if "correct" not in obj:
        return None
    value = obj["correct"]
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ResultsFormatError(f"{where}: correct must be 0, 1, true, false or null, got {value!r}")


def _read_cell(
    path: Path, *, model: str, placement: str, train_domain: str, seed: Optional[int], benchmark: str,
    completions: Optional[Dict[tuple, dict]] = None,
) -> List[InstanceRecord]:
    """Read one JSONL file of one run on one benchmark into records (and, into ``completions``, the
    ``task_id``/``completion`` of rows that have both)."""
    records: List[InstanceRecord] = []
    seen: Dict[str, int] = {}
    for lineno, obj in _iter_json_lines(path):
        where = f"{path}:{lineno}"
        if "example_id" not in obj:
            raise ResultsFormatError(f"{where}: missing required field 'example_id'")
        eid = _parse_example_id(obj["example_id"], where)
        if eid in seen:
            raise ResultsFormatError(f"{where}: duplicate example_id {eid!r} (first on line {seen[eid]})")
        seen[eid] = lineno
        if completions is not None and isinstance(obj.get("task_id"), str) and isinstance(obj.get("completion"), str):
            completions[(model, placement, train_domain, seed, benchmark, eid)] = {
                "task_id": obj["task_id"], "completion": obj["completion"]}
        row_bench = obj.get("benchmark")
        if row_bench is not None and row_bench != benchmark:
            raise ResultsFormatError(
                f"{where}: row says benchmark {row_bench!r} but the file is listed for {benchmark!r}"
            )
        records.append(
            InstanceRecord(
                model=model,
                placement=placement,
                train_domain=train_domain,
                seed=seed,
                benchmark=benchmark,
                example_id=eid,
                correct=_parse_correct(obj, where),
            )
        )
    return records


# --------------------------------------------------------------------------- generic format


def _load_manifest(root: Path) -> list:
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ResultsFormatError(f"{root}: no {MANIFEST_NAME} (generic results format needs one)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResultsFormatError(f"{mpath}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if isinstance(manifest, dict):
        unknown = sorted(set(manifest) - set(_MANIFEST_TOP_KEYS))
        if unknown:
            raise ResultsFormatError(
                f"{mpath}: unknown top-level key(s) {unknown}; allowed: {list(_MANIFEST_TOP_KEYS)}"
            )
        if "runs" not in manifest:
            raise ResultsFormatError(f"{mpath}: missing top-level key 'runs'")
        runs = manifest["runs"]
    else:
        runs = manifest
    if not isinstance(runs, list):
        raise ResultsFormatError(f"{mpath}: 'runs' must be a JSON list of run objects")
    if not runs:
        raise ResultsFormatError(f"{mpath}: the manifest lists no runs")
    return runs


def _check_run_entry(entry: object, where: str) -> RunInfo:
    if not isinstance(entry, dict):
        raise ResultsFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_RUN_REQUIRED) - set(_RUN_OPTIONAL))
    if unknown:
        raise ResultsFormatError(
            f"{where}: unknown key(s) {unknown}; allowed: {list(_RUN_REQUIRED + _RUN_OPTIONAL)}"
        )
    missing = [k for k in _RUN_REQUIRED if k not in entry]
    if missing:
        raise ResultsFormatError(f"{where}: missing required key(s) {missing}")
    try:
        return RunInfo(
            model=entry["model"],
            placement=entry["placement"],
            train_domain=entry["train_domain"],
            seed=entry["seed"],
            trainable_params=entry.get("trainable_params"),
        )
    except ValueError as exc:
        raise ResultsFormatError(f"{where}: {exc}") from None


def load_generic(path: PathLike) -> ResultSet:
    """Load a generic results directory (``manifest.json`` + JSONL files).

    Input: directory path. Output: :class:`ResultSet` with one :class:`RunInfo` per manifest
    entry and the records of all listed files. Raises :class:`ResultsFormatError` on a
    missing manifest, unknown or missing keys, duplicate runs, missing files, or bad JSONL
    lines (message names ``file:line``).
    """
    root = Path(path)
    mpath = root / MANIFEST_NAME
    entries = _load_manifest(root)
    runs: List[RunInfo] = []
    records: List[InstanceRecord] = []
    completions: Dict[tuple, dict] = {}
    seen_runs: Dict[tuple, int] = {}
    for i, entry in enumerate(entries):
        where = f"{mpath}: runs[{i}]"
        info = _check_run_entry(entry, where)
        if info.key in seen_runs:
            raise ResultsFormatError(
                f"{where}: run {info.key} is already listed as runs[{seen_runs[info.key]}]"
            )
        seen_runs[info.key] = i
        files = entry["files"]
        if not isinstance(files, dict) or not files:
            raise ResultsFormatError(f"{where}: 'files' must be a non-empty object {{benchmark: path}}")
        for bench, rel in files.items():
            if not isinstance(bench, str) or not bench:
                raise ResultsFormatError(f"{where}: benchmark names must be non-empty strings")
            if not isinstance(rel, str) or not rel:
                raise ResultsFormatError(f"{where}: files[{bench!r}] must be a relative path string")
            if Path(rel).is_absolute():
                raise ResultsFormatError(f"{where}: files[{bench!r}] = {rel!r} must be relative to the manifest")
            fpath = root / rel
            if not fpath.is_file():
                raise ResultsFormatError(f"{where}: files[{bench!r}] = {rel!r} does not exist")
            records.extend(
                _read_cell(
                    fpath,
                    model=info.model,
                    placement=info.placement,
                    train_domain=info.train_domain,
                    seed=info.seed,
                    benchmark=bench,
                    completions=completions,
                )
            )
        runs.append(info)
    return ResultSet(runs=runs, records=records, completions=completions)


# --------------------------------------------------------------------------- published layout


@dataclass(frozen=True)
class PublishedName:
    """Identity decoded from a published file name (keys as they appear in the name)."""

    model_key: str
    condition: str  # "base" for the un-fine-tuned model
    train_dataset: str  # "base" for the un-fine-tuned model
    seed: Optional[int]
    benchmark: str


_PUBLISHED_SUFFIX = ".jsonl.gz"


def parse_published_name(name: str) -> Optional[PublishedName]:
    """Decode a published file name, or return ``None`` if it does not follow either pattern.

    Patterns (``__`` separates fields; each field is lower-case ``[a-z0-9_]``):
    ``<model_key>__base__<benchmark>.jsonl.gz`` and
    ``train__<model_key>__<condition>__<train_dataset>__seed<seed>__inline_eval__<benchmark>.jsonl.gz``.
    Only the shape is checked here; unknown keys are reported by :func:`load_published`.
    """
    if not name.endswith(_PUBLISHED_SUFFIX):
        return None
    parts = name[: -len(_PUBLISHED_SUFFIX)].split("__")
    if not all(_TOKEN.match(p) for p in parts):
        return None
    if len(parts) == 3 and parts[0] != "train" and parts[1] == BASE:
        return PublishedName(parts[0], BASE, BASE, None, parts[2])
    if len(parts) == 7 and parts[0] == "train" and parts[5] == "inline_eval":
        m = re.fullmatch(r"seed([0-9]+)", parts[4])
        if m is None or parts[2] == BASE or parts[3] == BASE:
            return None
        return PublishedName(parts[1], parts[2], parts[3], int(m.group(1)), parts[6])
    return None


def _published_candidates(root: Path) -> List[Path]:
    """Files of ``root`` that belong to the published layout's data (JSONL, gzipped or not)."""
    return sorted(p for p in root.iterdir() if p.is_file() and (p.name.endswith(".jsonl.gz") or p.name.endswith(".jsonl")))


def load_published(
    path: PathLike,
    *,
    model_names: Mapping[str, str] = PUBLISHED_MODEL_NAMES,
    train_domains: Mapping[str, str] = PUBLISHED_TRAIN_DOMAINS,
) -> ResultSet:
    """Load the published "Where Should LoRA Go?" per-instance folder.

    Input: the folder (e.g. ``shared/data/published/lora-placement-hybrid``); optional
    mappings of model keys -> model names and training-set keys -> domains.
    Output: :class:`ResultSet`. Runs are ordered by (model key, base first, condition,
    train dataset, seed); ``trainable_params`` is ``None`` (not published). ``placement`` is
    the study's condition name unchanged (e.g. ``"attention_only"``); ``example_id`` is the
    integer index as a string; rows without ``correct`` (HumanEval) get ``correct=None``.

    Policy: every ``*.jsonl`` / ``*.jsonl.gz`` file in the folder must be a recognised
    result file — an unrecognised name, unknown model key or unknown training set raises
    :class:`ResultsFormatError` listing all offending files (silently skipping a data file
    would silently drop a run). Other files (``README.md``...) are ignored.
    """
    root = Path(path)
    if not root.is_dir():
        raise ResultsFormatError(f"{root}: not a directory")
    candidates = _published_candidates(root)
    parsed: List[Tuple[Path, PublishedName]] = []
    bad: List[str] = []
    for p in candidates:
        info = parse_published_name(p.name)
        if info is None:
            bad.append(f"{p.name} (name does not match the published pattern)")
        elif info.model_key not in model_names:
            bad.append(f"{p.name} (unknown model key {info.model_key!r})")
        elif info.train_dataset != BASE and info.train_dataset not in train_domains:
            bad.append(f"{p.name} (unknown train dataset {info.train_dataset!r})")
        else:
            parsed.append((p, info))
    if bad:
        raise ResultsFormatError(f"{root}: {len(bad)} unrecognised result file(s): " + "; ".join(bad))
    if not parsed:
        raise ResultsFormatError(f"{root}: no published result files (*.jsonl.gz) found")

    def order(item: Tuple[Path, PublishedName]):
        n = item[1]
        return (n.model_key, n.condition != BASE, n.condition, n.train_dataset, n.seed or 0, n.benchmark)

    parsed.sort(key=order)
    runs: Dict[tuple, RunInfo] = {}
    records: List[InstanceRecord] = []
    completions: Dict[tuple, dict] = {}
    for p, n in parsed:
        model = model_names[n.model_key]
        domain = BASE if n.train_dataset == BASE else train_domains[n.train_dataset]
        run = RunInfo(model=model, placement=n.condition, train_domain=domain, seed=n.seed)
        runs.setdefault(run.key, run)
        records.extend(
            _read_cell(p, model=model, placement=n.condition, train_domain=domain, seed=n.seed, benchmark=n.benchmark,
                       completions=completions)
        )
    return ResultSet(runs=list(runs.values()), records=records, completions=completions)


# --------------------------------------------------------------------------- entry points


def detect_format(path: PathLike) -> str:
    """Return ``"generic"`` (folder has ``manifest.json``) or ``"published"`` (folder has a
    file named like the published layout); raise :class:`ResultsFormatError` otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise ResultsFormatError(f"{root}: results path is not a directory")
    if (root / MANIFEST_NAME).is_file():
        return "generic"
    if any(parse_published_name(p.name) is not None for p in root.iterdir() if p.is_file()):
        return "published"
    raise ResultsFormatError(
        f"{root}: unrecognised results layout: expected either the generic format "
        f"({MANIFEST_NAME} + JSONL files) or the published lora-placement-hybrid layout "
        f"(<model>__base__<benchmark>.jsonl.gz / train__<model>__<condition>__<dataset>__seed<N>"
        f"__inline_eval__<benchmark>.jsonl.gz); see docs/RESULTS_FORMAT.md"
    )


def load_results(path: PathLike) -> ResultSet:
    """Auto-detect the layout of ``path`` and load runs and records (see :func:`detect_format`)."""
    fmt = detect_format(path)
    return load_generic(path) if fmt == "generic" else load_published(path)


def import_results(path: PathLike) -> List[InstanceRecord]:
    """Auto-detect the layout of ``path`` and return its :class:`InstanceRecord` list."""
    return load_results(path).records
