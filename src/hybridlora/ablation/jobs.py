"""One ablation condition as a job of the study runner (kind ``ablation`` in ``study.jobs.JOB_KINDS``).

``run_condition(spec, ablation_dir, out)`` builds (or reuses, within one process) the base model, attaches the
condition's hooks, measures strided perplexity, the benchmarks through the evaluator and the per-layer
diagnostics, detaches the hooks, and returns what ``Store.complete`` records. What does not depend on the
condition is made once per process and base model and reused by every later condition: the model, the tokenized
texts, the benchmarks' items, prompts and token rows (``evaluate.runner.PreparedCache``) and the intact model's
layer outputs the diagnostics compare with. The job returns one metrics row per benchmark,
``perplexity`` (n = scored tokens) and ``diagnostics`` (n = diagnostic tokens), and per-instance records
(benchmark items; perplexity windows with their ``nll_sum`` and ``tokens`` as the prediction).

``run_conditions(specs, ablation_dir, outs)`` runs several conditions in each forward when their spec asks for it
(``conditions_per_batch``, :mod:`.shared`): the study runner claims them as a group (``JOB_GROUPS``).

Artifacts in ``runs/<job id>/``: ``eval/`` (benchmark JSONL + summaries), ``perplexity.jsonl``,
``diagnostics.json``, ``removal.json``. Mean-ablation vectors live in ``means/<hash>.pt`` of the ablation
directory, computed once on the intact model and reused by every mean condition of that model.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..study.backends.processes import repeats_another_runner
from ..study.jobs import crash_point, load_base
from .methods import Ablation, AblationError, ModelUnits, collect_means, model_units
from .perplexity import encode, plan_windows, read_text, strided_nll_copies, summarize
from .shared import SPEC_KEY, group_key, group_size  # noqa: F401 - with run_conditions: the runner's JOB_GROUPS entry

_MODEL_CACHE: dict[str, "Base"] = {}  # one entry: the last base model, reused by the next condition of that model
_TEXT_CACHE: dict[str, list[int]] = {}
_NOTES_SAID: set[str] = set()


def _prepared_cache():
    from ..evaluate.runner import PreparedCache

    return PreparedCache()


@dataclass
class Base:
    """A base model and what every condition of it shares within one process."""
    model: Any
    tokenizer: Any
    cmap: Any
    units: ModelUnits
    prepared: Any = field(default_factory=_prepared_cache)  # benchmark items, prompts, token rows
    intact: dict = field(default_factory=dict)  # diagnostics: the intact layer outputs, by reference-rows key


def _key(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def base_model(spec: dict) -> Base:
    """The spec's model (+ merged adapter) with its tokenizer, component map and units, cached per process."""
    key = _key([spec["model"], spec.get("adapter")])
    if key not in _MODEL_CACHE:
        from ..components import build_component_map

        _MODEL_CACHE.clear()
        model, tokenizer = load_base(spec["model"])
        if spec.get("adapter"):
            model = _merge_adapter(model, spec["adapter"])
        model.eval()
        _bind_kernels(model)
        cmap = build_component_map(model)
        _MODEL_CACHE[key] = Base(model, tokenizer, cmap, model_units(cmap))
    return _MODEL_CACHE[key]


def _bind_kernels(model) -> None:
    """On CUDA the fast mixer kernels, as ``eval`` binds them (missing ones warned about), before the first
    forward — perplexity runs before the evaluator would bind them."""
    from .. import fast

    if next(model.parameters()).device.type == "cuda":
        fast.use("fast")
        fast.warn_missing_kernels(model, training=False)  # forward only


def _merge_adapter(model, adapter: str):
    """The adapter merged into the base weights: the ablated modules keep the base model's names (exact up to the
    dtype's rounding)."""
    from peft import PeftModel

    from ..placement import exact_targets

    with exact_targets():
        peft_model = PeftModel.from_pretrained(model, adapter)
    return peft_model.merge_and_unload()


def text_ids(spec: dict, tokenizer) -> list[int]:
    key = _key([spec["perplexity"]["source"], getattr(tokenizer, "name_or_path", ""), len(tokenizer)])
    if key not in _TEXT_CACHE:
        if len(_TEXT_CACHE) >= 4:  # the perplexity text and the reference text of one model, with room to spare
            _TEXT_CACHE.pop(next(iter(_TEXT_CACHE)))
        _TEXT_CACHE[key] = encode(tokenizer, read_text(spec["perplexity"]["source"]))
    return _TEXT_CACHE[key]


def reference_rows(spec: dict, tokenizer) -> list[list[int]]:
    """Token rows of the mean-ablation reference set (and the diagnostics): ``windows`` rows of ``length``."""
    ref = spec["reference"]
    ids = text_ids({"perplexity": {"source": ref["source"]}}, tokenizer) if ref["source"] != spec["perplexity"][
        "source"] else text_ids(spec, tokenizer)
    length, count = ref["length"], ref["windows"]
    rows = [ids[i * length:(i + 1) * length] for i in range(count)]
    rows = [r for r in rows if len(r) == length]
    if not rows:
        raise AblationError(f"reference text shorter than one {length}-token window")
    return rows


def stored_means(spec: dict, ablation_dir: Path, model, tokenizer, mu) -> dict:
    import torch

    path = ablation_dir / "means" / f"{_key([spec['model'], spec.get('adapter'), spec['reference']])}.pt"
    if path.is_file():
        return torch.load(path)
    means = collect_means(model, mu.units, mu.layers_path, reference_rows(spec, tokenizer))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(means, tmp)
    os.replace(tmp, path)  # concurrent runners compute the same vectors; either file is the same
    return means


def run_condition(spec: dict, ablation_dir: str | Path, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """One condition (with ``conditions_per_batch`` K > 1 in its spec: beside K - 1 intact rows, see
    :mod:`.shared`)."""
    return run_conditions([spec], ablation_dir, [out], progress=progress)[0]


def run_conditions(specs: list[dict], ablation_dir: str | Path, outs: list, *,
                   progress: bool = True) -> list[dict[str, Any]]:
    """The results of conditions that share every setting but the removal (:func:`.shared.group_key`), run together
    in batches of ``conditions_per_batch`` conditions' rows when their spec asks for it, else one by one."""
    ablation_dir, outs = Path(ablation_dir), [Path(o) for o in outs]
    size = group_size(specs[0])
    if size == 1:
        return [_run_alone(spec, ablation_dir, out, progress) for spec, out in zip(specs, outs)]
    if len(specs) > size:
        raise AblationError(f"{len(specs)} conditions given to a group of {size}")
    return _run_shared(specs, ablation_dir, outs, progress)


def _run_alone(spec: dict, ablation_dir: Path, out: Path, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(spec)
    ablation = _attach(spec, base, ablation_dir)
    try:
        summaries, records = {}, []
        if spec["perplexity"]["enabled"]:
            rows, wall = _perplexity_rows(spec, base, progress, copies=1)
            summaries["perplexity"], ppl_records = _perplexity_result(spec, base, rows[0], wall, out)
            records += ppl_records
        bench_summaries, bench_records = _benchmarks(spec, base, out, progress)
        summaries.update(bench_summaries)
        records += bench_records
        crash_point("evaluated")
        if spec["diagnostics"]["windows"]:
            summaries["diagnostics"] = _diagnostics(spec, base, ablation, out)
    finally:
        if ablation is not None:
            ablation.remove()
    return _finish(spec, summaries, records, out, ablation_dir, time.perf_counter() - start)


def _finish(spec: dict, summaries: dict, records: list, out: Path, ablation_dir: Path, wall: float) -> dict[str, Any]:
    _write_json(out / "removal.json", {"removal": spec["removal"], "removed": spec["removed"]})
    return {"summaries": summaries, "records": records, "train_log": [], "trainable_params": 0,
            "params_by_component": {}, "artifact_dir": str(out.relative_to(ablation_dir)), "wall_s": wall}


def _run_shared(specs: list[dict], ablation_dir: Path, outs: list[Path], progress: bool) -> list[dict[str, Any]]:
    """Conditions sharing each forward (:mod:`.shared`); a group short of ``conditions_per_batch`` is filled with
    the intact model's rows, whose results are dropped. The time of shared work is split evenly."""
    from .shared import INTACT, SharedLM

    start = time.perf_counter()
    size = group_size(specs[0])
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
    base = base_model(specs[0])
    removals = [spec["removal"] for spec in specs] + [INTACT] * (size - len(specs))
    hooks = _attach_shared(specs, removals, base, ablation_dir)
    summaries: list[dict] = [{} for _ in specs]
    records: list[list] = [[] for _ in specs]
    try:
        if specs[0]["perplexity"]["enabled"]:
            rows, wall = _perplexity_rows(specs[0], base, progress, copies=size)
            for i, spec in enumerate(specs):
                summaries[i]["perplexity"], ppl_records = _perplexity_result(spec, base, rows[i], wall / size, outs[i])
                summaries[i]["perplexity"][SPEC_KEY] = size  # rows of how many conditions a forward held
                records[i] += ppl_records
        shared = SharedLM(_causal_lm(specs[0], base, copies=size), size)
        for i, spec in enumerate(specs):
            view = shared.view(i)
            bench_summaries, bench_records = _benchmarks(spec, base, outs[i], progress, lm=view)
            for summary in bench_summaries.values():
                summary[SPEC_KEY] = size
            summaries[i].update(bench_summaries)
            records[i] += bench_records
        crash_point("evaluated")
    finally:
        hooks.remove()
    shared_wall = (time.perf_counter() - start) / len(specs)
    results = []
    for i, spec in enumerate(specs):
        own = time.perf_counter()
        if spec["diagnostics"]["windows"]:
            ablation = _attach(spec, base, ablation_dir)
            try:
                summaries[i]["diagnostics"] = _diagnostics(spec, base, ablation, outs[i])
            finally:
                if ablation is not None:
                    ablation.remove()
        results.append(_finish(spec, summaries[i], records[i], outs[i], ablation_dir,
                               shared_wall + time.perf_counter() - own))
    return results


def _units_of(condition: dict, base: Base) -> list:
    by_key = base.units.by_key()
    missing = [k for k in condition["units"] if k not in by_key]
    if missing:
        raise AblationError(f"units {missing} are not in this model")
    return [by_key[k] for k in condition["units"]]


def _attach(spec: dict, base: Base, ablation_dir: Path) -> Ablation | None:
    """The condition's hooks attached to the base model (None for the intact model)."""
    condition, mu = spec["removal"], base.units
    units = _units_of(condition, base)
    if condition["method"] == "none":
        return None
    means = stored_means(spec, ablation_dir, base.model, base.tokenizer, mu) if condition["method"] == "mean" else None
    return Ablation(base.model, units, condition["method"], mu.layers_path, means=means)


def _attach_shared(specs: list[dict], removals: list[dict], base: Base, ablation_dir: Path):
    from .methods import SharedAblation

    mu = base.units
    conditions = [(_units_of(r, base), r["method"]) for r in removals]
    means = (stored_means(specs[0], ablation_dir, base.model, base.tokenizer, mu)
             if any(r["method"] == "mean" for r in removals) else None)
    return SharedAblation(base.model, conditions, mu.layers_path, means=means)


def _diagnostics(spec: dict, base: Base, ablation: Ablation | None, out: Path) -> dict:
    """Per-layer diagnostics (detaches ``ablation``); the intact outputs are computed once per base model."""
    from .diagnostics import layer_diagnostics

    rows = reference_rows(spec, base.tokenizer)[: spec["diagnostics"]["windows"]]
    intact = base.intact.setdefault(_key([spec["reference"], spec["diagnostics"]]), {})
    diag_start = time.perf_counter()
    diag = layer_diagnostics(base.model, base.cmap, base.units, rows, ablation, intact=intact)
    diag["wall_s"] = time.perf_counter() - diag_start
    _write_json(out / "diagnostics.json", diag)
    return {"n": diag["tokens"], "accuracy": None, "correct": None, **diag}


def _perplexity_rows(spec: dict, base: Base, progress: bool, *, copies: int) -> tuple[list[list[dict]], float]:
    """Each copy's window records (one copy per condition sharing the forwards) and the wall time. Shared, a
    forward takes ``batch_size / copies`` windows (at least one), so that it holds about the rows of an unshared
    one: a perplexity forward of full windows is not short of work, and its logits are most of its memory (32
    windows of 2,048 tokens with a 248k vocabulary: 16 GB)."""
    p = spec["perplexity"]
    ids = text_ids(spec, base.tokenizer)
    windows = plan_windows(len(ids), p["window"], p["stride"], p["max_windows"])
    start = time.perf_counter()
    with tqdm(total=len(windows), desc="  perplexity", unit="win", leave=False, disable=not progress,
              position=1) as bar:
        rows = strided_nll_copies(base.model, ids, windows, copies=copies, batch_size=max(1, p["batch_size"] // copies),
                                  progress=bar)
    return rows, time.perf_counter() - start


def _perplexity_result(spec: dict, base: Base, rows: list[dict], wall: float, out: Path) -> tuple[dict, list[dict]]:
    p = spec["perplexity"]
    ids = text_ids(spec, base.tokenizer)
    _write_jsonl(out / "perplexity.jsonl", rows)
    summary = summarize(rows, len(ids))
    summary.update(n=summary["tokens"], accuracy=None, correct=None, protocol="strided",
                   source=p["source"]["label"], window=p["window"], stride=p["stride"], wall_s=wall,
                   kernels=_describe_kernels(base.model),
                   tokens_per_s=summary["tokens"] / wall if wall > 0 else None)
    records = [{"benchmark": "perplexity", "example_id": f"window-{r['window']:06d}", "correct": None,
                "prediction": {"nll_sum": r["nll_sum"], "tokens": r["tokens"]}} for r in rows]
    return summary, records


def _describe_kernels(model) -> str:
    from .. import fast

    return fast.describe(model, training=False)


def _causal_lm(spec: dict, base: Base, *, copies: int = 1):
    """The evaluator's model boundary; with ``copies``, every batch holds that many conditions' rows."""
    from ..evaluate.lm import CausalLM

    e = spec["eval"]
    generate = e.get("generate_batch_size") or e["batch_size"]
    return CausalLM(base.model, base.tokenizer, batch_size=e["batch_size"] * copies, max_length=e["max_length"],
                    name=spec["model"]["name"], adapter=spec.get("adapter"), decode=e["decode"],
                    generate_batch_size=generate * copies, prefix_reuse=e.get("prefix_reuse", False), copies=copies)


def _benchmarks(spec: dict, base: Base, out: Path, progress: bool, lm: Any = None):
    from ..evaluate.runner import evaluate_benchmark

    e = spec["eval"]
    if not e["benchmarks"]:
        return {}, []
    lm = lm if lm is not None else _causal_lm(spec, base)
    summaries, records = {}, []
    for bench, size in e["benchmarks"].items():
        shared_before = (lm.shared_s, lm.spent_s) if hasattr(lm, "shared_s") else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a trimmed-shots note is kept in the summary; said once per run below
            summary = evaluate_benchmark(lm, bench, data_dir=e["data_dir"], n=size, limit=e["limit"],
                                         seed=e["subset_seed"], output_dir=out / "eval",
                                         max_new_tokens=e["max_new_tokens"],
                                         allow_code_execution=e["allow_code_execution"], progress=False,
                                         cache=base.prepared)
        note = summary.get("fewshot_note")
        if note and note not in _NOTES_SAID and not repeats_another_runner():
            _NOTES_SAID.add(note)
            tqdm.write("note: " + note, file=sys.stderr)
        records += summary.pop("records")
        summary.pop("files", None)
        if shared_before is not None:  # this condition's share of the forwards it shared, not whoever ran them
            summary["wall_s"] += (lm.shared_s - shared_before[0]) - (lm.spent_s - shared_before[1])
            summary["examples_per_s"] = summary["n"] / summary["wall_s"] if summary["wall_s"] > 0 else None
        summaries[bench] = summary
    return summaries, records


def _write_json(path: Path, data: Any) -> None:
    from ..evaluate.runner import write_json_atomic

    write_json_atomic(path, data)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from ..evaluate.runner import write_jsonl_atomic

    write_jsonl_atomic(path, rows)
