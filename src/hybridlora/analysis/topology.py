"""The topology effect: does the placement effect depend on the hybrid's topology?

For a *sequential* model S (one mixer per layer) and a *parallel* model P (attention beside a
recurrent mixer in every layer), the placement x topology interaction of one measure M is::

    I = [M(P, recurrent-only) - M(P, attention-only)] - [M(S, recurrent-only) - M(S, attention-only)]

in percentage points. I > 0: moving LoRA from attention to the recurrent mixer helps the parallel
model more (or hurts it less) than the sequential one. Two measures, per training domain:

* **target** — accuracy on one of the domain's own benchmarks (one contrast per target benchmark);
* **forgetting** — the report's forgetting (:mod:`.metrics`): mean over the scored non-target
  benchmarks of ``max(0, base - tuned)``; I > 0 means recurrent-only forgets *more*, relative to
  attention-only, in the parallel model.

Intervals
---------
* **over items** — a joint percentile bootstrap: every replicate draws the benchmark's example ids
  with replacement once and applies the same draw to all cells of the contrast (both models, both
  placements, every seed, and for forgetting the base cells), so every difference stays paired
  within each model and across models. Only ids scored in every one of those cells take part
  (``n_items``); forgetting draws each non-target benchmark separately. With several seeds the
  bootstrapped quantity is the mean over seeds of the per-seed interaction.
* **over seeds** — with 2+ seeds shared by the four runs: mean and Student-t interval of the per-seed
  interactions, and a one-sample t-test against 0.

Multiplicity: Holm over every contrast computed in one call (the contrasts shown), separately for
the item-level bootstrap p-values and the seed-level t-test p-values. The *corrected interval* of a
contrast is the percentile interval at the level Holm tests it at: ``1 - alpha / (m - r + 1)`` for
the contrast of rank ``r`` (ascending raw p) among ``m``. The verdict is ``"supports topology
matters"`` only when the Holm-adjusted p is below ``alpha`` *and* the corrected interval excludes 0
— for the items and, where there are 2+ seeds, for the seeds too; otherwise ``"not significant"``.

Which models are paired: :func:`topology_pairs` pairs, per mixer, the one sequential and the one
parallel model tagged with it. When no mixer has both but the study holds exactly one sequential and
one parallel model, they are paired anyway *with a caveat* that they differ in mixer (the published
study's Qwen3.5 / Falcon-H1 contrast). Tags are ``{model: {"topology": ..., "mixer": ...}}``
(:attr:`StudyResults.model_tags`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as _sps

from .contract import BASE
from .metrics import PP, StudyIndex, _comparison_seed, index_study
from .results import StudyResults
from .sections import ReportSection
from .stats import holm, seed_summary

__all__ = [
    "SEQUENTIAL",
    "PARALLEL",
    "SUPPORTS",
    "NOT_SIGNIFICANT",
    "ATTENTION_ONLY_NAMES",
    "RECURRENT_ONLY_NAMES",
    "TopologyPair",
    "topology_pairs",
    "placement_roles",
    "topology_contrasts",
    "has_both_topologies",
    "TOPOLOGY_COLUMNS",
    "caveats",
    "topology_section",
]

SEQUENTIAL = "sequential"
PARALLEL = "parallel"
SUPPORTS = "supports topology matters"
NOT_SIGNIFICANT = "not significant"

ATTENTION_ONLY_NAMES = ("attention_only", "softmax_only")
"""Placement names (with or without a ``study/`` prefix) that adapt softmax attention only."""

RECURRENT_ONLY_NAMES = ("recurrent_only", "gdn_only", "ssm_only")
"""Placement names (with or without a ``study/`` prefix) that adapt the recurrent mixer only."""

TOPOLOGY_COLUMNS: List[Tuple[str, str]] = [
    ("pair", "text"), ("train_domain", "text"), ("measure", "text"), ("benchmark", "text"),
    ("n_items", "int"), ("k_seeds", "int"), ("parallel_effect_pp", "pp"), ("sequential_effect_pp", "pp"),
    ("interaction_pp", "pp"), ("ci_low", "pp"), ("ci_high", "pp"), ("corrected_level", "acc"),
    ("corrected_ci_low", "pp"), ("corrected_ci_high", "pp"), ("p_boot", "p"), ("p_holm", "p"),
    ("seed_ci_low", "pp"), ("seed_ci_high", "pp"), ("seed_p_holm", "p"), ("verdict", "text"),
]
"""Columns of the topology table (keys of every row of :func:`topology_contrasts`), with display kinds."""


# --------------------------------------------------------------------------- which models, which placements


@dataclass(frozen=True)
class TopologyPair:
    """One sequential and one parallel model to contrast; ``label`` names the pair in tables,
    ``caveat`` is a sentence when the two differ in more than topology (else empty)."""

    sequential: str
    parallel: str
    label: str
    caveat: str = ""


def _tag(tags: Mapping[str, Mapping[str, str]], model: str, key: str) -> str:
    return str(tags.get(model, {}).get(key, ""))


def has_both_topologies(tags: Mapping[str, Mapping[str, str]]) -> bool:
    """True when some tagged model is sequential and another parallel."""
    kinds = {_tag(tags, m, "topology") for m in tags}
    return SEQUENTIAL in kinds and PARALLEL in kinds


def topology_pairs(tags: Mapping[str, Mapping[str, str]], models: Sequence[str]) -> List[TopologyPair]:
    """Pairs of (sequential, parallel) models among ``models`` (see the module docstring).

    ``tags``: ``{model: {"topology": "sequential"|"parallel"|..., "mixer": str}}``; untagged models
    and other topologies (an all-attention control) take no part. A mixer with more than one model
    of one topology is ambiguous and raises ``ValueError``.
    """
    by_mixer: Dict[str, Dict[str, List[str]]] = {}
    for model in models:
        topology = _tag(tags, model, "topology")
        if topology in (SEQUENTIAL, PARALLEL):
            by_mixer.setdefault(_tag(tags, model, "mixer"), {}).setdefault(topology, []).append(model)
    pairs = []
    for mixer, groups in by_mixer.items():
        for topology, names in groups.items():
            if len(names) > 1:
                raise ValueError(f"mixer {mixer!r} has {len(names)} {topology} models ({', '.join(names)}); "
                                 "tag them with distinct mixers to pair them")
        if SEQUENTIAL in groups and PARALLEL in groups:
            pairs.append(TopologyPair(groups[SEQUENTIAL][0], groups[PARALLEL][0], mixer or "(no mixer tag)"))
    if pairs:
        return pairs
    seq = [m for g in by_mixer.values() for m in g.get(SEQUENTIAL, [])]
    par = [m for g in by_mixer.values() for m in g.get(PARALLEL, [])]
    if len(seq) == 1 and len(par) == 1:
        mix_s, mix_p = _tag(tags, seq[0], "mixer") or "?", _tag(tags, par[0], "mixer") or "?"
        caveat = (f"{seq[0]} (sequential, {mix_s}) and {par[0]} (parallel, {mix_p}) differ in mixer as well as "
                  "topology (and, unless made as matched lab models, in size, data and recipe): the interaction "
                  "measures all of these differences together, not topology alone.")
        return [TopologyPair(seq[0], par[0], f"{mix_s} seq vs {mix_p} par", caveat)]
    return []


def _base_name(placement: str) -> str:
    return placement.split("/", 1)[1] if placement.startswith("study/") else placement


def placement_roles(placements: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
    """``(recurrent_only, attention_only)`` placement names among ``placements`` (``None`` when absent).

    Recognised by name (:data:`RECURRENT_ONLY_NAMES`, :data:`ATTENTION_ONLY_NAMES`, optional
    ``study/`` prefix). Two matches for one role raise ``ValueError`` (no silent pick).
    """
    def pick(names: Sequence[str], role: str) -> Optional[str]:
        hits = [p for p in placements if _base_name(p) in names]
        if len(hits) > 1:
            raise ValueError(f"several {role} placements ({', '.join(hits)}); keep one per model")
        return hits[0] if hits else None

    return pick(RECURRENT_ONLY_NAMES, "recurrent-only"), pick(ATTENTION_ONLY_NAMES, "attention-only")


# --------------------------------------------------------------------------- one contrast's data


@dataclass(frozen=True)
class _Runs:
    """The four runs of a contrast: ``{(topology, role): (model, placement)}``, role in rec/att."""

    runs: Dict[Tuple[str, str], Tuple[str, str]]
    seeds: List[Optional[int]]


_ORDER = [(PARALLEL, "rec"), (PARALLEL, "att"), (SEQUENTIAL, "rec"), (SEQUENTIAL, "att")]
_SIGNS = np.array([1.0, -1.0, -1.0, 1.0])
"""Interaction weights of the four runs in :data:`_ORDER`: (P_rec - P_att) - (S_rec - S_att)."""


def _bench_matrix(index: StudyIndex, cells: Sequence[Tuple[str, str, str, Optional[int]]], bench: str
                  ) -> Optional[np.ndarray]:
    """Boolean ``(len(cells), n_items)`` over the ids scored in every cell; ``None`` if a cell is
    missing or nothing is shared. ``cells`` are ``(model, placement, domain, seed)``; a base cell
    is ``(model, BASE, BASE, None)`` and resolved like the report does."""
    maps = []
    for model, placement, domain, seed in cells:
        cell = index.base_cell(model, bench) if placement == BASE else index.cell(model, placement, domain, seed,
                                                                                 bench)
        if cell is None:
            return None
        maps.append(cell)
    shared = set.intersection(*({k for k, v in m.items() if v is not None} for m in maps))
    if not shared:
        return None
    ids = sorted(shared)
    return np.array([[bool(m[i]) for i in ids] for m in maps], dtype=bool)


def _weights(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """Bootstrap draw counts, shape ``(resamples, n)``: each row a with-replacement draw of n items."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _target_estimates(matrix: np.ndarray, k: int, weights: Optional[np.ndarray]) -> np.ndarray:
    """Interaction in pp from a ``(4 * k, n)`` matrix (runs in :data:`_ORDER`, seed-major).

    ``weights`` ``None``: the point estimates, shape ``(k,)`` per seed. Else ``(R, n)`` draw counts:
    the seed-mean interaction per replicate, shape ``(R,)``.
    """
    n = matrix.shape[1]
    x = matrix.astype(np.float64)
    acc = x.mean(axis=1) if weights is None else (weights @ x.T) / n          # (4k,) or (R, 4k)
    acc = acc.reshape(acc.shape[:-1] + (k, 4))
    inter = PP * (acc * _SIGNS).sum(axis=-1)                                 # (k,) or (R, k)
    return inter if weights is None else inter.mean(axis=-1)


def _forgetting_terms(matrix: np.ndarray, k: int, weights: Optional[np.ndarray]) -> np.ndarray:
    """Per-run forgetting on one benchmark, pp: ``max(0, base - tuned)``.

    ``matrix``: ``(2 + 4 * k, n)`` — the parallel and sequential base cells, then the runs in
    :data:`_ORDER`, seed-major. Output ``(k, 4)`` (point) or ``(R, k, 4)`` (with draw counts).
    """
    n = matrix.shape[1]
    x = matrix.astype(np.float64)
    acc = x.mean(axis=1) if weights is None else (weights @ x.T) / n
    base = acc[..., :2]
    tuned = acc[..., 2:].reshape(acc.shape[:-1] + (k, 4))
    base_per_run = np.stack([base[..., 0], base[..., 0], base[..., 1], base[..., 1]], axis=-1)[..., None, :]
    return PP * np.maximum(0.0, base_per_run - tuned)


# --------------------------------------------------------------------------- the contrasts


def _shared_seeds(index: StudyIndex, runs: Mapping[Tuple[str, str], Tuple[str, str]], domain: str
                  ) -> List[Optional[int]]:
    groups = [index.seeds.get((m, p, domain), []) for m, p in runs.values()]
    return [s for s in groups[0] if all(s in g for g in groups[1:])]


def _boot_p(reps: np.ndarray) -> float:
    """Two-sided percentile-bootstrap p of "interaction = 0" (add-one smoothing, never 0)."""
    r = reps.size
    below = (np.count_nonzero(reps <= 0) + 1) / (r + 1)
    above = (np.count_nonzero(reps >= 0) + 1) / (r + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def _row(pair: TopologyPair, domain: str, measure: str, bench: str, n_items: int, per_seed: np.ndarray,
         effects: Tuple[float, float], reps: np.ndarray) -> dict:
    low, high = np.quantile(reps, [0.025, 0.975])
    row = {"pair": pair.label, "sequential_model": pair.sequential, "parallel_model": pair.parallel,
           "train_domain": domain, "measure": measure, "benchmark": bench, "n_items": n_items,
           "k_seeds": int(per_seed.size), "parallel_effect_pp": effects[0], "sequential_effect_pp": effects[1],
           "interaction_pp": float(per_seed.mean()), "ci_low": float(low), "ci_high": float(high),
           "p_boot": _boot_p(reps), "seed_ci_low": None, "seed_ci_high": None, "seed_p": None,
           "caveat": pair.caveat, "_reps": reps, "_per_seed": per_seed}
    if per_seed.size > 1:
        _, s_low, s_high = seed_summary(per_seed.tolist())
        row.update(seed_ci_low=s_low, seed_ci_high=s_high)
        if float(np.std(per_seed)) > 0:
            row["seed_p"] = float(_sps.ttest_1samp(per_seed, 0.0).pvalue)
    return row


def _target_rows(index, pair, runs, domain, targets, seeds, seed, resamples) -> List[dict]:
    rows = []
    cells = [(m, p, domain, s) for s in seeds for m, p in (runs[key] for key in _ORDER)]
    for bench in targets:
        matrix = _bench_matrix(index, cells, bench)
        if matrix is None:
            continue
        k = len(seeds)
        per_seed = _target_estimates(matrix, k, None)
        acc = matrix.astype(np.float64).mean(axis=1).reshape(k, 4).mean(axis=0) * PP
        effects = (float(acc[0] - acc[1]), float(acc[2] - acc[3]))
        rng = _contrast_rng(seed, pair, domain, "target", bench)
        reps = _target_estimates(matrix, k, _weights(rng, matrix.shape[1], resamples))
        rows.append(_row(pair, domain, "target", bench, matrix.shape[1], per_seed, effects, reps))
    return rows


def _contrast_rng(seed: int, pair: TopologyPair, domain: str, measure: str, bench: str) -> np.random.Generator:
    """A bootstrap stream per contrast, from the report seed and the contrast's identity, so a result
    does not depend on which other contrasts exist (as the report's paired tests)."""
    key = ("topology", pair.sequential, pair.parallel, domain, measure, bench)
    return np.random.default_rng(_comparison_seed(seed, key))


def _forgetting_row(index, pair, runs, domain, others, seeds, seed, resamples) -> Optional[dict]:
    bases = [(pair.parallel, BASE, BASE, None), (pair.sequential, BASE, BASE, None)]
    cells = bases + [(m, p, domain, s) for s in seeds for m, p in (runs[key] for key in _ORDER)]
    k = len(seeds)
    rng = _contrast_rng(seed, pair, domain, "forgetting", "")
    points, replicates, used, n_items = [], [], [], []
    for bench in others:
        matrix = _bench_matrix(index, cells, bench)
        if matrix is None:
            continue  # not evaluated (or not scored) in every cell: left out, as the report's forgetting does
        used.append(bench)
        n_items.append(matrix.shape[1])
        points.append(_forgetting_terms(matrix, k, None))
        replicates.append(_forgetting_terms(matrix, k, _weights(rng, matrix.shape[1], resamples)))
    if not used:
        return None
    point = np.mean(points, axis=0)                                          # (k, 4) forgetting per run
    per_seed = (point * _SIGNS).sum(axis=-1)
    reps = (np.mean(replicates, axis=0) * _SIGNS).sum(axis=-1).mean(axis=-1)  # (R,)
    runs_mean = point.mean(axis=0)
    effects = (float(runs_mean[0] - runs_mean[1]), float(runs_mean[2] - runs_mean[3]))
    return _row(pair, domain, "forgetting", ", ".join(used), min(n_items), per_seed, effects, reps)


def _holm_levels(rows: List[dict], p_key: str, alpha: float) -> Dict[int, float]:
    """``{row position: interval level}`` Holm tests each row with a p-value at."""
    with_p = [i for i, r in enumerate(rows) if r[p_key] is not None]
    order = sorted(with_p, key=lambda i: rows[i][p_key])
    m = len(order)
    return {i: 1.0 - alpha / (m - rank) for rank, i in enumerate(order)}


def _apply_holm(rows: List[dict], alpha: float) -> None:
    """Holm-adjusted p, corrected intervals and verdicts, in place."""
    for p_key, out_key in (("p_boot", "p_holm"), ("seed_p", "seed_p_holm")):
        with_p = [r for r in rows if r[p_key] is not None]
        for r in rows:
            r[out_key] = None
        for r, adj in zip(with_p, holm([r[p_key] for r in with_p])):
            r[out_key] = adj
    levels = _holm_levels(rows, "p_boot", alpha)
    seed_levels = _holm_levels(rows, "seed_p", alpha)
    for i, r in enumerate(rows):
        level = levels[i]
        tail = (1.0 - level) / 2.0
        low, high = np.quantile(r["_reps"], [tail, 1.0 - tail])
        r.update(corrected_level=level, corrected_ci_low=float(low), corrected_ci_high=float(high))
        items_ok = r["p_holm"] < alpha and (low > 0 or high < 0)
        seeds_ok = True
        if r["k_seeds"] > 1:
            seeds_ok = r["seed_p_holm"] is not None and r["seed_p_holm"] < alpha and i in seed_levels and \
                _seed_interval_excludes_zero(r["_per_seed"], seed_levels[i])
        r["verdict"] = SUPPORTS if items_ok and seeds_ok else NOT_SIGNIFICANT
        r["sentence"] = _sentence(r, items_ok, seeds_ok)
        del r["_reps"], r["_per_seed"]


def _seed_interval_excludes_zero(per_seed: np.ndarray, level: float) -> bool:
    _, low, high = seed_summary(per_seed.tolist(), level=level)
    return bool(low > 0 or high < 0)


def _sentence(r: dict, items_ok: bool, seeds_ok: bool) -> str:
    """One plain-language line; a "not significant" says at which level the evidence falls short (items, or the
    seeds when the items alone would carry it: a study's items can be clear while its seeds disagree)."""
    what = "accuracy on " + r["benchmark"] if r["measure"] == "target" else "forgetting"
    lead = (f"After {r['train_domain']} training, recurrent-only minus attention-only {what} is "
            f"{r['parallel_effect_pp']:+.2f} pp in the parallel model and {r['sequential_effect_pp']:+.2f} pp in "
            f"the sequential one (interaction {r['interaction_pp']:+.2f} pp, corrected interval "
            f"[{r['corrected_ci_low']:+.2f}, {r['corrected_ci_high']:+.2f}]).")
    if items_ok and seeds_ok:
        return lead + " The data support that topology changes this placement effect."
    if items_ok:
        seed_p = "n/a" if r["seed_p_holm"] is None else f"{r['seed_p_holm']:.2g}"
        return (lead + f" Clear over the {r['n_items']} items (Holm p {r['p_holm']:.2g}) but not over the "
                f"{r['k_seeds']} seeds (Holm p {seed_p}): not significant, these data do not show that topology "
                "changes it beyond what varies from seed to seed.")
    return lead + f" Not significant over the items (Holm p {r['p_holm']:.2g}): these data do not show that " \
                  "topology changes it."


def topology_contrasts(results: StudyResults, *, tags: Optional[Mapping[str, Mapping[str, str]]] = None,
                       pairs: Optional[Sequence[TopologyPair]] = None, resamples: int = 10_000, seed: int = 0,
                       alpha: float = 0.05, index: Optional[StudyIndex] = None) -> List[dict]:
    """Every placement x topology interaction of ``results``, Holm-corrected together.

    Inputs: the :class:`StudyResults`; ``tags`` (default ``results.model_tags``) and ``pairs``
    (default :func:`topology_pairs`); ``resamples`` and ``seed`` of the item bootstrap (each
    contrast draws from its own stream, seeded by ``seed`` and the contrast's identity); ``alpha``
    the family-wise level. Output: one row per (pair, train domain, measure[, target benchmark])
    with the keys of :data:`TOPOLOGY_COLUMNS` plus ``sequential_model``, ``parallel_model``,
    ``seed_p`` (raw t-test p), ``caveat`` and ``sentence`` (the plain-language verdict);
    differences in pp; ``seed_*`` are ``None`` with fewer than 2 seeds; forgetting's ``n_items``
    is the smallest over its benchmarks. Contrasts whose four runs (with a shared seed) or shared
    items do not exist are left out.
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    index = index or index_study(results)
    tags = results.model_tags if tags is None else tags
    pairs = topology_pairs(tags, index.models) if pairs is None else pairs
    rows: List[dict] = []
    for pair in pairs:
        roles = {PARALLEL: placement_roles(index.placements.get(pair.parallel, [])),
                 SEQUENTIAL: placement_roles(index.placements.get(pair.sequential, []))}
        if any(None in r for r in roles.values()):
            continue
        models = {PARALLEL: pair.parallel, SEQUENTIAL: pair.sequential}
        runs = {(topo, role): (models[topo], roles[topo][0 if role == "rec" else 1]) for topo, role in _ORDER}
        for domain in index.domains:
            seeds = _shared_seeds(index, runs, domain)
            if not seeds:
                continue
            targets = [b for b in index.benchmarks if b in results.target_benchmarks.get(domain, [])]
            others = [b for b in index.benchmarks if b not in targets]
            rows += _target_rows(index, pair, runs, domain, targets, seeds, seed, resamples)
            forgetting = _forgetting_row(index, pair, runs, domain, others, seeds, seed, resamples)
            if forgetting is not None:
                rows.append(forgetting)
    _apply_holm(rows, alpha)
    return rows


def caveats(rows: Sequence[dict]) -> List[str]:
    """The distinct pair caveats among ``rows`` (first-seen order)."""
    return list(dict.fromkeys(r["caveat"] for r in rows if r["caveat"]))



# --------------------------------------------------------------------------- report section

_INTRO = ("Placement x topology interaction per pair of a sequential and a parallel model: (recurrent-only minus "
          "attention-only) in the parallel model minus the same in the sequential model, in pp, on each training "
          "domain's own benchmark and for forgetting (mean over the other benchmarks of max(0, base - tuned); "
          "positive = recurrent-only forgets more, relative to attention-only, in the parallel model). Intervals: "
          "joint paired bootstrap over the example ids scored in every cell (ci: 95 %; corrected: at the level "
          "Holm tests the contrast at) and, with 2+ seeds, a Student-t interval over seeds. Holm over all "
          "contrasts shown. 'supports topology matters' only where the corrected interval excludes 0 and the "
          "Holm-adjusted p is below 0.05 (and, with 2+ seeds, the same over seeds).")


def topology_section(results: StudyResults, *, resamples: int = 10_000, seed: int = 0) -> Optional[ReportSection]:
    """The report's "Topology effect" section, or ``None`` unless ``results.model_tags`` holds both a
    sequential and a parallel model with an attention-only and a recurrent-only run each."""
    if not has_both_topologies(results.model_tags):
        return None
    rows = topology_contrasts(results, resamples=resamples, seed=seed)
    if not rows:
        return None
    return ReportSection(name="topology_effect", title="Topology effect", intro=_INTRO, columns=TOPOLOGY_COLUMNS,
                         rows=rows, findings=[f"{r['pair']}: {r['sentence']}" for r in rows],
                         caveats=caveats(rows))
