"""The study report: one self-contained HTML file, a Markdown summary, CSV and LaTeX tables.

:func:`build_report` computes every table with :mod:`.metrics`, draws the figures with
:mod:`.figures` and writes::

    OUT/report.html        everything, figures embedded as base64 PNG, no external resources
    OUT/report.md          the summary: where LoRA should go, recipe, key deltas
    OUT/tables/*.csv       every table, machine-readable (accuracies 0..1, differences in pp)
    OUT/tables/*.tex       the same tables as LaTeX tabulars (no package needed)
    OUT/figures/*.png      the figures, also embedded in report.html
    OUT/metadata.json      the study's metadata (config, versions) and how the report was generated

The report is built in a temporary sibling directory and renamed into place at the end, so
OUT is either the complete new report or untouched (an older report is replaced only after
the new one is complete).
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .contract import BASE
from .figures import FigureSet, render_figures
from .metrics import NOT_SCORED, RECIPE_FRACTION, StudyTables, compute_tables
from ..atomic import replace_dir
from .results import StudyResults
from .sections import ReportSection
from .advisor import advisor_section
from .topology import topology_section

__all__ = ["ReportError", "build_report", "DEFINITIONS", "TABLE_COLUMNS", "tex_escape"]

PathLike = Union[str, Path]


class ReportError(ValueError):
    """The report cannot be written (bad output location, no records); one-line message."""


# --------------------------------------------------------------------------- definitions

DEFINITIONS: List[Tuple[str, str]] = [
    ("Units", "Accuracies are proportions in the CSV files (0..1) and percentages in the report; every "
              "difference (delta, mean_diff, interval, forgetting) is in percentage points (pp)."),
    ("Not scored", "A cell (run x benchmark) with no scored example, e.g. HumanEval completions that were "
                   "never executed. It is shown as 'not scored', never as 0, and left out of every mean and "
                   "test."),
    ("Wilson interval", "95% Wilson score interval of a cell's accuracy (examples as the sampling unit)."),
    ("Delta vs base", "Accuracy of a fine-tuned cell minus the base model's accuracy, both computed on the "
                      "example ids scored in both cells only."),
    ("Target / non-target delta", "Mean delta over the benchmarks of the run's own training domain / over all "
                                  "its other scored benchmarks."),
    ("Forgetting", "Mean over the scored non-target benchmarks of max(0, base accuracy - tuned accuracy), "
                   "in pp, on shared ids. Only losses count; a gain elsewhere does not offset a loss. "
                   "0 = nothing forgotten."),
    ("Gain per million params", "Mean delta over all scored benchmarks (pp) divided by trainable "
                                "parameters / 1e6."),
    ("Mean accuracy", "Per (model, train domain): for each benchmark, accuracy on the ids scored in every "
                      "run of the group; unweighted mean over the benchmarks scored in every run; mean over "
                      "seeds."),
    ("Pareto front", "Placements for which no other placement of the same (model, train domain) has fewer "
                     "or equal trainable parameters and higher or equal mean accuracy, one of them strictly."),
    ("Practitioner recipe", f"Per (model, train domain): among placements whose mean accuracy is at least "
                            f"{RECIPE_FRACTION:.0%} of the full placement's, the one with the fewest trainable "
                            f"parameters."),
    ("Paired bootstrap", "Per fine-tuned cell vs the base cell (reference 'base'), vs the full placement's cell "
                         "of the same train domain and seed ('full'), and vs every other placement of the same "
                         "model, train domain, seed and benchmark ('pair'): the mean difference a - b over the "
                         "example ids scored in both (never unshared ids), with the percentile 95% interval of "
                         "seeded resamples of those pairs."),
    ("McNemar / Holm", "Exact two-sided McNemar test on the same pairs (b01 = a wrong & b right, b10 = a right & "
                       "b wrong); p_holm = Holm-Bonferroni adjustment within the comparison's family "
                       "(holm_family): every base/full comparison of the same model, or every placement pair of "
                       "the same model, train domain, seed and benchmark."),
    ("Over seeds", "With several seeds: mean and Student-t 95% interval of the per-seed values; the seed "
                   "comparison table adds a one-sample t-test of the per-seed differences, Holm-adjusted within "
                   "the same families (holm_family)."),
]


# --------------------------------------------------------------------------- table specs


@dataclass(frozen=True)
class _Table:
    """One output table: file ``name``, ``title``, ``description``, ``columns`` as
    ``(key, kind)`` with kind in text/int/params/acc/pp/mag/p/ratio/list/bool/dict, and ``rows``."""

    name: str
    title: str
    description: str
    columns: Sequence[Tuple[str, str]]
    rows: Sequence[dict]


_ID = [("model", "text"), ("placement", "text"), ("train_domain", "text")]
TABLE_COLUMNS: Dict[str, List[Tuple[str, str]]] = {
    "accuracy": _ID + [("seed", "int"), ("benchmark", "text"), ("n", "int"), ("correct", "int"),
                       ("accuracy", "acc"), ("wilson_low", "acc"), ("wilson_high", "acc")],
    "accuracy_over_seeds": _ID + [("benchmark", "text"), ("k_seeds", "int"), ("accuracy", "acc"),
                                  ("seed_ci_low", "acc"), ("seed_ci_high", "acc"), ("status", "text")],
    "deltas": _ID + [("seed", "int"), ("benchmark", "text"), ("target", "bool"), ("n_shared", "int"),
                     ("base_accuracy", "acc"), ("accuracy", "acc"), ("delta_pp", "pp"), ("status", "text")],
    "deltas_over_seeds": _ID + [("benchmark", "text"), ("target", "bool"), ("k_seeds", "int"),
                                ("n_shared", "int"), ("delta_pp", "pp"), ("seed_ci_low", "pp"),
                                ("seed_ci_high", "pp"), ("status", "text")],
    "domain_effects": _ID + [("k_seeds", "int"), ("target_delta_pp", "pp"), ("non_target_delta_pp", "pp"),
                             ("forgetting_pp", "mag"), ("forgetting_ci_low", "mag"), ("forgetting_ci_high", "mag"),
                             ("mean_delta_pp", "pp"), ("target_benchmarks", "list"),
                             ("non_target_benchmarks", "list"), ("target_note", "text")],
    "efficiency": _ID + [("trainable_params", "params"), ("mean_delta_pp", "pp"), ("gain_pp_per_million", "pp")],
    "placement_means": [("model", "text"), ("train_domain", "text"), ("placement", "text"),
                        ("trainable_params", "params"), ("k_seeds", "int"), ("mean_accuracy", "acc"),
                        ("seed_ci_low", "acc"), ("seed_ci_high", "acc"), ("pareto", "bool"),
                        ("benchmarks", "list"), ("n_per_benchmark", "dict")],
    "recipe": [("model", "text"), ("train_domain", "text"), ("full_placement", "text"), ("full_source", "text"),
               ("full_mean_accuracy", "acc"), ("threshold", "acc"), ("recommended", "text"),
               ("recommended_params", "params"), ("recommended_mean_accuracy", "acc"), ("ratio_to_full", "ratio"),
               ("qualifying", "list"), ("note", "text")],
    "paired_bootstrap": [("model", "text"), ("train_domain", "text"), ("benchmark", "text"),
                         ("placement_a", "text"), ("placement_b", "text"), ("n_shared", "int"),
                         ("mean_diff", "pp"), ("ci_low", "pp"), ("ci_high", "pp"), ("seed", "int"),
                         ("reference", "text"), ("b01", "int"), ("b10", "int"), ("mcnemar_p", "p"),
                         ("p_holm", "p"), ("holm_family", "text")],
    "seed_comparisons": [("model", "text"), ("train_domain", "text"), ("benchmark", "text"),
                         ("placement_a", "text"), ("placement_b", "text"), ("reference", "text"),
                         ("k_seeds", "int"), ("mean_diff", "pp"), ("seed_ci_low", "pp"), ("seed_ci_high", "pp"),
                         ("t_p", "p"), ("p_holm", "p"), ("holm_family", "text")],
    "comparison_gaps": [("model", "text"), ("train_domain", "text"), ("benchmark", "text"),
                        ("placement_a", "text"), ("placement_b", "text"), ("seed", "int"), ("reason", "text")],
    "params": [("model", "text"), ("placement", "text"), ("trainable_params", "params")],
    "component_params": [("model", "text"), ("placement", "text"), ("component", "text"),
                         ("trainable_params", "params")],
}
"""Columns of every ``tables/<name>.csv`` in order. ``accuracy`` and the first nine of
``paired_bootstrap`` are a fixed contract."""


_NUMERIC_KINDS = ("int", "params", "acc", "pp", "mag", "p", "ratio")


def _accuracy_rows(rows: Sequence[dict]) -> List[dict]:
    """Accuracy rows for output: a not-scored cell says so in its ``accuracy`` column."""
    return [dict(r, accuracy=NOT_SCORED) if r["status"] == NOT_SCORED else r for r in rows]


def _tables(t: StudyTables) -> List[_Table]:
    specs = [
        ("accuracy", "Accuracy per cell", "Every run x benchmark: n scored examples, correct, accuracy and its "
         "Wilson 95% interval. train_domain = base for the base model; seed empty when none.",
         _accuracy_rows(t.accuracy)),
        ("accuracy_over_seeds", "Accuracy over seeds", "Mean accuracy over seeds with a t interval "
         "(empty for a single seed).", t.accuracy_summary),
        ("deltas", "Delta vs base per cell", "Accuracy minus base accuracy on the ids scored in both (pp).",
         t.deltas),
        ("deltas_over_seeds", "Delta vs base over seeds", "Mean delta over seeds (pp) with a t interval.",
         t.delta_summary),
        ("domain_effects", "Target vs non-target effect and forgetting", "Per run, mean over seeds (pp).",
         t.domain_effects),
        ("efficiency", "Gain per million trainable parameters", "mean_delta_pp / (trainable_params / 1e6).",
         t.efficiency),
        ("placement_means", "Mean accuracy per placement and Pareto front", "Mean accuracy over the benchmarks "
         "and ids scored in every run of the (model, train domain) group.", t.placement_means),
        ("recipe", "Practitioner recipe", f"Smallest placement within {RECIPE_FRACTION:.0%} of the full "
         "placement's mean accuracy.", t.recipe),
        ("paired_bootstrap", "Paired comparisons", "Paired bootstrap (pp, a - b) and exact McNemar on shared "
         "scored ids, vs base, vs the full placement and between every pair of placements; p_holm within "
         "holm_family.", t.paired),
        ("seed_comparisons", "Paired comparisons over seeds", "Mean of per-seed differences, t interval and "
         "t-test over seeds; p_holm within holm_family.", t.seed_comparisons),
        ("comparison_gaps", "Comparisons not made", "Planned comparisons without scored shared examples.",
         t.comparison_gaps),
        ("params", "Trainable parameters", "Per placement (empty = unknown).", t.params),
        ("component_params", "Trainable parameters per component type", "From the placement plans.",
         t.component_params),
    ]
    return [_Table(name, title, desc, TABLE_COLUMNS[name], rows) for name, title, desc, rows in specs]


# --------------------------------------------------------------------------- value formatting


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".10g")
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=False)
    return str(value)


def _display(value: object, kind: str) -> str:
    """Human-readable value for HTML, Markdown and LaTeX."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if kind == "bool":
        return "yes" if value else "no"
    if kind in ("acc", "ratio"):
        return f"{100 * value:.1f}%"
    if kind == "pp":
        return f"{value:+.2f}"
    if kind == "mag":  # a non-negative amount in pp (forgetting): no sign
        return f"{value:.2f}"
    if kind == "p":
        return f"{value:.3g}"
    if kind == "params":
        return f"{value:,}"
    if kind == "list":
        return ", ".join(map(str, value)) or "—"
    if kind == "dict":
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "—"
    return str(value)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Escape LaTeX special characters (``_`` -> ``\\_`` etc.)."""
    return "".join(_TEX.get(c, c) for c in text)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- table writers


def _write_csv(table: _Table, path: Path) -> None:
    keys = [k for k, _ in table.columns]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for row in table.rows:
            writer.writerow([_csv_value(row.get(k)) for k in keys])


def _write_tex(table: _Table, path: Path) -> None:
    keys = [k for k, _ in table.columns]
    align = "".join("r" if kind in _NUMERIC_KINDS else "l" for _, kind in table.columns)
    lines = [f"% {table.title}: {table.description}", "% generated by hybridlora report; needs no LaTeX package",
             f"\\begin{{tabular}}{{{align}}}", "\\hline",
             " & ".join(tex_escape(k) for k in keys) + " \\\\", "\\hline"]
    for row in table.rows:
        # "--" rather than the em dash: plain ASCII compiles under any LaTeX engine and encoding
        lines.append(" & ".join(tex_escape(_display(row.get(k), kind)).replace("—", "--")
                                for k, kind in table.columns) + " \\\\")
    lines += ["\\hline", "\\end{tabular}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _md_table(columns: Sequence[Tuple[str, str]], rows: Sequence[dict]) -> str:
    head = "| " + " | ".join(k for k, _ in columns) + " |"
    rule = "|" + "|".join("---:" if kind in _NUMERIC_KINDS else "---"
                          for _, kind in columns) + "|"
    body = ["| " + " | ".join(_md_escape(_display(r.get(k), kind)) for k, kind in columns) + " |" for r in rows]
    return "\n".join([head, rule] + body)


def _html_table(columns: Sequence[Tuple[str, str]], rows: Sequence[dict]) -> str:
    # headers may break after an underscore, and a table wider than the page scrolls inside its own box
    head = "".join(f"<th>{html.escape(k).replace('_', '_<wbr>')}</th>" for k, _ in columns)
    body = []
    for r in rows:
        cells = []
        for k, kind in columns:
            v = r.get(k)
            # the raw number goes in data-v so the column sorts numerically, not by display text
            sort = f' data-v="{v!r}"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cls = ' class="num"' if sort else ""
            cells.append(f"<td{cls}{sort}>{html.escape(_display(v, kind))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="tablewrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


# --------------------------------------------------------------------------- narrative


def _caveats(results: StudyResults, t: StudyTables) -> List[str]:
    """Automatic warnings about the data, shown under the notes."""
    out = [c.note for c in t.full.values() if c.note]
    unknown = [r for r in t.params if r["trainable_params"] is None]
    if unknown:
        models = sorted({r["model"] for r in unknown})
        out.append(f"Trainable parameter counts are unknown for {len(unknown)} placement(s) of {', '.join(models)}: "
                   "the Pareto front, gain per parameter and the smallest-placement recipe need them and are "
                   "incomplete.")
    unscored = [r for r in t.accuracy if r["status"] == NOT_SCORED]
    if unscored:
        benches = sorted({r["benchmark"] for r in unscored})
        out.append(f"{len(unscored)} cell(s) are not scored (benchmark(s): {', '.join(benches)}); they are shown "
                   "as 'not scored', never as 0, and left out of every mean and test.")
    partial = [r for r in t.accuracy if r["status"] == "partially scored"]
    if partial:
        out.append(f"{len(partial)} cell(s) are only partially scored; their accuracy uses the scored examples.")
    sizes: Dict[Tuple[str, str], set] = {}
    for r in t.accuracy:
        if r["n"]:  # unscored cells are reported above; their coverage does not affect any number
            sizes.setdefault((r["model"], r["benchmark"]), set()).add(r["n_examples"])
    for (model, bench), ns in sizes.items():
        if len(ns) > 1:
            out.append(f"{model} / {bench}: runs cover different example sets (sizes "
                       f"{', '.join(map(str, sorted(ns)))}); paired comparisons use the shared ids only.")
    if all(len(s) <= 1 for k, s in t.index.seeds.items() if k[1] != BASE):
        out.append("Every run has a single seed: intervals reflect example sampling only, not training "
                   "variance between seeds.")
    if t.comparison_gaps:
        reasons = Counter(g["reason"] for g in t.comparison_gaps)
        out.append(f"{len(t.comparison_gaps)} planned comparison(s) could not be made ("
                   + ", ".join(f"{n} {why}" for why, n in reasons.items()) + ").")
    return out


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _pp(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:+.2f} pp"


def _names(placements: Sequence[str], value: str) -> str:
    """"`a` (value)", or "`a`, `b` (tied at value)"."""
    text = ", ".join(f"`{p}`" for p in placements)
    return f"{text} (tied at {value})" if len(placements) > 1 else f"{text} ({value})"


def _answer_lines(t: StudyTables) -> Dict[str, List[str]]:
    """Per model, Markdown bullet lines answering "where should LoRA go"."""
    out: Dict[str, List[str]] = {}
    for row in t.summary:
        lines = out.setdefault(row["model"], [])
        if row["recipe"]:
            rec = next(r for r in t.recipe if (r["model"], r["train_domain"]) == (row["model"], row["train_domain"]))
            first = (f"recipe: `{row['recipe']}` ({rec['recommended_params']:,} trainable params, "
                     f"{_pct(rec['ratio_to_full'])} of the full placement's mean accuracy)")
        elif row["qualifying"]:
            first = (f"no recipe ({row['recipe_note']}); within {RECIPE_FRACTION:.0%} of the full placement: "
                     + ", ".join(f"`{p}`" for p in row["qualifying"]))
        else:
            first = f"no recipe ({row['recipe_note'] or 'no data'})"
        parts = [first]
        if row["best_accuracy"]:
            parts.append(f"highest mean accuracy: {_names(row['best_accuracy'], _pct(row['best_accuracy_value']))}")
        if row["best_target"]:
            parts.append("largest gain on its own domain: "
                         + _names(row["best_target"], _pp(row["best_target_delta_pp"])))
        if row["least_forgetting"]:
            parts.append("least forgetting: "
                         + _names(row["least_forgetting"], f"{row['least_forgetting_pp']:.2f} pp"))
        lines.append(f"**{row['train_domain']}** — " + "; ".join(parts) + ".")
    for model, lines in out.items():
        # a tie for the highest accuracy is no pick
        picks = Counter(r["recipe"] or (r["best_accuracy"][0] if len(r["best_accuracy"]) == 1 else None)
                        for r in t.summary if r["model"] == model)
        picks.pop(None, None)
        if picks:
            top, n = picks.most_common(1)[0]
            has = [bool(r["recipe"]) for r in t.summary if r["model"] == model]
            basis = "recipe" if all(has) else "highest mean accuracy" if not any(has) else \
                "recipe, else highest mean accuracy"
            lines.insert(0, f"On these results, `{top}` is the most frequent pick ({basis}) in {n} of "
                            f"{sum(picks.values())} training domain(s).")
    return out


def _key_deltas(t: StudyTables) -> Tuple[List[dict], List[dict]]:
    """Rows of the summary's key-delta table: each placement's effect on its target benchmarks
    vs base, with the bootstrap interval (the not-scored ones say so); and, apart, the rows where
    no example changed its answer (b01 = b10 = 0: delta exactly 0, nothing to test), which the
    table leaves out and the report only counts."""
    out = []
    for row in t.deltas:
        if not row["target"]:
            continue
        match = [p for p in t.paired if p["reference"] == "base" and p["seed"] == row["seed"] and
                 (p["model"], p["train_domain"], p["benchmark"], p["placement_a"]) ==
                 (row["model"], row["train_domain"], row["benchmark"], row["placement"])]
        p = match[0] if match else {}
        out.append({"model": row["model"], "train_domain": row["train_domain"], "benchmark": row["benchmark"],
                    "placement": row["placement"], "seed": row["seed"], "n_shared": p.get("n_shared"),
                    "delta_pp": row["delta_pp"] if row["delta_pp"] is not None else row["status"],
                    "ci_low": p.get("ci_low"), "ci_high": p.get("ci_high"), "p_holm": p.get("p_holm"),
                    "_unchanged": bool(p) and p.get("b01") == 0 and p.get("b10") == 0})
    kept = [r for r in out if not r["_unchanged"]]
    return kept, [r for r in out if r["_unchanged"]]


def _unchanged_sentence(unchanged: Sequence[dict]) -> str:
    """One line for the key-delta rows left out because no example changed its answer."""
    if not unchanged:
        return ""
    cells = ", ".join(f"{r['model']} / {r['train_domain']} / {r['placement']} on {r['benchmark']}"
                      for r in unchanged[:6])
    more = f" and {len(unchanged) - 6} more" if len(unchanged) > 6 else ""
    return (f"{len(unchanged)} cell(s) left out: no target example changed its answer from the base model "
            f"(delta exactly 0, nothing to test): {cells}{more}.")


_KEY_DELTA_COLUMNS = [("model", "text"), ("train_domain", "text"), ("benchmark", "text"), ("placement", "text"),
                      ("seed", "int"), ("n_shared", "int"), ("delta_pp", "pp"), ("ci_low", "pp"),
                      ("ci_high", "pp"), ("p_holm", "p")]
_SIGNIFICANT_LIMIT = 15


def _significant(t: StudyTables, alpha: float = 0.05) -> List[dict]:
    rows = [r for r in t.paired if r["p_holm"] is not None and r["p_holm"] < alpha]
    return sorted(rows, key=lambda r: -abs(r["mean_diff"]))[:_SIGNIFICANT_LIMIT]


def _target_pairs(t: StudyTables) -> List[dict]:
    """Placement-vs-placement rows on each train domain's own benchmarks: the contrasts a study's headline
    discusses ("on GSM8K, after GSM8K training, attention beats SSM"); every pair is in the CSV."""
    targets = {(r["model"], r["train_domain"], r["benchmark"]) for r in t.deltas if r["target"]}
    rows = [r for r in t.paired if r["reference"] in ("pair", "full")
            and (r["model"], r["train_domain"], r["benchmark"]) in targets]
    order = {m: i for i, m in enumerate(t.index.models)}
    return sorted(rows, key=lambda r: (order.get(r["model"], 0), r["train_domain"], r["benchmark"],
                                       -abs(r["mean_diff"])))


_PAIR_COLUMNS = [("model", "text"), ("train_domain", "text"), ("benchmark", "text"), ("placement_a", "text"),
                 ("placement_b", "text"), ("seed", "int"), ("n_shared", "int"), ("mean_diff", "pp"),
                 ("ci_low", "pp"), ("ci_high", "pp"), ("mcnemar_p", "p"), ("p_holm", "p")]
_PAIR_INTRO = ("Every pair of placements on each training domain's own benchmark(s), largest difference first: "
               "a - b in pp on shared example ids, 95% paired-bootstrap interval, exact McNemar p and its Holm "
               "adjustment within the model x domain x benchmark family (pairs with the full placement are "
               "adjusted with the model's base/full comparisons). Other benchmarks: tables/paired_bootstrap.csv.")

_SIG_COLUMNS = [("model", "text"), ("train_domain", "text"), ("benchmark", "text"), ("placement_a", "text"),
                ("placement_b", "text"), ("seed", "int"), ("n_shared", "int"), ("mean_diff", "pp"),
                ("ci_low", "pp"), ("ci_high", "pp"), ("p_holm", "p")]
_EFFECT_COLUMNS = [("model", "text"), ("train_domain", "text"), ("placement", "text"), ("target_delta_pp", "pp"),
                   ("non_target_delta_pp", "pp"), ("forgetting_pp", "mag"), ("target_note", "text")]


def _overview(results: StudyResults, t: StudyTables) -> List[str]:
    idx = t.index
    seeds = sorted({s for k, v in idx.seeds.items() if k[1] != BASE for s in v if s is not None})
    return [f"Models: {', '.join(idx.models)}",
            f"Train domains: {', '.join(idx.domains) or '—'}",
            f"Benchmarks: {', '.join(idx.benchmarks)}",
            f"Seeds: {', '.join(map(str, seeds)) or '—'}",
            f"Runs: {len(results.runs)}; cells: {len(idx.cells)}; evaluated examples: {len(results.records):,}",
            "Full placement per model: " + "; ".join(
                f"{m}: {c.placement or 'unknown'} ({c.source})" for m, c in t.full.items())]


# --------------------------------------------------------------------------- Markdown


def _markdown(results: StudyResults, t: StudyTables, figs: FigureSet, gen: dict,
              sections: Sequence[ReportSection] = ()) -> str:
    out = [f"# {results.title}", ""]
    for note in results.notes:
        out += [f"> **Note:** {note}", ""]
    caveats = _caveats(results, t)
    if caveats:
        out += ["**Caveats**", ""] + [f"- {c}" for c in caveats] + [""]
    out += ["## Where should LoRA go?", ""]
    for model, lines in _answer_lines(t).items():
        out += [f"### {model}", ""] + [f"- {line}" for line in lines] + [""]
    out += ["## Practitioner recipe", "", f"Smallest placement whose mean accuracy is at least "
            f"{RECIPE_FRACTION:.0%} of the full placement's.", "",
            _md_table(TABLE_COLUMNS["recipe"][:-2] + [("note", "text")], t.recipe), ""]
    out += ["## Key deltas vs base (target benchmarks)", "",
            "Percentage points on shared example ids; 95% paired-bootstrap interval; Holm-adjusted McNemar p.", ""]
    key, unchanged = _key_deltas(t)
    if key or not unchanged:
        out += [_md_table(_KEY_DELTA_COLUMNS, key) if key else "_No target benchmarks in these results._", ""]
    if unchanged:
        out += [_unchanged_sentence(unchanged), ""]
    pairs = _target_pairs(t)
    if pairs:
        out += ["## Placement vs placement (target benchmarks)", "", _PAIR_INTRO, "", _md_table(_PAIR_COLUMNS, pairs), ""]
    out += ["## Target vs non-target effect and forgetting", "", _md_table(_EFFECT_COLUMNS, t.domain_effects), ""]
    for sec in sections:
        out += [f"## {sec.title}", "", sec.intro, ""] + [f"> **Caveat:** {c}" for c in sec.caveats]
        out += [""] * bool(sec.caveats) + [f"- {f}" for f in sec.findings] + ["", _md_table(sec.columns, sec.rows), ""]
    sig = _significant(t)
    out += [f"## Largest significant differences (Holm p < 0.05, top {_SIGNIFICANT_LIMIT})", "",
            _md_table(_SIG_COLUMNS, sig) if sig else "_None._", ""]
    out += ["## Data", ""] + [f"- {line}" for line in _overview(results, t)] + [""]
    out += ["## Definitions", ""] + [f"- **{term}**: {text}" for term, text in DEFINITIONS] + [""]
    out += ["## Files", "", "- `report.html`: the full report (all tables and figures, self-contained)",
            "- `tables/*.csv`, `tables/*.tex`: every table", "- `metadata.json`: study config, versions, generation",
            "- `figures/*.png`: "
            + (", ".join(f.name for f in figs.figures) or "none"), ""]
    if figs.skipped:
        out += ["Figures skipped: " + "; ".join(f"{n} ({why})" for n, why in figs.skipped), ""]
    out += [f"_Generated {gen['generated']} by hybridlora {gen['hybridlora']}; {gen['resamples']:,} bootstrap "
            f"resamples, seed {gen['seed']}._", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.notes{background:#fff3cd;border:2px solid #e0a800;padding:.6em 1em;border-radius:6px;font-weight:600}
.caveats{background:#eef4fb;border-left:4px solid #4a7ab5;padding:.4em 1em}
.tablewrap{max-width:100%;overflow-x:auto;margin:.6em 0}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
td{max-width:24em;overflow-wrap:anywhere}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th{background:#f2f2f2;cursor:pointer;position:sticky;top:0}
figure{margin:1em 0}figcaption{font-size:13px;color:#555}img{max-width:100%}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}pre{background:#f7f7f7;padding:.6em;overflow:auto}
"""

# click a header to sort by it (numbers by their raw value in data-v), click again to reverse
_JS = """
document.querySelectorAll("table.sortable th").forEach(function(th){
 th.addEventListener("click",function(){
  var body=th.closest("table").tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
  var asc=th.getAttribute("data-asc")!=="1";th.setAttribute("data-asc",asc?"1":"0");
  var rows=Array.prototype.slice.call(body.rows);
  function val(r){var c=r.cells[i];return c.hasAttribute("data-v")?parseFloat(c.getAttribute("data-v")):c.textContent;}
  rows.sort(function(a,b){var x=val(a),y=val(b),r;
   if(typeof x==="number"&&typeof y==="number"){r=x-y;}
   else if(typeof x==="number"){r=-1;}else if(typeof y==="number"){r=1;}else{r=x.localeCompare(y);}
   return asc?r:-r;});
  rows.forEach(function(r){body.appendChild(r);});
 });
});
"""


def _h(text: str) -> str:
    return html.escape(text)


def _md_inline(text: str) -> str:
    """Escape, then turn the Markdown `code` and **bold** of the answer lines into HTML."""
    s = _h(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _figure_html(fig) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="fig-{_h(fig.name)}"><img alt="{_h(fig.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><strong>{_h(fig.title)}.</strong> {_h(fig.caption)}</figcaption></figure>")


def _html(results: StudyResults, t: StudyTables, figs: FigureSet, tables: List[_Table], gen: dict,
          sections: Sequence[ReportSection] = ()) -> str:
    p = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_h(results.title)}</title>",
         f"<style>{_CSS}</style></head><body>", f"<h1>{_h(results.title)}</h1>"]
    if results.notes:
        p.append('<div class="notes">' + "".join(f"<p>Note: {_h(n)}</p>" for n in results.notes) + "</div>")
    caveats = _caveats(results, t)
    if caveats:
        p.append('<div class="caveats"><p><strong>Caveats</strong></p><ul>'
                 + "".join(f"<li>{_h(c)}</li>" for c in caveats) + "</ul></div>")
    p.append("<h2>Where should LoRA go?</h2>")
    for model, lines in _answer_lines(t).items():
        p.append(f"<h3>{_h(model)}</h3><ul>" + "".join(f"<li>{_md_inline(x)}</li>" for x in lines) + "</ul>")
    p.append(f"<h2>Practitioner recipe</h2><p>Smallest placement whose mean accuracy is at least "
             f"{RECIPE_FRACTION:.0%} of the full placement's.</p>" + _html_table(TABLE_COLUMNS["recipe"], t.recipe))
    key, unchanged = _key_deltas(t)
    p.append("<h2>Key deltas vs base (target benchmarks)</h2><p>Percentage points on shared example ids; 95% "
             "paired-bootstrap interval; Holm-adjusted McNemar p.</p>"
             + (_html_table(_KEY_DELTA_COLUMNS, key) if key else
                "" if unchanged else "<p>No target benchmarks in these results.</p>")
             + (f"<p>{_h(_unchanged_sentence(unchanged))}</p>" if unchanged else ""))
    pairs = _target_pairs(t)
    if pairs:
        p.append(f"<h2>Placement vs placement (target benchmarks)</h2><p>{_h(_PAIR_INTRO)}</p>"
                 f"<details><summary>{len(pairs)} comparisons</summary>{_html_table(_PAIR_COLUMNS, pairs)}</details>")
    p.append("<h2>Target vs non-target effect and forgetting</h2>" + _html_table(_EFFECT_COLUMNS, t.domain_effects))
    for sec in sections:
        p.append(f"<h2>{_h(sec.title)}</h2><p>{_h(sec.intro)}</p>"
                 + "".join(f'<div class="caveats"><p><strong>Caveat:</strong> {_h(c)}</p></div>' for c in sec.caveats)
                 + "<ul>" + "".join(f"<li>{_h(f)}</li>" for f in sec.findings) + "</ul>"
                 + _html_table(sec.columns, sec.rows))
    sig = _significant(t)
    p.append(f"<h2>Largest significant differences (Holm p &lt; 0.05, top {_SIGNIFICANT_LIMIT})</h2>"
             + (_html_table(_SIG_COLUMNS, sig) if sig else "<p>None.</p>"))
    p.append("<h2>Figures</h2>" + "".join(_figure_html(f) for f in figs.figures))
    if figs.skipped:
        p.append("<p>Skipped figures: " + "; ".join(f"{_h(n)} ({_h(w)})" for n, w in figs.skipped) + "</p>")
    p.append("<h2>Tables</h2><p>Click a column header to sort. Each table is also in <code>tables/</code> as CSV "
             "and LaTeX.</p>")
    for table in tables:
        p.append(f"<details{' open' if table.name in ('recipe', 'domain_effects') else ''}><summary>"
                 f"{_h(table.title)} ({len(table.rows)} rows, <code>tables/{table.name}.csv</code>)</summary>"
                 f"<p>{_h(table.description)}</p>{_html_table(table.columns, table.rows)}</details>")
    p.append("<h2>Definitions</h2><dl>" + "".join(f"<dt><strong>{_h(a)}</strong></dt><dd>{_h(b)}</dd>"
                                                  for a, b in DEFINITIONS) + "</dl>")
    p.append("<h2>Appendix: data and provenance</h2><ul>" + "".join(f"<li>{_h(x)}</li>"
                                                                    for x in _overview(results, t)) + "</ul>")
    p.append("<details><summary>Study metadata and report generation (also in <code>metadata.json</code>)"
             "</summary><pre>" + _h(_metadata_json(results, gen)) + "</pre></details>")
    p.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(p)


# --------------------------------------------------------------------------- build

SECTION_BUILDERS: List[Callable[..., Optional[ReportSection]]] = [topology_section, advisor_section]
"""Optional sections (see :mod:`.sections`): each ``(results, *, resamples, seed) -> ReportSection | None``."""


def _build_sections(results: StudyResults, resamples: int, seed: int) -> List[ReportSection]:
    """Every applicable section; a builder's ``ValueError`` (e.g. ambiguous model tags) is a ReportError."""
    out = []
    for builder in SECTION_BUILDERS:
        try:
            section = builder(results, resamples=resamples, seed=seed)
        except ValueError as exc:
            raise ReportError(str(exc)) from None
        if section is not None:
            out.append(section)
    return out


def _metadata_json(results: StudyResults, gen: dict) -> str:
    return json.dumps({"study": results.metadata, "report": gen}, indent=2, default=str, sort_keys=True)


def _generation_info(resamples: int, seed: int) -> dict:
    import matplotlib
    import numpy
    import scipy

    from .. import __version__

    return {"generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "hybridlora": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "scipy": scipy.__version__, "matplotlib": matplotlib.__version__, "resamples": resamples, "seed": seed}


def _check_output(out: Path) -> None:
    """Refuse to replace anything that is not an earlier report (or an empty directory)."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not ((out / "report.html").exists() or (out / "report.md").exists()):
        raise ReportError(f"{out}: directory exists, is not empty and holds no earlier report; "
                          "refusing to replace it (choose another --output)")


def _normal_permissions(path: Path) -> None:
    """mkdtemp makes a private (0700) directory; the report should get the usual mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


def _progress_wrapper(progress: bool) -> Optional[Callable[[Iterable], Iterable]]:
    if not progress:
        return None
    from tqdm import tqdm

    return lambda items: tqdm(items, desc="paired tests", unit="cmp", file=sys.stderr, leave=False)


def _write_all(tmp: Path, results: StudyResults, t: StudyTables, figs: FigureSet, gen: dict,
               sections: Sequence[ReportSection] = ()) -> List[str]:
    """Write every file under ``tmp``; return their paths relative to it."""
    written = []
    (tmp / "tables").mkdir()
    (tmp / "figures").mkdir()
    tables = _tables(t) + [_Table(s.name, s.title, s.intro, s.columns, s.rows) for s in sections]
    for table in tables:
        for ext, writer in (("csv", _write_csv), ("tex", _write_tex)):
            rel = f"tables/{table.name}.{ext}"
            writer(table, tmp / rel)
            written.append(rel)
    for fig in figs.figures:
        rel = f"figures/{fig.name}.png"
        (tmp / rel).write_bytes(fig.png)
        written.append(rel)
    (tmp / "metadata.json").write_text(_metadata_json(results, gen) + "\n", encoding="utf-8")
    (tmp / "report.md").write_text(_markdown(results, t, figs, gen, sections), encoding="utf-8")
    (tmp / "report.html").write_text(_html(results, t, figs, tables, gen, sections), encoding="utf-8")
    return ["report.html", "report.md", "metadata.json"] + written


def build_report(results: StudyResults, output_dir: PathLike, *, resamples: int = 10_000, seed: int = 0,
                 progress: bool = True, extra_files: Optional[Dict[str, bytes]] = None) -> Dict[str, Path]:
    """Compute, draw and write the whole report into ``output_dir`` atomically.

    Inputs: the :class:`StudyResults`; the output directory (created, or replaced if it holds
    an earlier report); ``resamples`` and ``seed`` of the paired bootstrap; ``progress``
    shows a progress bar on stderr. Output: ``{relative path: final Path}`` for every file
    written, e.g. ``"report.html"``, ``"report.md"``, ``"tables/accuracy.csv"``,
    ``"figures/<name>.png"``, plus the aliases ``"html"`` and ``"markdown"``; ``extra_files``
    (relative path -> bytes, e.g. per-instance outcomes) are written alongside. Raises
    :class:`ReportError` when there are no records or the
    output location is unsafe to replace. On any failure nothing is left behind and an
    earlier report is untouched.
    """
    if not results.records:
        raise ReportError("no evaluation records: nothing to report")
    out = Path(output_dir).absolute()
    _check_output(out)
    tables = compute_tables(results, resamples=resamples, seed=seed, progress=_progress_wrapper(progress))
    figs = render_figures(tables)
    sections = _build_sections(results, resamples, seed)
    gen = _generation_info(resamples, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _normal_permissions(tmp)
        written = _write_all(tmp, results, tables, figs, gen, sections)
        for rel, data in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
            written.append(rel)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {rel: out / rel for rel in written}
    # short aliases of the two main files, for callers that ask for paths["html"]
    paths.update(html=out / "report.html", markdown=out / "report.md")
    return paths
