"""The advisor's track record on a study whose full grid is known (``hybridlora advise --validate STUDY_DIR``).

For every (model, training domain) of the study the advisor measures its signals on the same base model and
data as the study's cells, scores every placement of the grid at its own hosts and ranks, and is compared with
what the study measured (mean accuracy over the benchmarks, ``analysis.metrics.placement_means``):

* Spearman correlation between score and measured accuracy over the grid's placements;
* the rank of its pick in the measured order (1 = best): the grid placement it scores highest ("select"), and the
  study's own ``advisor`` placement when the study ran one ("proposal");
* regret = best accuracy − the pick's, per seed, with a Student-t interval over seeds;
* the same for the "attention only" baseline (the grid's placement whose hosts are all softmax attention), so an
  advisor no better than it says so;
* cost: the advisor's wall time as a fraction of the grid's recorded training+evaluation time of that group.

Written to ``<study>/advisor/track_record.{json,md}``.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .allocate import placement_value
from .propose import advice_examples, measure
from .signals import candidate_hosts, probe_signals, probe_loss_with_only

SIGNAL_NAMES = ("grad", "probe", "probe_loss")


# --- what the study measured ---------------------------------------------------------------------------
def _placement_accuracy(results) -> dict[tuple[str, str], dict[str, float]]:
    from ..analysis.metrics import index_study, placement_means

    out: dict[tuple[str, str], dict[str, float]] = {}
    for row in placement_means(index_study(results)):
        if row["mean_accuracy"] is not None:
            out.setdefault((row["model"], row["train_domain"]), {})[row["placement"]] = row["mean_accuracy"]
    return out


def measured_accuracy(study_dir) -> tuple[dict, dict]:
    """({(model, domain): {placement: mean accuracy over seeds}}, {(model, domain): {seed: {placement: acc}}})."""
    from ..analysis.contract import BASE
    from ..study.results import load_study_results

    results = load_study_results(study_dir)
    overall = _placement_accuracy(results)
    per_seed: dict = {}
    seeds = sorted({r.seed for r in results.runs if r.seed is not None})
    for seed in seeds:
        keep = lambda r: r.seed == seed or r.placement == BASE  # noqa: E731
        one = replace(results, records=[r for r in results.records if keep(r)],
                      runs=[r for r in results.runs if keep(r)])
        for group, accs in _placement_accuracy(one).items():
            per_seed.setdefault(group, {})[seed] = accs
    return overall, per_seed


def study_groups(study_dir) -> dict[tuple[str, str], dict]:
    """Complete train jobs per (model, domain): one spec per placement and the group's recorded wall time."""
    from ..study.store import Store

    store = Store(study_dir, create=False)
    try:
        jobs = store.jobs()
    finally:
        store.close()
    groups: dict[tuple[str, str], dict] = {}
    for job in jobs:
        if job["kind"] != "train" or job["status"] != "complete":
            continue
        g = groups.setdefault((job["model"], job["train_domain"]), {"specs": {}, "grid_wall_s": 0.0, "cells": 0})
        g["specs"].setdefault(job["placement"], json.loads(job["spec"]))
        g["grid_wall_s"] += job["wall_s"] or 0.0
        g["cells"] += 1
    if not groups:
        from ..study.store import StoreError

        raise StoreError(f"{study_dir}: no complete training cell to validate against; run the study first")
    return groups


# --- what the advisor predicts -------------------------------------------------------------------------
def advisor_scores(study_dir, group: dict, *, signals, examples: int, seed: int, max_length: int) -> dict:
    """Scores of every grid placement of one group under each signal, and what each signal cost."""
    import torch

    from ..components import build_component_map
    from ..data import pad_id_of
    from ..study.jobs import data_dir_of, load_base, resolve_placement

    any_spec = next(iter(group["specs"].values()))  # every cell of a group shares base model, data and domain
    model, tokenizer = load_base(any_spec["model"])
    cmap = build_component_map(model)
    resolved = {name: resolve_placement(spec, model) for name, spec in group["specs"].items()}
    pad = pad_id_of(tokenizer)
    tr, held_out, _ = advice_examples(any_spec["domain"]["name"], tokenizer,
                                      data_dir=data_dir_of(any_spec, Path(study_dir)), examples=examples, seed=seed,
                                      max_length=max_length)
    candidates = candidate_hosts(cmap)
    scores, cost, unscored = {}, {}, {}
    if "grad" in signals:
        grad = measure("grad", model, candidates, tr, held_out, pad, seed=seed)
        scores["grad"] = {n: placement_value(grad, r) for n, r in resolved.items()}
        cost["grad"] = grad.wall_s
        unscored["grad"] = _unscored(grad, resolved)
    if "probe" in signals or "probe_loss" in signals:
        torch.manual_seed(seed)
        probe = probe_signals(model, candidates, tr, held_out, pad, seed=seed)
        if "probe" in signals:
            scores["probe"] = {n: placement_value(probe.signals, r) for n, r in resolved.items()}
            cost["probe"] = probe.signals.wall_s
            unscored["probe"] = _unscored(probe.signals, resolved)
        if "probe_loss" in signals:
            start = time.perf_counter()
            # a lower held-out loss with only the placement's adapters kept = a larger score
            scores["probe_loss"] = {n: probe.base_loss - probe_loss_with_only(probe, {h.name for h in r.hosts}, pad)
                                    for n, r in resolved.items()}
            cost["probe_loss"] = probe.signals.wall_s + time.perf_counter() - start
            unscored["probe_loss"] = _unscored(probe.signals, resolved)
        probe.peft_model.unload()
    attention_only = _attention_only(resolved)
    return {"scores": scores, "cost_s": cost, "unscored": unscored, "attention_only": attention_only,
            "trainable_params": {n: r.trainable_params for n, r in resolved.items()},
            "examples": len(tr)}


def _unscored(signals, resolved) -> dict[str, int]:
    """Hosts of a grid placement that carry no signal (e.g. outside the candidate set), by placement."""
    out = {n: sum(1 for h in r.hosts if h.name not in signals.gains) for n, r in resolved.items()}
    return {n: k for n, k in out.items() if k}


def _attention_only(resolved) -> str | None:
    """The grid's all-softmax-attention placement (the largest, if several): the baseline to beat."""
    pure = [(r.trainable_params, n) for n, r in resolved.items()
            if r.hosts and all(h.component == "softmax_attention" for h in r.hosts)]
    return max(pure)[1] if pure else None


# --- comparison ----------------------------------------------------------------------------------------
def _spearman(xs: list[float], ys: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None  # undefined: too few placements or a constant side
    return float(spearmanr(xs, ys).statistic)


def _rank_of(name: str, accuracy: dict[str, float]) -> int:
    """1 = best measured accuracy; ties share the better rank."""
    return 1 + sum(1 for a in accuracy.values() if a > accuracy[name])


def _regret(name: str, per_seed: dict[int, dict[str, float]]) -> dict:
    from ..analysis.stats import seed_summary

    values = {seed: 100 * (max(accs.values()) - accs[name]) for seed, accs in per_seed.items() if name in accs}
    if not values:
        return {"regret_pp": None, "ci_low": None, "ci_high": None, "seeds": 0, "per_seed_pp": {}}
    mean, low, high = seed_summary(list(values.values()))
    return {"regret_pp": round(mean, 3), "ci_low": _finite(low), "ci_high": _finite(high), "seeds": len(values),
            "per_seed_pp": {str(k): round(v, 3) for k, v in values.items()}}


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 3)


def _pick_report(name: str | None, accuracy: dict[str, float], per_seed) -> dict | None:
    if name is None or name not in accuracy:
        return None
    return {"placement": name, "rank": _rank_of(name, accuracy), "of": len(accuracy),
            "accuracy": round(accuracy[name], 4), **_regret(name, per_seed)}


def compare_group(scores: dict[str, dict[str, float]], accuracy: dict[str, float], per_seed, attention_only,
                  chosen: str, proposals: list[str] = ()) -> dict:
    """Per signal: Spearman, its selection among the grid's presets, and (chosen signal) the proposal's rank."""
    presets = [n for n in accuracy if n not in proposals and n in next(iter(scores.values()), {})]
    out = {"placements": {n: round(a, 4) for n, a in sorted(accuracy.items(), key=lambda kv: -kv[1])},
           "best": max(accuracy, key=accuracy.get), "signals": {}}
    for signal, score in scores.items():
        ranked = [n for n in presets if n in score]
        pick = max(ranked, key=lambda n: (score[n], n)) if ranked else None
        out["signals"][signal] = {
            "spearman": _spearman([score[n] for n in ranked], [accuracy[n] for n in ranked]),
            "n_placements": len(ranked),
            "scores": {n: score[n] for n in ranked},
            "select": _pick_report(pick, {n: accuracy[n] for n in presets}, per_seed),
        }
    # the study's own advisor cells, ranked among everything the study measured
    out["proposals"] = [_pick_report(n, accuracy, per_seed) for n in proposals if n in accuracy]
    out["attention_only"] = _pick_report(attention_only, {n: accuracy[n] for n in presets}, per_seed)
    out["chosen_signal"] = chosen
    return out


def track_record(study_dir, *, signals=SIGNAL_NAMES, examples: int = 256, seed: int = 3407, max_length: int = 512,
                 chosen: str = "probe") -> dict:
    study_dir = Path(study_dir)
    overall, per_seed = measured_accuracy(study_dir)
    groups = study_groups(study_dir)
    rows = []
    for (model, domain), group in groups.items():
        accuracy = overall.get((model, domain))
        if not accuracy or len(accuracy) < 2:
            continue
        predicted = advisor_scores(study_dir, group, signals=signals, examples=examples, seed=seed,
                                   max_length=max_length)
        proposals = [n for n, spec in group["specs"].items() if spec["placement"].get("advisor")]
        row = compare_group(predicted["scores"], accuracy, per_seed.get((model, domain), {}),
                            predicted["attention_only"], chosen, proposals)
        row.update(model=model, train_domain=domain, grid_cells=group["cells"],
                   grid_wall_s=round(group["grid_wall_s"], 2), examples=predicted["examples"],
                   unscored_hosts=predicted["unscored"], trainable_params=predicted["trainable_params"],
                   cost={s: {"wall_s": round(t, 2), "fraction_of_grid": round(t / group["grid_wall_s"], 4)
                             if group["grid_wall_s"] else None} for s, t in predicted["cost_s"].items()})
        rows.append(row)
    return {"study": str(study_dir), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "device": _device_name(), "settings": {"examples": examples, "seed": seed, "max_length": max_length,
                                                   "signals": list(signals), "chosen_signal": chosen},
            "groups": rows, "summary": summarize(rows, chosen)}


def _device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def summarize(rows: list[dict], chosen: str) -> dict:
    """Over groups, per signal: mean Spearman, how often its selection was the best, mean regret; the
    attention-only baseline's; and the honest verdict for the chosen signal."""
    per_signal = {}
    for signal in sorted({s for r in rows for s in r["signals"]}):
        picks = [r["signals"][signal]["select"] for r in rows if r["signals"].get(signal, {}).get("select")]
        per_signal[signal] = {
            "mean_spearman": _mean(r["signals"][signal]["spearman"] for r in rows if signal in r["signals"]),
            "groups": len(picks), "picked_best": sum(1 for p in picks if p["rank"] == 1),
            "mean_regret_pp": _mean(p["regret_pp"] for p in picks),
            "mean_cost_fraction": _mean(r["cost"].get(signal, {}).get("fraction_of_grid") for r in rows),
        }
    base = [r["attention_only"] for r in rows if r["attention_only"]]
    baseline = {"groups": len(base), "picked_best": sum(1 for p in base if p["rank"] == 1),
                "mean_regret_pp": _mean(p["regret_pp"] for p in base)}
    proposals = [p for r in rows for p in r["proposals"]]
    proposal = {"groups": len(proposals), "picked_best": sum(1 for p in proposals if p["rank"] == 1),
                "mean_regret_pp": _mean(p["regret_pp"] for p in proposals)} if proposals else None
    return {"signals": per_signal, "attention_only": baseline, "proposal": proposal,
            "paired_vs_attention_only": _paired_difference(rows, chosen),
            "verdict": _verdict(per_signal.get(chosen), baseline, chosen, _paired_difference(rows, chosen))}


def _paired_difference(rows: list[dict], chosen: str) -> dict:
    """Advisor regret minus attention-only regret over every (group, seed) where both exist, with a Student-t
    interval: the evidence behind "better than attention only" (an interval holding 0 establishes nothing)."""
    from ..analysis.stats import seed_summary

    diffs = []
    for r in rows:
        mine, base = r["signals"].get(chosen, {}).get("select"), r["attention_only"]
        if mine and base:
            diffs += [mine["per_seed_pp"][s] - base["per_seed_pp"][s] for s in mine["per_seed_pp"]
                      if s in base["per_seed_pp"]]
    if not diffs:
        return {"n": 0, "mean_pp": None, "ci_low": None, "ci_high": None}
    mean, low, high = seed_summary(diffs)
    return {"n": len(diffs), "mean_pp": round(mean, 3), "ci_low": _finite(low), "ci_high": _finite(high)}


def _verdict(mine: dict | None, baseline: dict, chosen: str, paired: dict) -> str:
    if not mine or mine["mean_regret_pp"] is None:
        return f"no verdict: the {chosen} signal scored no group"
    if baseline["mean_regret_pp"] is None:
        return (f"{chosen}: mean regret {mine['mean_regret_pp']:.2f} pp over {mine['groups']} group(s); the grid has "
                "no attention-only placement to compare with")
    holds_zero = paired["ci_low"] is None or paired["ci_low"] <= 0 <= paired["ci_high"]
    better = mine["mean_regret_pp"] < baseline["mean_regret_pp"] and not holds_zero
    word = "better than" if better else "NOT shown better than"
    interval = ("no interval" if paired["ci_low"] is None
                else f"[{paired['ci_low']:+.2f}, {paired['ci_high']:+.2f}]")
    return (f"the advisor ({chosen} signal) is {word} always choosing attention only: mean regret "
            f"{mine['mean_regret_pp']:.2f} pp vs {baseline['mean_regret_pp']:.2f} pp, best pick in "
            f"{mine['picked_best']}/{mine['groups']} vs {baseline['picked_best']}/{baseline['groups']} group(s); "
            f"paired regret difference {_fmt(paired['mean_pp'], '+.2f')} pp {interval} over {paired['n']} "
            "group×seed pair(s)" + (" (the interval holds 0)" if paired["ci_low"] is not None and holds_zero else ""))


# --- output --------------------------------------------------------------------------------------------
def _fmt(v, spec=".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ci(p: dict | None) -> str:
    if not p:
        return "n/a"
    if p["ci_low"] is None:
        return f"{_fmt(p['regret_pp'])} pp ({p['seeds']} seed: no interval)"
    return f"{_fmt(p['regret_pp'])} pp [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}] ({p['seeds']} seeds)"


def track_record_text(record: dict) -> str:
    lines = [f"advisor track record on {record['study']} ({record['date']}, {record['device']}; "
             f"{record['settings']['examples']} examples, seed {record['settings']['seed']})"]
    for r in record["groups"]:
        lines.append(f"\n{r['model']} · {r['train_domain']}: measured " + ", ".join(
            f"{n} {100 * a:.1f}%" for n, a in r["placements"].items()) + f"  (grid: {r['grid_cells']} cells, "
            f"{r['grid_wall_s']:.0f} s)")
        for signal, s in r["signals"].items():
            sel = s["select"]
            cost = r["cost"].get(signal, {})
            lines.append(f"  {signal:<10} spearman {_fmt(s['spearman'], '+.2f')} (n={s['n_placements']}); picks "
                         f"{sel['placement']} (rank {sel['rank']}/{sel['of']}), regret {_ci(sel)}; cost "
                         f"{_fmt(cost.get('wall_s'), '.1f')} s = {_fmt(100 * cost['fraction_of_grid'] if cost.get('fraction_of_grid') is not None else None, '.1f')}% of the grid")
        for p in r["proposals"]:
            lines.append(f"  proposal   the study's {p['placement']} cells: rank {p['rank']}/{p['of']}, regret {_ci(p)}")
        a = r["attention_only"]
        lines.append(f"  baseline   attention only = {a['placement']}: rank {a['rank']}/{a['of']}, regret {_ci(a)}"
                     if a else "  baseline   no attention-only placement in this grid")
    s = record["summary"]
    lines.append("\nsummary")
    for signal, v in s["signals"].items():
        lines.append(f"  {signal:<10} mean spearman {_fmt(v['mean_spearman'], '+.2f')}, best pick {v['picked_best']}/"
                     f"{v['groups']}, mean regret {_fmt(v['mean_regret_pp'])} pp, cost "
                     f"{_fmt(100 * v['mean_cost_fraction'] if v['mean_cost_fraction'] is not None else None, '.1f')}% of the grid")
    b = s["attention_only"]
    lines.append(f"  attention only: best pick {b['picked_best']}/{b['groups']}, mean regret {_fmt(b['mean_regret_pp'])} pp")
    if s["proposal"]:
        p = s["proposal"]
        lines.append(f"  proposal (study's advisor cells): best {p['picked_best']}/{p['groups']}, mean regret "
                     f"{_fmt(p['mean_regret_pp'])} pp")
    lines.append(f"  verdict: {s['verdict']}")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_track_record(record: dict, study_dir) -> dict[str, str]:
    """``<study>/advisor/track_record.json`` and ``.md`` (the advisor's own folder: a report rebuild replaces
    ``<study>/report/`` as a whole)."""
    out = Path(study_dir) / "advisor"
    paths = {"json": out / "track_record.json", "markdown": out / "track_record.md"}
    _write_atomic(paths["json"], json.dumps(record, indent=2))
    _write_atomic(paths["markdown"], "# Advisor track record\n\n```\n" + track_record_text(record) + "\n```\n")
    return {k: str(v) for k, v in paths.items()}
