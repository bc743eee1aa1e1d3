"""The ablation report: ``report.html`` (self-contained), ``report.md``, ``tables/*.csv|.tex``, ``figures/*.png``.

Sections: the group table (each mixer type removed, with perplexity change and accuracy drops and their
intervals), the layer × component heatmap of Δ log-perplexity (single-unit conditions), progressive-removal
curves with the random-control band, targeted-vs-random tests (Holm-corrected), per-layer diagnostics of the
group conditions, correlations of diagnostics with drops, and — with ``--study`` — importance vs adaptation gain.
Built in a temporary folder and renamed into place: the old report stays until the new one is complete.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..atomic import replace_dir
from ..analysis.figures import to_png
from .stats import (AblationResults, condition_rows, control_tests, diagnostic_correlations, load_results,
                    study_link)

DEFAULT_METHODS = ("skip", "zero")
# the Markdown tables keep point estimates (intervals are in the CSV and HTML tables)
MARKDOWN_COLUMNS = ("dlogppl_low", "dlogppl_high")


def build_ablation_report(ablation_dir: str | Path, output: str | Path | None = None, *, study_dir: str | None = None,
                          resamples: int = 2000, seed: int = 0) -> Path:
    ablation_dir = Path(ablation_dir)
    res = load_results(ablation_dir)
    study_dir = study_dir or res.meta.get("study")
    rows = condition_rows(res, resamples=resamples, seed=seed)
    tests = control_tests(rows)
    correlations = diagnostic_correlations(rows)
    link = study_link(rows, study_dir) if study_dir else None
    figures = _figures(res, rows)
    out = Path(output) if output else ablation_dir / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        tables = _tables(rows, tests, correlations, res, link)
        (tmp / "tables").mkdir()
        for name, (columns, data) in tables.items():
            _write_csv(tmp / "tables" / f"{name}.csv", columns, data)
            _write_tex(tmp / "tables" / f"{name}.tex", [c for c in columns if c != "units"], data)
        (tmp / "figures").mkdir()
        for name, (_, png) in figures.items():
            (tmp / "figures" / f"{name}.png").write_bytes(png)
        (tmp / "report.md").write_text(_markdown(res, tables, figures, link), encoding="utf-8")
        (tmp / "report.html").write_text(_html(res, tables, figures, link), encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.html"


def is_ablation_dir(path: str | Path) -> bool:
    """Whether ``path`` holds an ablation directory's store (for ``hybridlora report``)."""
    import json
    import sqlite3

    db = Path(path) / "study.db"
    if not db.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return False
    return bool(row) and json.loads(row[0]).get("tool") == "ablate"


# ---------------------------------------------------------------------------------------------- tables
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "—"
        return f"{value:.4g}"
    return str(value)


def _tables(rows, tests, correlations, res: AblationResults, link) -> dict[str, tuple[list[str], list[dict]]]:
    benches = res.benchmarks()
    cond_cols = ["name", "method", "plan", "n_units", "ppl", "dlogppl", "dlogppl_low", "dlogppl_high"]
    for b in benches:
        cond_cols += [f"{b}_acc", f"{b}_low", f"{b}_high", f"{b}_drop", f"{b}_drop_low", f"{b}_drop_high"]
    cond_cols += ["mean_acc_drop", "final_kl", "mean_cka", "units"]
    out = {"conditions": (cond_cols, rows)}
    group_cols = ["name", "method", "n_units", "ppl", "dlogppl", "dlogppl_low", "dlogppl_high"] + \
        [f"{b}_drop" for b in benches] + ["mean_acc_drop"]
    out["groups"] = (group_cols, [r for r in rows if r["plan"] in ("intact", "group", "custom")])
    test_cols = ["name", "method", "n_units", "trials", "dlogppl", "dlogppl_controls_mean", "dlogppl_p",
                 "dlogppl_p_holm", "mean_acc_drop", "mean_acc_drop_controls_mean", "mean_acc_drop_p",
                 "mean_acc_drop_p_holm"]
    out["controls"] = (test_cols, tests)
    diag_rows = []
    for c in res.conditions:
        diag = res.metrics[c["job"]].get("diagnostics")
        for layer in (diag or {}).get("layers", []):
            diag_rows.append({"name": c["name"], "method": c["method"], "layer": layer["layer"],
                              "rel_update": layer["rel_update"], "cosine": layer["cosine"], "kl": layer["kl"],
                              "cka": layer["cka"], "unit_ratio": " ".join(f"{k}={v:.3g}" for k, v in
                                                                          layer["unit_ratio"].items())})
    out["diagnostics"] = (["name", "method", "layer", "rel_update", "cosine", "kl", "cka", "unit_ratio"], diag_rows)
    out["correlations"] = (["diagnostic", "drop", "rho", "p", "n"], correlations)
    if link and link.get("components"):
        out["study_link"] = (["component", "importance_dlogppl", "adaptation_gain"], link["components"])
    return out


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])


_TEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_", "{": "\\{",
        "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text)


def _write_tex(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    lines = ["\\begin{tabular}{" + "l" * len(columns) + "}", "\\hline",
             " & ".join(tex_escape(c) for c in columns) + " \\\\", "\\hline"]
    lines += [" & ".join(tex_escape(_fmt(r.get(c))).replace("—", "--") for c in columns) + " \\\\" for r in rows]
    lines += ["\\hline", "\\end{tabular}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- figures
def _figures(res: AblationResults, rows: list[dict]) -> dict[str, tuple[str, bytes]]:
    out = {}
    heat = _heatmap(res, rows)
    if heat is not None:
        out["layer_heatmap"] = ("Δ log-perplexity when one unit is removed (layer × component)", to_png(heat))
    curves = _progressive(rows)
    if curves is not None:
        out["progressive"] = ("Progressive removal: Δ log-perplexity vs units removed; grey band = random "
                              "matched-count controls (min–max)", to_png(curves))
    diag = _diagnostics_figure(res)
    if diag is not None:
        out["diagnostics"] = ("Per-layer logit-lens KL (intact ‖ ablated) and linear CKA of the group conditions",
                              to_png(diag))
    return out


def _heatmap(res: AblationResults, rows: list[dict]) -> Figure | None:
    singles = [r for r in rows if r["plan"] == "layer" and r["method"] in DEFAULT_METHODS and "dlogppl" in r]
    if not singles:
        return None
    components = list(dict.fromkeys(r["detail"]["component"] for r in singles))
    layers = res.meta.get("num_layers") or (max(r["detail"]["layer"] for r in singles) + 1)
    grid = np.full((len(components), layers), np.nan)
    for r in singles:
        grid[components.index(r["detail"]["component"]), r["detail"]["layer"]] = r["dlogppl"]
    fig = Figure(figsize=(max(4.0, 0.35 * layers + 2), 0.6 * len(components) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(components)), components, fontsize=8)
    ax.set_xticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label="Δ log-ppl (nats/token)", shrink=0.8)
    return fig


def _progressive(rows: list[dict]) -> Figure | None:
    prog = [r for r in rows if r["plan"] == "progressive" and r["detail"].get("order") in ("first", "last", "random")
            and "dlogppl" in r]
    if not prog:
        return None
    methods = list(dict.fromkeys(r["method"] for r in prog))
    fig = Figure(figsize=(4.2 * len(methods), 3.2), layout="constrained")
    controls = [r for r in rows if r["plan"] == "random" and "dlogppl" in r]
    for i, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), i + 1)
        band = {}
        for c in controls:
            if c["detail"]["control_method"] == method:
                band.setdefault(c["n_units"], []).append(c["dlogppl"])
        if band:
            ns = sorted(band)
            ax.fill_between(ns, [min(band[n]) for n in ns], [max(band[n]) for n in ns], color="#cccccc",
                            label="random controls")
        for order in ("first", "last", "random"):
            pts = sorted((r["detail"]["n"], r["dlogppl"]) for r in prog if r["method"] == method and
                         r["detail"]["order"] == order)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{order} N")
        ax.set_xlabel("units removed")
        ax.set_ylabel("Δ log-ppl")
        ax.set_title(method, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def _diagnostics_figure(res: AblationResults) -> Figure | None:
    groups = [c for c in res.conditions if c["plan"] == "group" and res.metrics[c["job"]].get("diagnostics")]
    if not groups:
        return None
    fig = Figure(figsize=(8.5, 3.2), layout="constrained")
    ax_kl, ax_cka = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for c in groups:
        layers = res.metrics[c["job"]]["diagnostics"]["layers"]
        label = f"{c['name']} ({c['method']})"
        ax_kl.plot([l["layer"] for l in layers], [l["kl"] for l in layers], marker=".", label=label)
        ax_cka.plot([l["layer"] for l in layers], [l["cka"] for l in layers], marker=".", label=label)
    ax_kl.set_xlabel("layer"), ax_kl.set_ylabel("logit-lens KL (nats)")
    ax_cka.set_xlabel("layer"), ax_cka.set_ylabel("linear CKA intact vs ablated")
    ax_kl.legend(fontsize=6)
    return fig


# ---------------------------------------------------------------------------------------------- documents
def _header(res: AblationResults) -> list[str]:
    model = res.meta.get("model", {})
    lines = [f"Model: {model.get('name')} ({res.meta.get('family') or 'unknown family'}, {res.meta.get('topology')}, "
             f"{res.meta.get('num_layers')} layers); {len(res.conditions)} conditions complete.",
             "Δ log-ppl: change of the mean token negative log-likelihood against the intact model (nats/token; "
             "exp of it is the perplexity ratio), 95 % paired bootstrap over the perplexity windows. Accuracy "
             "drops: ablated − intact, 95 % paired bootstrap over shared items. Controls: one-sided p = (1 + "
             "#controls at least as harmful)/(K + 1), Holm-corrected across targets.",
             f"Built {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}."]
    if model.get("tiny"):
        lines.insert(0, "**A tiny random-weight model: these numbers exercise the pipeline and carry NO scientific "
                        "meaning.**")
    return lines


def _markdown(res, tables, figures, link) -> str:
    parts = ["# Component ablation report", ""] + [line + "\n" for line in _header(res)]
    for name, (columns, rows) in tables.items():
        if name == "diagnostics" or not rows:
            continue
        shown = [c for c in columns if c in MARKDOWN_COLUMNS or not c.endswith(("_low", "_high", "_n"))
                 and c != "units" and not (name == "conditions" and c.endswith("_acc"))]
        parts += [f"## {name.replace('_', ' ').title()}", "", "| " + " | ".join(shown) + " |",
                  "|" + "---|" * len(shown)]
        parts += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in shown) + " |" for r in rows]
        parts.append("")
    if link and link.get("note"):
        parts += [f"Study link: {link['note']}", ""]
    for name, (caption, _) in figures.items():
        parts += [f"![{caption}](figures/{name}.png)", "", f"*{caption}*", ""]
    parts.append("Per-layer diagnostics: tables/diagnostics.csv.")
    return "\n".join(parts) + "\n"


def _html(res, tables, figures, link) -> str:
    body = ["<h1>Component ablation report</h1>"] + [f"<p>{_inline(line)}</p>" for line in _header(res)]
    for name, (caption, png) in figures.items():
        data = base64.b64encode(png).decode()
        body.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for name, (columns, rows) in tables.items():
        if not rows:
            continue
        body.append(f"<h2>{html.escape(name.replace('_', ' ').title())}</h2><table><tr>" +
                    "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                 for r in rows]
        body.append("</table>")
    if link and link.get("note"):
        body.append(f"<p>Study link: {html.escape(link['note'])}</p>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;font-size:12px;"
             "display:block;overflow-x:auto}td,th{border:1px solid #ccc;padding:2px 5px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Component ablation</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(line: str) -> str:
    text = html.escape(line)
    if text.startswith("**") and text.endswith("**"):
        return f"<strong>{text[2:-2]}</strong>"
    return text
