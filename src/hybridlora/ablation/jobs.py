"""One ablation condition as a job of the study runner (kind ``ablation`` in ``study.jobs.JOB_KINDS``).

``run_condition(spec, ablation_dir, out)`` builds (or reuses, within one process) the base model, attaches the
condition's hooks, measures strided perplexity, the benchmarks through the evaluator and the per-layer
diagnostics, detaches the hooks, and returns what ``Store.complete`` records. What does not depend on the
condition is made once per process and base model and reused by every later condition: the model, the tokenized
texts, the benchmarks' items, prompts and token rows (``evaluate.runner.PreparedCache``) and the intact model's
layer outputs the diagnostics compare with. The job returns one metrics row per benchmark,
``perplexity`` (n = scored tokens) and ``diagnostics`` (n = diagnostic tokens), and per-instance records
(benchmark items; perplexity windows with their ``nll_sum`` and ``tokens`` as the prediction).

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
from .perplexity import encode, plan_windows, read_text, strided_nll, summarize

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
    start = time.perf_counter()
    ablation_dir, out = Path(ablation_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(spec)
    ablation = _attach(spec, base, ablation_dir)
    try:
        summaries, records = {}, []
        if spec["perplexity"]["enabled"]:
            summaries["perplexity"], ppl_records = _perplexity(spec, base.model, base.tokenizer, out, progress)
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
    _write_json(out / "removal.json", {"removal": spec["removal"], "removed": spec["removed"]})
    return {"summaries": summaries, "records": records, "train_log": [], "trainable_params": 0,
            "params_by_component": {}, "artifact_dir": str(out.relative_to(ablation_dir)),
            "wall_s": time.perf_counter() - start}


def _attach(spec: dict, base: Base, ablation_dir: Path) -> Ablation | None:
    """The condition's hooks attached to the base model (None for the intact model)."""
    condition, mu = spec["removal"], base.units
    by_key = mu.by_key()
    missing = [k for k in condition["units"] if k not in by_key]
    if missing:
        raise AblationError(f"units {missing} are not in this model")
    if condition["method"] == "none":
        return None
    units = [by_key[k] for k in condition["units"]]
    means = stored_means(spec, ablation_dir, base.model, base.tokenizer, mu) if condition["method"] == "mean" else None
    return Ablation(base.model, units, condition["method"], mu.layers_path, means=means)


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


def _perplexity(spec: dict, model, tokenizer, out: Path, progress: bool) -> tuple[dict, list[dict]]:
    p = spec["perplexity"]
    ids = text_ids(spec, tokenizer)
    windows = plan_windows(len(ids), p["window"], p["stride"], p["max_windows"])
    start = time.perf_counter()
    with tqdm(total=len(windows), desc="  perplexity", unit="win", leave=False, disable=not progress,
              position=1) as bar:
        rows = strided_nll(model, ids, windows, batch_size=p["batch_size"], progress=bar)
    wall = time.perf_counter() - start
    _write_jsonl(out / "perplexity.jsonl", rows)
    summary = summarize(rows, len(ids))
    summary.update(n=summary["tokens"], accuracy=None, correct=None, protocol="strided",
                   source=p["source"]["label"], window=p["window"], stride=p["stride"], wall_s=wall,
                   kernels=_describe_kernels(model),
                   tokens_per_s=summary["tokens"] / wall if wall > 0 else None)
    records = [{"benchmark": "perplexity", "example_id": f"window-{r['window']:06d}", "correct": None,
                "prediction": {"nll_sum": r["nll_sum"], "tokens": r["tokens"]}} for r in rows]
    return summary, records


def _describe_kernels(model) -> str:
    from .. import fast

    return fast.describe(model, training=False)


def _benchmarks(spec: dict, base: Base, out: Path, progress: bool):
    from ..evaluate.lm import CausalLM
    from ..evaluate.runner import evaluate_benchmark

    e = spec["eval"]
    if not e["benchmarks"]:
        return {}, []
    lm = CausalLM(base.model, base.tokenizer, batch_size=e["batch_size"], max_length=e["max_length"],
                  name=spec["model"]["name"], adapter=spec.get("adapter"), decode=e["decode"],
                  generate_batch_size=e.get("generate_batch_size"), prefix_reuse=e.get("prefix_reuse", False))
    summaries, records = {}, []
    for bench, size in e["benchmarks"].items():
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
        summaries[bench] = summary
    return summaries, records


def _write_json(path: Path, data: Any) -> None:
    from ..evaluate.runner import write_json_atomic

    write_json_atomic(path, data)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from ..evaluate.runner import write_jsonl_atomic

    write_jsonl_atomic(path, rows)
