"""Metrics of a placement study: pure functions from :class:`StudyResults` to tables.

No I/O and no plotting here; :mod:`.figures` draws and :mod:`.report` writes what these
functions return.

Shapes and units
----------------
* A *table* is a ``list[dict]``; every function documents its keys. Missing values are
  ``None`` (never ``0`` and never ``nan`` in rows).
* Accuracies are proportions (0..1). Every difference — delta vs base, paired-bootstrap
  ``mean_diff`` and its interval, forgetting, target/non-target effects — is in
  **percentage points** (pp, -100..100).
* A cell whose records are all unscored (``correct is None``, e.g. unexecuted HumanEval) has
  ``status == "not scored"``, ``accuracy is None``; it is excluded from every mean and test.

Definitions (also in ``docs/REPORT.md``)
----------------------------------------
* **delta vs base** of a fine-tuned cell: ``100 * (acc_tuned - acc_base)`` with both
  accuracies over the example ids scored in *both* cells (so Qwen GSM8K base, 128 ids, is
  compared with a 256-id run on its 128 shared ids).
* **target / non-target delta** of a run: mean delta over the scored benchmarks of its
  training domain (``StudyResults.target_benchmarks``) / over all its other scored
  benchmarks.
* **forgetting** of a run: mean over its scored non-target benchmarks ``b`` of
  ``max(0, acc_base(b) - acc_tuned(b))`` in pp (shared ids), i.e. only losses count, gains
  on other domains do not offset them. 0 = nothing forgotten.
* **gain per million trainable parameters**: mean delta over all scored benchmarks (pp)
  divided by ``trainable_params / 1e6``.
* **mean accuracy** of a placement within (model, train_domain): per benchmark, accuracy on
  the ids scored in every run of the group; then the unweighted mean over the benchmarks
  scored in every run of the group; then the mean over seeds.
* **Pareto front** (per model, train_domain): placements for which no other placement has
  ``<=`` trainable parameters and ``>=`` mean accuracy with one of them strict.
* **practitioner recipe** (per model, train_domain): among placements whose mean accuracy is
  at least 95% of the full placement's, the one with the fewest trainable parameters.
* **paired tests**: per fine-tuned cell vs the base cell and vs the full placement's cell of
  the same train domain and seed: paired percentile bootstrap of the accuracy difference on
  shared scored ids and exact McNemar; Holm correction over every comparison of one model.
* **over seeds**: mean and Student-t 95% interval of the per-seed values
  (:func:`hybridlora.analysis.stats.seed_summary`).
"""
from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as _sps

from .contract import BASE, CellKey, RunKey, cell_accuracy, group_cells
from .results import StudyResults
from .stats import holm, mcnemar_exact, paired_arrays, paired_bootstrap, seed_summary, wilson_interval

__all__ = [
    "PP",
    "RECIPE_FRACTION",
    "NOT_SCORED",
    "StudyIndex",
    "FullChoice",
    "Matrix",
    "Series",
    "StudyTables",
    "index_study",
    "trainable_params",
    "resolve_full_placements",
    "accuracy_matrix",
    "accuracy_summary",
    "shared_accuracy",
    "delta_table",
    "delta_summary",
    "domain_effects",
    "efficiency_table",
    "placement_means",
    "pareto_mask",
    "recipe_choice",
    "practitioner_recipe",
    "paired_comparisons",
    "seed_comparisons",
    "model_summary",
    "accuracy_maps",
    "delta_maps",
    "transfer_maps",
    "params_table",
    "component_params_table",
    "loss_curves",
    "norm_curves",
    "compute_tables",
]

PP = 100.0
"""Proportion -> percentage points."""

RECIPE_FRACTION = 0.95
"""A placement qualifies for the recipe at >= this fraction of the full placement's accuracy."""

NOT_SCORED = "not scored"


# --------------------------------------------------------------------------- study index


@dataclass(frozen=True)
class StudyIndex:
    """Cells plus display orders.

    ``cells``: ``{CellKey: {example_id: correct}}``; ``models``: first-seen order;
    ``placements``: ``{model: [fine-tuned placement, ...]}`` ordered by trainable params
    (unknown last) then first-seen; ``domains``: fine-tuned train domains, first-seen;
    ``benchmarks``: first-seen; ``seeds``: ``{(model, placement, domain): [seed, ...]}``
    (``seed`` may be ``None``); ``params``: ``{(model, placement): int | None}``, base = 0.
    """

    cells: Dict[CellKey, Dict[str, Optional[bool]]]
    models: List[str]
    placements: Dict[str, List[str]]
    domains: List[str]
    benchmarks: List[str]
    seeds: Dict[Tuple[str, str, str], List[Optional[int]]]
    params: Dict[Tuple[str, str], Optional[int]]

    def cell(self, model: str, placement: str, domain: str, seed: Optional[int], bench: str):
        """The cell ``{example_id: correct}`` or ``None`` if that run did not evaluate ``bench``."""
        return self.cells.get((model, placement, domain, seed, bench))

    def base_cell(self, model: str, bench: str, seed: Optional[int] = None):
        """The base model's cell on ``bench``: same seed if there is one, else seed ``None``,
        else any base seed (the base model is normally evaluated once)."""
        for s in (seed, None):
            cell = self.cell(model, BASE, BASE, s, bench)
            if cell is not None:
                return cell
        for s in self.seeds.get((model, BASE, BASE), []):
            cell = self.cell(model, BASE, BASE, s, bench)
            if cell is not None:
                return cell
        return None


def _first_seen(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def _seed_order(seed: Optional[int]) -> Tuple[int, int]:
    return (0, 0) if seed is None else (1, seed)


def trainable_params(results: StudyResults) -> Dict[Tuple[str, str], Optional[int]]:
    """``{(model, placement): trainable params}`` for every placement with a run or record.

    Source, in order: the runs' ``trainable_params`` (most common value when runs of one
    placement disagree, ties to the larger); else the sum of ``params_by_component``; else
    ``None``. The base model has 0.
    """
    values: Dict[Tuple[str, str], List[int]] = {}
    pairs = _first_seen([(r.model, r.placement) for r in results.runs] +
                        [(r.model, r.placement) for r in results.records])
    for run in results.runs:
        if run.trainable_params is not None:
            values.setdefault((run.model, run.placement), []).append(run.trainable_params)
    out: Dict[Tuple[str, str], Optional[int]] = {}
    for pair in pairs:
        if pair[1] == BASE:
            out[pair] = 0
        elif pair in values:
            counts = Counter(values[pair])
            out[pair] = max(counts, key=lambda v: (counts[v], v))
        elif pair in results.params_by_component:
            out[pair] = int(sum(results.params_by_component[pair].values()))
        else:
            out[pair] = None
    return out


def index_study(results: StudyResults) -> StudyIndex:
    """Group records into cells and fix display orders (see :class:`StudyIndex`)."""
    cells = group_cells(results.records)
    keys = list(cells)
    params = trainable_params(results)
    models = _first_seen(k[0] for k in keys)
    first = {p: i for i, p in enumerate(_first_seen(k[1] for k in keys))}
    placements = {}
    for model in models:
        names = _first_seen(k[1] for k in keys if k[0] == model and k[1] != BASE)
        placements[model] = sorted(
            names, key=lambda p: (params.get((model, p)) is None, params.get((model, p)) or 0, first[p]))
    seeds: Dict[Tuple[str, str, str], List[Optional[int]]] = {}
    for k in keys:
        group = seeds.setdefault((k[0], k[1], k[2]), [])
        if k[3] not in group:
            group.append(k[3])
    for group in seeds.values():
        group.sort(key=_seed_order)
    return StudyIndex(
        cells=cells,
        models=models,
        placements=placements,
        domains=_first_seen(k[2] for k in keys if k[2] != BASE),
        benchmarks=_first_seen(k[4] for k in keys),
        seeds=seeds,
        params=params,
    )


# --------------------------------------------------------------------------- full placement


@dataclass(frozen=True)
class FullChoice:
    """The reference "all components" placement of one model.

    ``placement`` is ``None`` when it could not be determined; ``source`` says how it was
    chosen: ``"given"`` (``StudyResults.full_placement``), ``"most trainable params"``,
    ``"name"`` (the only placement named ``all*``/``full*``, used when parameter counts are
    unknown) or ``"unknown"``; ``note`` is a sentence for the report (empty when given).
    """

    placement: Optional[str]
    source: str
    note: str = ""


def _named_full(names: Sequence[str]) -> Optional[str]:
    hits = [p for p in names if p.lower().startswith(("all", "full"))]
    return hits[0] if len(hits) == 1 else None


def resolve_full_placements(results: StudyResults, index: StudyIndex) -> Dict[str, FullChoice]:
    """``{model: FullChoice}`` for every model (see :class:`FullChoice` for the rules)."""
    out: Dict[str, FullChoice] = {}
    for model in index.models:
        names = index.placements[model]
        given = results.full_placement.get(model)
        prefix = ""
        if given is not None:
            if given in names:
                out[model] = FullChoice(given, "given")
                continue
            prefix = f"the given full placement {given!r} has no results; "
        known = [(index.params[(model, p)], p) for p in names if index.params.get((model, p)) is not None]
        if known and len(known) == len(names):
            top = max(v for v, _ in known)
            pick = [p for v, p in known if v == top][0]
            out[model] = FullChoice(pick, "most trainable params", prefix + (
                f"no full placement was named for {model}; using {pick!r}, the placement with the "
                f"most trainable parameters ({top:,})"))
            continue
        pick = _named_full(names)
        if pick is not None:
            out[model] = FullChoice(pick, "name", prefix + (
                f"no full placement was named for {model} and trainable parameter counts are "
                f"unknown; using {pick!r}, the only placement whose name starts with 'all'/'full'"))
        else:
            out[model] = FullChoice(None, "unknown", prefix + (
                f"no full placement could be determined for {model} (none named, parameter counts "
                f"unknown); comparisons against it and the recipe are left out"))
    return out


# --------------------------------------------------------------------------- accuracy


def _status(correct_n: Tuple[int, int], size: int) -> str:
    n = correct_n[1]
    if n == 0:
        return NOT_SCORED
    return "scored" if n == size else "partially scored"


def _ordered_cell_keys(index: StudyIndex) -> List[CellKey]:
    """Cell keys in display order: model, base first, domain, placement, seed, benchmark."""
    dom = {d: i for i, d in enumerate(index.domains)}
    bench = {b: i for i, b in enumerate(index.benchmarks)}
    model = {m: i for i, m in enumerate(index.models)}

    def key(k: CellKey):
        places = index.placements[k[0]]
        p = -1 if k[1] == BASE else places.index(k[1])
        return (model[k[0]], k[1] != BASE, dom.get(k[2], -1), p, _seed_order(k[3]), bench[k[4]])

    return sorted(index.cells, key=key)


def accuracy_matrix(index: StudyIndex) -> List[dict]:
    """One row per cell.

    Keys: ``model, placement, train_domain, seed, benchmark`` (base: ``placement ==
    train_domain == "base"``), ``n`` (scored examples), ``n_examples`` (all examples),
    ``correct``, ``accuracy``, ``wilson_low``, ``wilson_high`` (Wilson 95%, proportions),
    ``status`` (``"scored"``, ``"partially scored"`` or ``"not scored"``). For a not-scored
    cell ``correct``, ``accuracy`` and the interval are ``None``.
    """
    rows = []
    for key in _ordered_cell_keys(index):
        cell = index.cells[key]
        correct, n = cell_accuracy(cell)
        status = _status((correct, n), len(cell))
        low, high = wilson_interval(correct, n) if n else (None, None)
        rows.append({
            "model": key[0], "placement": key[1], "train_domain": key[2], "seed": key[3],
            "benchmark": key[4], "n": n, "n_examples": len(cell),
            "correct": correct if n else None, "accuracy": correct / n if n else None,
            "wilson_low": low, "wilson_high": high, "status": status,
        })
    return rows


def _over_seeds(values: Sequence[float]) -> Tuple[float, Optional[float], Optional[float]]:
    """``(mean, low, high)`` over seeds; the interval is ``None`` for a single seed."""
    mean, low, high = seed_summary(values)
    if math.isnan(low):
        return mean, None, None
    return mean, low, high


def _group(rows: Iterable[dict], keys: Sequence[str]) -> Dict[tuple, List[dict]]:
    out: Dict[tuple, List[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def accuracy_summary(accuracy_rows: Sequence[dict]) -> List[dict]:
    """Accuracy aggregated over seeds, one row per (model, placement, train_domain, benchmark).

    Keys: ``model, placement, train_domain, benchmark, k_seeds`` (seeds with a scored cell),
    ``accuracy`` (mean over those seeds), ``seed_ci_low, seed_ci_high`` (t interval; ``None``
    for one seed), ``status`` (``"not scored"`` when no seed is scored, else ``"scored"``).
    """
    out = []
    for key, rows in _group(accuracy_rows, ("model", "placement", "train_domain", "benchmark")).items():
        values = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        row = dict(zip(("model", "placement", "train_domain", "benchmark"), key))
        if values:
            mean, low, high = _over_seeds(values)
            row.update(k_seeds=len(values), accuracy=mean, seed_ci_low=low, seed_ci_high=high, status="scored")
        else:
            row.update(k_seeds=0, accuracy=None, seed_ci_low=None, seed_ci_high=None, status=NOT_SCORED)
        out.append(row)
    return out


# --------------------------------------------------------------------------- deltas


def shared_accuracy(a: Mapping[str, Optional[bool]], b: Mapping[str, Optional[bool]]
                    ) -> Tuple[int, Optional[float], Optional[float]]:
    """``(n_shared, acc_a, acc_b)`` over the ids scored in both cells (accuracies ``None``
    when nothing is shared)."""
    ids, xa, xb = paired_arrays(a, b)
    if not ids:
        return 0, None, None
    return len(ids), float(xa.mean()), float(xb.mean())


def _is_target(results: StudyResults, domain: str, bench: str) -> bool:
    return bench in results.target_benchmarks.get(domain, [])


def delta_table(results: StudyResults, index: StudyIndex) -> List[dict]:
    """Delta vs base for every fine-tuned cell.

    Keys: ``model, placement, train_domain, seed, benchmark``, ``target`` (bool: benchmark of
    the training domain), ``n_shared``, ``base_accuracy`` and ``accuracy`` (both over the
    shared scored ids), ``delta_pp`` (pp), ``status``: ``"scored"``, ``"not scored"``
    (the fine-tuned cell has no scored example), ``"no base"`` (the base model was not
    evaluated / scored on it) or ``"no shared ids"``. Non-``"scored"`` rows have ``None``
    numbers.
    """
    rows = []
    for key in _ordered_cell_keys(index):
        model, placement, domain, seed, bench = key
        if placement == BASE:
            continue
        tuned = index.cells[key]
        base = index.base_cell(model, bench, seed)
        row = {"model": model, "placement": placement, "train_domain": domain, "seed": seed,
               "benchmark": bench, "target": _is_target(results, domain, bench),
               "n_shared": None, "base_accuracy": None, "accuracy": None, "delta_pp": None}
        if cell_accuracy(tuned)[1] == 0:
            row["status"] = NOT_SCORED
        elif base is None or cell_accuracy(base)[1] == 0:
            row["status"] = "no base"
        else:
            n, acc, acc_base = shared_accuracy(tuned, base)
            if n == 0:
                row["status"] = "no shared ids"
            else:
                row.update(n_shared=n, base_accuracy=acc_base, accuracy=acc,
                           delta_pp=PP * (acc - acc_base), status="scored")
        rows.append(row)
    return rows


def delta_summary(delta_rows: Sequence[dict]) -> List[dict]:
    """Deltas aggregated over seeds: one row per (model, placement, train_domain, benchmark).

    Keys: ``model, placement, train_domain, benchmark, target, k_seeds, n_shared`` (smallest
    over seeds), ``delta_pp`` (mean over seeds), ``seed_ci_low, seed_ci_high`` (pp; ``None``
    for one seed), ``status`` (``"scored"`` if any seed has a delta, else the first seed's
    status).
    """
    out = []
    for key, rows in _group(delta_rows, ("model", "placement", "train_domain", "benchmark")).items():
        good = [r for r in rows if r["delta_pp"] is not None]
        row = dict(zip(("model", "placement", "train_domain", "benchmark"), key))
        row["target"] = rows[0]["target"]
        if good:
            mean, low, high = _over_seeds([r["delta_pp"] for r in good])
            row.update(k_seeds=len(good), n_shared=min(r["n_shared"] for r in good), delta_pp=mean,
                       seed_ci_low=low, seed_ci_high=high, status="scored")
        else:
            row.update(k_seeds=0, n_shared=None, delta_pp=None, seed_ci_low=None, seed_ci_high=None,
                       status=rows[0]["status"])
        out.append(row)
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def _run_effects(rows: Sequence[dict]) -> dict:
    """Target delta, non-target delta, forgetting and mean delta of one run's delta rows."""
    scored = [r for r in rows if r["delta_pp"] is not None]
    target = [r["delta_pp"] for r in scored if r["target"]]
    other = [r["delta_pp"] for r in scored if not r["target"]]
    return {
        "target_delta_pp": _mean(target),
        "non_target_delta_pp": _mean(other),
        # only losses count: a gain on one benchmark must not hide a loss on another
        "forgetting_pp": _mean([max(0.0, -d) for d in other]),
        "mean_delta_pp": _mean([r["delta_pp"] for r in scored]),
        "target_benchmarks": [r["benchmark"] for r in scored if r["target"]],
        "non_target_benchmarks": [r["benchmark"] for r in scored if not r["target"]],
    }


def _seed_mean(per_seed: Sequence[dict], key: str) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    values = [r[key] for r in per_seed if r[key] is not None]
    return _over_seeds(values) if values else (None, None, None)


def domain_effects(results: StudyResults, delta_rows: Sequence[dict]) -> List[dict]:
    """Target vs non-target effect and forgetting, per (model, placement, train_domain).

    Keys: ``model, placement, train_domain, k_seeds``, ``target_delta_pp``,
    ``non_target_delta_pp``, ``forgetting_pp`` (with ``forgetting_ci_low/high`` over seeds,
    ``None`` for one seed), ``mean_delta_pp`` (over all scored benchmarks), all means over
    seeds; ``target_benchmarks`` / ``non_target_benchmarks`` (scored benchmark names used);
    ``target_note``: why ``target_delta_pp`` is ``None`` (``"no target benchmark defined"``
    or ``"target benchmark not scored"``), else ``""``.
    """
    out = []
    for key, rows in _group(delta_rows, ("model", "placement", "train_domain")).items():
        model, placement, domain = key
        per_seed = [_run_effects(r) for r in _group(rows, ("seed",)).values()]
        row = {"model": model, "placement": placement, "train_domain": domain,
               "k_seeds": sum(1 for r in per_seed if r["mean_delta_pp"] is not None)}
        row["target_delta_pp"] = _seed_mean(per_seed, "target_delta_pp")[0]
        row["non_target_delta_pp"] = _seed_mean(per_seed, "non_target_delta_pp")[0]
        forget, low, high = _seed_mean(per_seed, "forgetting_pp")
        row.update(forgetting_pp=forget, forgetting_ci_low=low, forgetting_ci_high=high)
        row["mean_delta_pp"] = _seed_mean(per_seed, "mean_delta_pp")[0]
        row["target_benchmarks"] = _first_seen(b for r in per_seed for b in r["target_benchmarks"])
        row["non_target_benchmarks"] = _first_seen(b for r in per_seed for b in r["non_target_benchmarks"])
        if row["target_delta_pp"] is not None:
            row["target_note"] = ""
        elif not results.target_benchmarks.get(domain):
            row["target_note"] = "no target benchmark defined"
        else:
            row["target_note"] = "target benchmark not scored"
        out.append(row)
    return out


def efficiency_table(index: StudyIndex, effects: Sequence[dict]) -> List[dict]:
    """Accuracy gain per million trainable parameters, per (model, placement, train_domain).

    Keys: ``model, placement, train_domain, trainable_params`` (``None`` = unknown),
    ``mean_delta_pp`` (from :func:`domain_effects`), ``gain_pp_per_million`` =
    ``mean_delta_pp / (trainable_params / 1e6)`` (``None`` when either is unknown or the
    count is 0).
    """
    out = []
    for row in effects:
        params = index.params.get((row["model"], row["placement"]))
        delta = row["mean_delta_pp"]
        gain = delta / (params / 1e6) if params and delta is not None else None
        out.append({"model": row["model"], "placement": row["placement"], "train_domain": row["train_domain"],
                    "trainable_params": params, "mean_delta_pp": delta, "gain_pp_per_million": gain})
    return out


# --------------------------------------------------------------------------- placement means, Pareto, recipe


def _common_ids(cells: Sequence[Optional[Mapping[str, Optional[bool]]]]) -> List[str]:
    """Ids scored in every cell (sorted); empty if a cell is missing."""
    if not cells or any(c is None for c in cells):
        return []
    sets = [{k for k, v in c.items() if v is not None} for c in cells]
    return sorted(set.intersection(*sets))


def placement_means(index: StudyIndex) -> List[dict]:
    """Mean accuracy of each placement within (model, train_domain), comparably computed.

    For each benchmark, only the ids scored in every run (placement x seed) of the group are
    used; benchmarks without such ids are left out of the whole group. Keys: ``model,
    train_domain, placement, trainable_params, k_seeds, mean_accuracy`` (proportion, mean
    over benchmarks then over seeds; ``None`` when no benchmark is common),
    ``seed_ci_low, seed_ci_high``, ``benchmarks`` (names used), ``n_per_benchmark``
    (``{benchmark: common ids}``), ``pareto`` (on the front of its group; ``None`` when
    params or accuracy is unknown).
    """
    out = []
    for model in index.models:
        for domain in index.domains:
            runs = [(p, s) for p in index.placements[model] for s in index.seeds.get((model, p, domain), [])]
            if not runs:
                continue
            common = {}
            for bench in index.benchmarks:
                ids = _common_ids([index.cell(model, p, domain, s, bench) for p, s in runs])
                if ids:
                    common[bench] = ids
            for placement in _first_seen(p for p, _ in runs):
                per_seed = []
                for s in index.seeds[(model, placement, domain)]:
                    accs = [np.mean([index.cell(model, placement, domain, s, b)[i] for i in ids])
                            for b, ids in common.items()]
                    if accs:
                        per_seed.append(float(np.mean(accs)))
                mean, low, high = _over_seeds(per_seed) if per_seed else (None, None, None)
                out.append({"model": model, "train_domain": domain, "placement": placement,
                            "trainable_params": index.params.get((model, placement)),
                            "k_seeds": len(per_seed), "mean_accuracy": mean,
                            "seed_ci_low": low, "seed_ci_high": high, "benchmarks": list(common),
                            "n_per_benchmark": {b: len(ids) for b, ids in common.items()}})
    return _with_pareto(out)


def pareto_mask(params: Sequence[float], scores: Sequence[float]) -> List[bool]:
    """Which points are Pareto-optimal for (fewer params, higher score).

    Inputs: two equal-length sequences. Output: ``list[bool]``; point ``i`` is ``False`` iff
    some ``j`` has ``params[j] <= params[i]`` and ``scores[j] >= scores[i]`` with at least
    one strict. Identical points are all optimal.
    """
    x = np.asarray(params, dtype=float)
    y = np.asarray(scores, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("params and scores must be flat sequences of equal length")
    no_worse = (x[None, :] <= x[:, None]) & (y[None, :] >= y[:, None])
    better = (x[None, :] < x[:, None]) | (y[None, :] > y[:, None])
    return (~(no_worse & better).any(axis=1)).tolist()


def _with_pareto(rows: List[dict]) -> List[dict]:
    """Add ``pareto`` (bool, or ``None`` when params or accuracy is unknown) per group."""
    for _, group in _group(rows, ("model", "train_domain")).items():
        known = [r for r in group if r["trainable_params"] is not None and r["mean_accuracy"] is not None]
        mask = pareto_mask([r["trainable_params"] for r in known], [r["mean_accuracy"] for r in known]) if known else []
        flags = {id(r): m for r, m in zip(known, mask)}
        for r in group:
            r["pareto"] = flags.get(id(r))
    return rows


def recipe_choice(candidates: Sequence[Tuple[str, Optional[int], Optional[float]]], full: str,
                  fraction: float = RECIPE_FRACTION) -> dict:
    """Pick the smallest placement within ``fraction`` of the full placement's accuracy.

    Input: ``[(placement, trainable_params or None, mean_accuracy or None), ...]`` including
    ``full``. Output keys: ``full_accuracy``, ``threshold`` (= ``fraction * full_accuracy``),
    ``qualifying`` (placements with accuracy ``>= threshold``, fewest params first),
    ``choice`` (``None`` when it cannot be decided) and ``reason`` (why not, else ``""``).
    Ties on params go to the higher accuracy, then the name.
    """
    acc = {name: a for name, _, a in candidates}
    params = {name: p for name, p, _ in candidates}
    full_acc = acc.get(full)
    if full_acc is None:
        return {"full_accuracy": None, "threshold": None, "qualifying": [], "choice": None,
                "reason": f"full placement {full!r} has no mean accuracy"}
    threshold = fraction * full_acc
    qual = [n for n, _, a in candidates if a is not None and a >= threshold]
    qual.sort(key=lambda n: (params[n] is None, params[n] or 0, -acc[n], n))
    if any(params[n] is None for n in qual):
        return {"full_accuracy": full_acc, "threshold": threshold, "qualifying": qual, "choice": None,
                "reason": "trainable parameter counts unknown, so the smallest qualifying placement cannot be chosen"}
    return {"full_accuracy": full_acc, "threshold": threshold, "qualifying": qual, "choice": qual[0], "reason": ""}


def practitioner_recipe(means: Sequence[dict], full: Mapping[str, FullChoice],
                        fraction: float = RECIPE_FRACTION) -> List[dict]:
    """The recipe per (model, train_domain), from :func:`placement_means` rows.

    Keys: ``model, train_domain, full_placement, full_source, full_mean_accuracy, threshold,
    recommended, recommended_params, recommended_mean_accuracy, ratio_to_full`` (proportion
    of the full placement's accuracy), ``qualifying`` (list), ``note`` (why no recommendation,
    else ``""``).
    """
    out = []
    for (model, domain), group in _group(means, ("model", "train_domain")).items():
        choice = full[model]
        row = {"model": model, "train_domain": domain, "full_placement": choice.placement,
               "full_source": choice.source, "full_mean_accuracy": None, "threshold": None,
               "recommended": None, "recommended_params": None, "recommended_mean_accuracy": None,
               "ratio_to_full": None, "qualifying": [], "note": ""}
        if choice.placement is None:
            row["note"] = "full placement unknown"
            out.append(row)
            continue
        pick = recipe_choice([(r["placement"], r["trainable_params"], r["mean_accuracy"]) for r in group],
                             choice.placement, fraction)
        row.update(full_mean_accuracy=pick["full_accuracy"], threshold=pick["threshold"],
                   qualifying=pick["qualifying"], note=pick["reason"])
        if pick["choice"] is not None:
            rec = next(r for r in group if r["placement"] == pick["choice"])
            row.update(recommended=pick["choice"], recommended_params=rec["trainable_params"],
                       recommended_mean_accuracy=rec["mean_accuracy"])
            if pick["full_accuracy"]:
                row["ratio_to_full"] = rec["mean_accuracy"] / pick["full_accuracy"]
        out.append(row)
    return out


# --------------------------------------------------------------------------- paired tests


def _comparison_seed(seed: int, key: tuple) -> int:
    """A bootstrap seed per comparison, derived from the report seed and the comparison's
    identity: results do not depend on which other comparisons exist or their order."""
    tag = zlib.crc32("|".join(map(str, key)).encode("utf-8"))
    return int(np.random.SeedSequence([int(seed), tag]).generate_state(1)[0])


def _planned_pairs(index: StudyIndex, full: Mapping[str, FullChoice]):
    """Yield ``(row identity, reference, cell_a, cell_b)`` for every planned comparison: each fine-tuned cell vs
    base and vs the full placement, then (reference ``"pair"``) every other pair of placements of one model ×
    train domain × seed × benchmark, ``placement_a`` the one listed first in the index (fewer parameters)."""
    for key in _ordered_cell_keys(index):
        model, placement, domain, seed, bench = key
        if placement == BASE:
            continue
        ident = {"model": model, "train_domain": domain, "benchmark": bench, "placement_a": placement, "seed": seed}
        yield dict(ident, placement_b=BASE), "base", index.cells[key], index.base_cell(model, bench, seed)
        ref = full[model].placement
        if ref is not None and ref != placement:
            yield (dict(ident, placement_b=ref), "full", index.cells[key],
                   index.cell(model, ref, domain, seed, bench))
    yield from _placement_pairs(index, full)


def _placement_pairs(index: StudyIndex, full: Mapping[str, FullChoice]):
    """Every pair of fine-tuned placements within model × train domain × seed × benchmark whose cells both exist,
    except the pairs with the full placement (already compared, reference ``"full"``)."""
    for key in _ordered_cell_keys(index):
        model, placement_a, domain, seed, bench = key
        if placement_a == BASE:
            continue
        places = index.placements[model]
        for placement_b in places[places.index(placement_a) + 1:]:
            if full[model].placement in (placement_a, placement_b):
                continue
            cell_b = index.cell(model, placement_b, domain, seed, bench)
            if cell_b is None:
                continue  # that run did not evaluate this benchmark (or does not exist): nothing was planned
            ident = {"model": model, "train_domain": domain, "benchmark": bench, "placement_a": placement_a,
                     "placement_b": placement_b, "seed": seed}
            yield ident, "pair", index.cells[key], cell_b


def _gap_reason(cell_a, cell_b) -> str:
    if cell_accuracy(cell_a)[1] == 0:
        return NOT_SCORED
    if cell_b is None:
        return "reference not evaluated"
    if cell_accuracy(cell_b)[1] == 0:
        return "reference not scored"
    return "no shared scored ids" if not paired_arrays(cell_a, cell_b)[0] else ""


def paired_comparisons(index: StudyIndex, full: Mapping[str, FullChoice], *, resamples: int = 10_000,
                       seed: int = 0, progress: Optional[Callable[[Iterable], Iterable]] = None
                       ) -> Tuple[List[dict], List[dict]]:
    """Paired bootstrap and exact McNemar of each fine-tuned cell vs base and vs full, and of every other pair
    of placements of one model × train domain × seed × benchmark.

    Pairs are the example ids scored in both cells, nothing else. Output ``(rows, gaps)``.
    ``rows`` keys: ``model, train_domain, benchmark, placement_a, placement_b, n_shared,
    mean_diff, ci_low, ci_high`` (pp, ``a - b``, percentile 95% interval of ``resamples``
    replicates), ``seed``, ``reference`` (``"base"``/``"full"``/``"pair"``), ``b01`` (a wrong, b right),
    ``b10`` (a right, b wrong), ``mcnemar_p``, ``p_holm`` and ``holm_family``: Holm over every base/full row of
    the same model (family ``"model"``), and over the placement pairs of the same model × train domain × seed ×
    benchmark (family ``"model x domain x benchmark"``, the comparisons a report shows side by side), so adding
    the pairs leaves the base/full adjustment as it was. ``gaps``: the comparisons that could not be made, keys
    ``model, train_domain, benchmark, placement_a, placement_b, seed, reason``. ``progress`` optionally wraps the
    work list (e.g. ``tqdm``).
    """
    plan = list(_planned_pairs(index, full))
    rows, gaps = [], []
    for ident, reference, a, b in (progress(plan) if progress else plan):
        reason = _gap_reason(a, b)
        if reason:
            gaps.append(dict(ident, reason=reason))
            continue
        key = tuple(ident[k] for k in ("model", "train_domain", "benchmark", "placement_a", "placement_b", "seed"))
        boot = paired_bootstrap(a, b, resamples=resamples, seed=_comparison_seed(seed, key))
        test = mcnemar_exact(a, b)
        rows.append({"model": ident["model"], "train_domain": ident["train_domain"], "benchmark": ident["benchmark"],
                     "placement_a": ident["placement_a"], "placement_b": ident["placement_b"],
                     "n_shared": boot.n_shared, "mean_diff": PP * boot.mean_diff, "ci_low": PP * boot.ci_low,
                     "ci_high": PP * boot.ci_high, "seed": ident["seed"], "reference": reference,
                     "b01": test.b01, "b10": test.b10, "mcnemar_p": test.p_value, "p_holm": None,
                     "holm_family": _holm_family(reference)})
    _holm_by_family(rows, "mcnemar_p")
    return rows, gaps


PAIR_FAMILY = "model x domain x benchmark"


def _holm_family(reference: str) -> str:
    return PAIR_FAMILY if reference == "pair" else "model"


def _holm_by_family(rows: List[dict], p_key: str) -> None:
    """Fill ``p_holm`` in place: Holm over the rows of one family that have a p-value. A row's family: its
    model (comparisons with base and the full placement), or its model × train domain × seed × benchmark
    (placement pairs; rows without a ``seed`` key, as over seeds, group without it)."""
    def family(r: dict) -> tuple:
        if r["reference"] != "pair":
            return ("model", r["model"])
        return ("pair", r["model"], r["train_domain"], r.get("seed"), r["benchmark"])

    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(family(r), []).append(r)
    for group in groups.values():
        with_p = [r for r in group if r[p_key] is not None]
        for r, adj in zip(with_p, holm([r[p_key] for r in with_p])):
            r["p_holm"] = adj


def seed_comparisons(paired_rows: Sequence[dict]) -> List[dict]:
    """Paired differences aggregated over seeds (only emitted when some comparison has 2+ seeds).

    One row per (model, train_domain, benchmark, placement_a, placement_b). Keys: those,
    ``reference, k_seeds, mean_diff`` (pp, mean of per-seed ``mean_diff``), ``seed_ci_low,
    seed_ci_high`` (t interval over seeds, ``None`` for one seed), ``t_p`` (two-sided
    one-sample t-test of the per-seed differences against 0; ``None`` for fewer than 2 seeds
    or zero spread), ``p_holm`` and ``holm_family`` (Holm over the rows of one family with a ``t_p``; families
    as in :func:`paired_comparisons`).
    """
    keys = ("model", "train_domain", "benchmark", "placement_a", "placement_b")
    groups = _group(paired_rows, keys)
    if not any(len(g) > 1 for g in groups.values()):
        return []
    out = []
    for key, group in groups.items():
        diffs = [r["mean_diff"] for r in group]
        mean, low, high = _over_seeds(diffs)
        p = None
        if len(diffs) > 1 and float(np.std(diffs)) > 0:
            p = float(_sps.ttest_1samp(diffs, 0.0).pvalue)
        out.append(dict(zip(keys, key), reference=group[0]["reference"], k_seeds=len(diffs), mean_diff=mean,
                        seed_ci_low=low, seed_ci_high=high, t_p=p, p_holm=None,
                        holm_family=_holm_family(group[0]["reference"])))
    _holm_by_family(out, "t_p")
    return out


# --------------------------------------------------------------------------- summary per model


def _best(rows: Sequence[dict], key: str, largest: bool) -> Tuple[Optional[float], List[str]]:
    """``(best value, [placements reaching it])``; ``(None, [])`` when no row has a value."""
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return None, []
    top = max(values) if largest else min(values)
    return top, [r["placement"] for r in rows if r[key] is not None and math.isclose(r[key], top, abs_tol=1e-12)]


def model_summary(recipe: Sequence[dict], means: Sequence[dict], effects: Sequence[dict]) -> List[dict]:
    """The facts behind "where should LoRA go", per (model, train_domain).

    Keys: ``model, train_domain``, ``recipe`` (recommended placement or ``None``),
    ``recipe_note``, ``qualifying`` (list); then for three criteria a value and the list of
    placements reaching it (several = a tie): ``best_accuracy_value`` / ``best_accuracy``
    (highest mean accuracy), ``best_target_delta_pp`` / ``best_target`` (largest target
    delta; empty when no target is scored), ``least_forgetting_pp`` / ``least_forgetting``.
    """
    rec = {(r["model"], r["train_domain"]): r for r in recipe}
    eff = _group(effects, ("model", "train_domain"))
    out = []
    for (model, domain), group in _group(means, ("model", "train_domain")).items():
        r = rec.get((model, domain), {})
        runs = eff.get((model, domain), [])
        acc, acc_who = _best(group, "mean_accuracy", True)
        tgt, tgt_who = _best(runs, "target_delta_pp", True)
        forget, forget_who = _best(runs, "forgetting_pp", False)
        out.append({"model": model, "train_domain": domain, "recipe": r.get("recommended"),
                    "recipe_note": r.get("note", ""), "qualifying": r.get("qualifying", []),
                    "best_accuracy": acc_who, "best_accuracy_value": acc,
                    "best_target": tgt_who, "best_target_delta_pp": tgt,
                    "least_forgetting": forget_who, "least_forgetting_pp": forget})
    return out


# --------------------------------------------------------------------------- matrices for heatmaps


@dataclass(frozen=True)
class Matrix:
    """A labelled 2-D table for a heatmap.

    ``values``: float array of shape ``(len(row_labels), len(col_labels))``, ``nan`` where
    there is no number; ``marks``: same shape, ``""`` or a short word for an empty cell
    (``"n/s"`` = not scored, ``"—"`` = not evaluated); ``unit``: ``"accuracy"`` (0..1) or
    ``"pp"``; ``highlight``: ``(row, col)`` cells to outline (target benchmarks).
    """

    title: str
    row_labels: List[str]
    col_labels: List[str]
    values: np.ndarray
    marks: List[List[str]]
    unit: str
    highlight: List[Tuple[int, int]] = field(default_factory=list)


def _fill(rows_keys: List[tuple], cols: List[str], lookup: Mapping[tuple, dict], value_key: str
          ) -> Tuple[np.ndarray, List[List[str]]]:
    values = np.full((len(rows_keys), len(cols)), np.nan)
    marks = [["—"] * len(cols) for _ in rows_keys]
    for i, rk in enumerate(rows_keys):
        for j, bench in enumerate(cols):
            row = lookup.get(rk + (bench,))
            if row is None:
                continue
            if row[value_key] is None:
                marks[i][j] = "n/s" if row["status"] == NOT_SCORED else "—"
            else:
                values[i, j] = row[value_key]
                marks[i][j] = ""
    return values, marks


def _row_keys(index: StudyIndex, model: str, with_base: bool) -> Tuple[List[tuple], List[str]]:
    keys = [(model, BASE, BASE)] if with_base else []
    labels = ["base"] if with_base else []
    for domain in index.domains:
        for placement in index.placements[model]:
            if (model, placement, domain) in index.seeds:
                keys.append((model, placement, domain))
                labels.append(f"{domain} / {placement}")
    return keys, labels


def _highlights(results: StudyResults, keys: List[tuple], cols: List[str]) -> List[Tuple[int, int]]:
    return [(i, j) for i, k in enumerate(keys) for j, b in enumerate(cols) if _is_target(results, k[2], b)]


def accuracy_maps(results: StudyResults, index: StudyIndex, summary: Sequence[dict]) -> Dict[str, Matrix]:
    """Per model: (base + train_domain/placement) x benchmark mean accuracy over seeds."""
    lookup = {(r["model"], r["placement"], r["train_domain"], r["benchmark"]): r for r in summary}
    out = {}
    for model in index.models:
        keys, labels = _row_keys(index, model, with_base=True)
        values, marks = _fill(keys, index.benchmarks, lookup, "accuracy")
        out[model] = Matrix(f"Accuracy — {model}", labels, list(index.benchmarks), values, marks, "accuracy",
                            _highlights(results, keys, index.benchmarks))
    return out


def delta_maps(results: StudyResults, index: StudyIndex, dsummary: Sequence[dict]) -> Dict[str, Matrix]:
    """Per model: (train_domain/placement) x benchmark delta vs base (pp, mean over seeds)."""
    lookup = {(r["model"], r["placement"], r["train_domain"], r["benchmark"]): r for r in dsummary}
    out = {}
    for model in index.models:
        keys, labels = _row_keys(index, model, with_base=False)
        if not keys:
            continue
        values, marks = _fill(keys, index.benchmarks, lookup, "delta_pp")
        out[model] = Matrix(f"Delta vs base (pp) — {model}", labels, list(index.benchmarks), values, marks, "pp",
                            _highlights(results, keys, index.benchmarks))
    return out


def transfer_maps(results: StudyResults, index: StudyIndex, dsummary: Sequence[dict]) -> Dict[str, Matrix]:
    """Per model: train_domain x benchmark delta vs base (pp), mean over placements and seeds."""
    out = {}
    for model in index.models:
        domains = [d for d in index.domains if any((model, p, d) in index.seeds for p in index.placements[model])]
        if not domains:
            continue
        values = np.full((len(domains), len(index.benchmarks)), np.nan)
        marks = [["—"] * len(index.benchmarks) for _ in domains]
        for i, domain in enumerate(domains):
            for j, bench in enumerate(index.benchmarks):
                rows = [r for r in dsummary
                        if (r["model"], r["train_domain"], r["benchmark"]) == (model, domain, bench)]
                deltas = [r["delta_pp"] for r in rows if r["delta_pp"] is not None]
                if deltas:
                    values[i, j], marks[i][j] = float(np.mean(deltas)), ""
                elif rows and any(r["status"] == NOT_SCORED for r in rows):
                    marks[i][j] = "n/s"
        keys = [(model, None, d) for d in domains]
        out[model] = Matrix(f"Transfer: delta vs base (pp), mean over placements — {model}", domains,
                            list(index.benchmarks), values, marks, "pp", _highlights(results, keys, index.benchmarks))
    return out


# --------------------------------------------------------------------------- parameters and traces


def params_table(index: StudyIndex) -> List[dict]:
    """``[{model, placement, trainable_params}]`` for every fine-tuned placement (``None`` = unknown)."""
    return [{"model": m, "placement": p, "trainable_params": index.params.get((m, p))}
            for m in index.models for p in index.placements[m]]


def component_params_table(results: StudyResults, index: StudyIndex) -> List[dict]:
    """``[{model, placement, component, trainable_params}]`` from ``params_by_component``,
    in display order (placements without a breakdown are left out)."""
    out = []
    pairs = [(m, p) for m in index.models for p in index.placements[m]]
    pairs += [k for k in results.params_by_component if k not in pairs]
    for pair in pairs:
        for component, n in results.params_by_component.get(pair, {}).items():
            out.append({"model": pair[0], "placement": pair[1], "component": component, "trainable_params": int(n)})
    return out


@dataclass(frozen=True)
class Series:
    """One line of a plot: ``label``, ``x`` and ``y`` float arrays of equal shape ``(n,)``."""

    label: str
    x: np.ndarray
    y: np.ndarray


def _run_label(key: RunKey, several_seeds: bool) -> str:
    return f"{key[1]} (seed {key[3]})" if several_seeds else key[1]


def _xy(rows: Sequence[dict], value: Callable[[dict], Optional[float]]) -> Tuple[np.ndarray, np.ndarray]:
    pts = sorted((float(r["step"]), float(v)) for r in rows if "step" in r for v in [value(r)] if v is not None)
    arr = np.asarray(pts, dtype=float).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def loss_curves(results: StudyResults) -> Dict[Tuple[str, str], List[Series]]:
    """``{(model, train_domain): [Series(placement label, step, loss), ...]}``; a run whose
    rows carry ``val_loss`` adds a second series labelled ``"<label> (val)"``."""
    out: Dict[Tuple[str, str], List[Series]] = {}
    seeds = Counter((k[0], k[1], k[2]) for k in results.curves)
    for key, rows in results.curves.items():
        label = _run_label(key, seeds[(key[0], key[1], key[2])] > 1)
        group = out.setdefault((key[0], key[2]), [])
        x, y = _xy(rows, lambda r: r.get("loss"))
        if x.size:
            group.append(Series(label, x, y))
        x, y = _xy(rows, lambda r: r.get("val_loss"))
        if x.size:
            group.append(Series(label + " (val)", x, y))
    return {k: v for k, v in out.items() if v}


def norm_curves(results: StudyResults) -> Dict[Tuple[str, str], Dict[str, List[Series]]]:
    """``{(model, train_domain): {run label: [Series(component, step, ‖BA‖ sum), ...]}}``."""
    out: Dict[Tuple[str, str], Dict[str, List[Series]]] = {}
    seeds = Counter((k[0], k[1], k[2]) for k in results.norms)
    for key, rows in results.norms.items():
        components = _first_seen(c for r in rows for c in (r.get("norms") or {}))
        series = []
        for comp in components:
            x, y = _xy(rows, lambda r, c=comp: (r.get("norms") or {}).get(c))
            if x.size:
                series.append(Series(comp, x, y))
        if series:
            label = _run_label(key, seeds[(key[0], key[1], key[2])] > 1)
            out.setdefault((key[0], key[2]), {})[label] = series
    return out


# --------------------------------------------------------------------------- everything


@dataclass
class StudyTables:
    """Every table, matrix and trace of one report (see each function for row keys)."""

    index: StudyIndex
    full: Dict[str, FullChoice]
    accuracy: List[dict]
    accuracy_summary: List[dict]
    deltas: List[dict]
    delta_summary: List[dict]
    domain_effects: List[dict]
    efficiency: List[dict]
    placement_means: List[dict]
    recipe: List[dict]
    paired: List[dict]
    comparison_gaps: List[dict]
    seed_comparisons: List[dict]
    summary: List[dict]
    params: List[dict]
    component_params: List[dict]
    accuracy_maps: Dict[str, Matrix]
    delta_maps: Dict[str, Matrix]
    transfer_maps: Dict[str, Matrix]
    loss_curves: Dict[Tuple[str, str], List[Series]]
    norm_curves: Dict[Tuple[str, str], Dict[str, List[Series]]]


def compute_tables(results: StudyResults, *, resamples: int = 10_000, seed: int = 0,
                   progress: Optional[Callable[[Iterable], Iterable]] = None) -> StudyTables:
    """Compute everything the report shows. ``progress`` wraps the paired-test work list."""
    index = index_study(results)
    full = resolve_full_placements(results, index)
    accuracy = accuracy_matrix(index)
    acc_summary = accuracy_summary(accuracy)
    deltas = delta_table(results, index)
    dsummary = delta_summary(deltas)
    effects = domain_effects(results, deltas)
    means = placement_means(index)
    recipe = practitioner_recipe(means, full)
    paired, gaps = paired_comparisons(index, full, resamples=resamples, seed=seed, progress=progress)
    return StudyTables(
        index=index, full=full, accuracy=accuracy, accuracy_summary=acc_summary, deltas=deltas,
        delta_summary=dsummary, domain_effects=effects, efficiency=efficiency_table(index, effects),
        placement_means=means, recipe=recipe, paired=paired, comparison_gaps=gaps,
        seed_comparisons=seed_comparisons(paired), summary=model_summary(recipe, means, effects),
        params=params_table(index), component_params=component_params_table(results, index),
        accuracy_maps=accuracy_maps(results, index, acc_summary), delta_maps=delta_maps(results, index, dsummary),
        transfer_maps=transfer_maps(results, index, dsummary), loss_curves=loss_curves(results),
        norm_curves=norm_curves(results),
    )
