"""Statistics of an ablation directory, on top of ``analysis.stats``.

* accuracy: Wilson 95 % interval (``analysis.stats.wilson_interval``); drop vs intact: paired bootstrap over the
  items both scored (``analysis.stats.paired_bootstrap``, ablated − intact, so a loss is negative);
* perplexity: Δ log-ppl = (Σ nll_ablated − Σ nll_intact) / Σ tokens, with a paired bootstrap over the windows
  (the same windows in every condition);
* random controls: a targeted condition against the distribution of its matched-count controls, one-sided
  p = (1 + #{controls at least as harmful}) / (K + 1), Holm-corrected across targets (``analysis.stats.holm``);
* diagnostics vs drops: Spearman correlation over single-unit conditions;
* ``--study``: Spearman correlation between a component type's importance (its group condition's Δ log-ppl) and
  the accuracy gain of the study's placement that adapts that component type alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.stats import holm, paired_bootstrap, wilson_interval
from ..study.store import Store


@dataclass
class AblationResults:
    meta: dict[str, Any]
    conditions: list[dict]
    metrics: dict[str, dict[str, dict]]  # job id -> benchmark -> summary
    items: dict[str, dict[str, dict[str, int | None]]]  # job id -> benchmark -> example id -> correct
    windows: dict[str, dict[str, tuple[float, int]]]  # job id -> window id -> (nll_sum, tokens)
    notes: list[str] = field(default_factory=list)

    @property
    def intact(self) -> dict | None:
        return next((c for c in self.conditions if c["method"] == "none"), None)

    def benchmarks(self) -> list[str]:
        names: list[str] = []
        for m in self.metrics.values():
            names += [b for b, s in m.items() if b not in ("perplexity", "diagnostics") and
                      isinstance(s.get("accuracy"), (int, float)) and b not in names]
        return names


def load_results(ablation_dir: str | Path) -> AblationResults:
    store = Store(ablation_dir, create=False)
    try:
        config = store.get("config") or {}
        if config.get("tool") != "ablate":
            raise ValueError(f"{ablation_dir}: not an ablation directory (made by `hybridlora ablate`)")
        done = {j["id"] for j in store.jobs() if j["status"] == "complete"}
        conditions = [c for c in config["conditions"] if c["job"] in done]
        metrics, items, windows = {}, {}, {}
        for job in {c["job"] for c in conditions}:
            metrics[job] = store.metrics(job)
            items[job], windows[job] = {}, {}
            rows = store.db.execute("SELECT benchmark, example_id, correct, prediction FROM instances WHERE job_id = ?",
                                    (job,))
            for bench, eid, correct, prediction in rows:
                if bench == "perplexity":
                    p = json.loads(prediction)
                    windows[job][eid] = (p["nll_sum"], p["tokens"])
                else:
                    items[job].setdefault(bench, {})[eid] = correct
    finally:
        store.close()
    return AblationResults(config, conditions, metrics, items, windows)


def ppl_delta(res: AblationResults, job: str, *, resamples: int, seed: int) -> dict[str, float]:
    base = res.intact
    a, b = res.windows.get(job, {}), res.windows.get(base["job"], {}) if base else {}
    ids = sorted(set(a) & set(b))
    if not ids:
        return {}
    diff = np.array([a[i][0] - b[i][0] for i in ids])
    tokens = np.array([a[i][1] for i in ids], dtype=float)
    delta = float(diff.sum() / tokens.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(resamples, len(ids)))
    reps = diff[idx].sum(1) / tokens[idx].sum(1)
    low, high = np.quantile(reps, [0.025, 0.975])
    return {"dlogppl": delta, "dlogppl_low": float(low), "dlogppl_high": float(high), "windows": len(ids)}


def condition_rows(res: AblationResults, *, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """One row per condition: perplexity and its change, per benchmark accuracy (Wilson) and drop (bootstrap)."""
    base = res.intact
    rows = []
    for c in res.conditions:
        m = res.metrics[c["job"]]
        row: dict[str, Any] = {"name": c["name"], "method": c["method"], "plan": c["plan"], "n_units": len(c["units"]),
                               "units": " ".join(c["units"]), "job": c["job"], "detail": c["detail"]}
        if "perplexity" in m:
            row["ppl"] = m["perplexity"]["ppl"]
            row["ppl_tokens"] = m["perplexity"]["tokens"]
            if base is not None:
                row.update(ppl_delta(res, c["job"], resamples=resamples, seed=seed))
        drops = []
        for bench in res.benchmarks():
            s = m.get(bench)
            if not s or not isinstance(s.get("accuracy"), (int, float)):
                continue
            low, high = wilson_interval(int(s["correct"]), int(s["n"]))
            row.update({f"{bench}_acc": s["accuracy"], f"{bench}_n": s["n"], f"{bench}_low": low,
                        f"{bench}_high": high})
            if base is not None and c is not base and bench in res.items.get(base["job"], {}):
                try:
                    boot = paired_bootstrap(res.items[c["job"]][bench], res.items[base["job"]][bench],
                                            resamples=resamples, seed=seed)
                except ValueError:
                    continue
                row.update({f"{bench}_drop": boot.mean_diff, f"{bench}_drop_low": boot.ci_low,
                            f"{bench}_drop_high": boot.ci_high})
                drops.append(boot.mean_diff)
        if drops:
            row["mean_acc_drop"] = float(np.mean(drops))
        diag = m.get("diagnostics")
        if diag:
            row["final_kl"] = diag.get("final_kl")
            row["mean_cka"] = diag.get("mean_cka")
        rows.append(row)
    return rows


def control_tests(rows: list[dict]) -> list[dict]:
    """Each targeted condition with controls against them (Δ log-ppl: larger = worse; accuracy drop: more
    negative = worse)."""
    by_target: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["plan"] == "random":
            key = (r["detail"]["control_of"], r["detail"]["control_method"])
            by_target.setdefault(key, []).append(r)
    out = []
    for r in rows:
        controls = by_target.get((r["name"], r["method"]))
        if not controls or r["plan"] == "random":
            continue
        test = {"name": r["name"], "method": r["method"], "n_units": r["n_units"], "trials": len(controls)}
        for metric, worse in (("dlogppl", 1.0), ("mean_acc_drop", -1.0)):
            values = [c[metric] for c in controls if c.get(metric) is not None]
            if r.get(metric) is None or not values:
                continue
            harmful = sum(worse * v >= worse * r[metric] for v in values)
            test.update({metric: r[metric], f"{metric}_controls_mean": float(np.mean(values)),
                         f"{metric}_controls_min": float(np.min(values)), f"{metric}_controls_max": float(np.max(values)),
                         f"{metric}_p": (1 + harmful) / (1 + len(values))})
        out.append(test)
    for metric in ("dlogppl", "mean_acc_drop"):
        having = [t for t in out if f"{metric}_p" in t]
        for t, adj in zip(having, holm([t[f"{metric}_p"] for t in having])):
            t[f"{metric}_p_holm"] = adj
    return out


def spearman(x: list[float], y: list[float]) -> dict[str, float] | None:
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and not (
        isinstance(a, float) and math.isnan(a)) and not (isinstance(b, float) and math.isnan(b))]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    rho, p = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
    return {"rho": float(rho), "p": float(p), "n": len(pairs)}


def diagnostic_correlations(rows: list[dict]) -> list[dict]:
    singles = [r for r in rows if r["plan"] == "layer"]
    out = []
    for diag in ("final_kl", "mean_cka"):
        for drop in ("dlogppl", "mean_acc_drop"):
            result = spearman([r.get(diag) for r in singles], [r.get(drop) for r in singles])
            out.append({"diagnostic": diag, "drop": drop, **(result or {"rho": None, "p": None, "n": len(singles)})})
    return out


def study_link(rows: list[dict], study_dir: str | Path) -> dict[str, Any]:
    """Component importance (group Δ log-ppl, default method) vs the study's gain from adapting it alone."""
    store = Store(study_dir, create=False)
    try:
        jobs = [j for j in store.jobs() if j["status"] == "complete"]
        acc = {j["id"]: {b: s.get("accuracy") for b, s in store.metrics(j["id"]).items()} for j in jobs}
    finally:
        store.close()
    base = [j for j in jobs if j["kind"] == "base"]
    if not base:
        return {"note": "the study has no complete base evaluation"}
    base_acc = acc[base[0]["id"]]
    gains: dict[str, list[float]] = {}
    for j in jobs:
        if j["kind"] != "train":
            continue
        spec = json.loads(j["spec"])
        targets = spec["placement"]["placement"].get("targets", [])
        components = {c for t in targets for c in (t.get("components") or [])}
        if len(components) != 1:
            continue
        diffs = [a - base_acc[b] for b, a in acc[j["id"]].items()
                 if isinstance(a, (int, float)) and isinstance(base_acc.get(b), (int, float))]
        if diffs:
            gains.setdefault(next(iter(components)), []).append(float(np.mean(diffs)))
    importance = {r["detail"].get("component"): r.get("dlogppl") for r in rows
                  if r["plan"] == "group" and r["method"] in ("skip", "zero") and r.get("dlogppl") is not None}
    shared = sorted(set(importance) & set(gains))
    table = [{"component": c, "importance_dlogppl": importance[c], "adaptation_gain": float(np.mean(gains[c]))}
             for c in shared]
    result = spearman([t["importance_dlogppl"] for t in table], [t["adaptation_gain"] for t in table])
    return {"components": table, "spearman": result,
            "note": None if result else f"{len(table)} component type(s) in both: a rank correlation needs 3 or more"}
