"""``hybridlora lab report DIR``: the lab's results side by side, as ``DIR/report/report.md`` + ``report.html``
with PNG figures.

It reads whatever is under DIR: lab model directories (``config.json`` of model type ``hybridlora_lab``:
parameters per component via the component map, layer diagrams), pretraining runs (``lab_run.json`` +
``train_log.jsonl``: loss curves), probe results (``probes.jsonl``: probe table with intervals, long-context
extrapolation curves) and efficiency profiles (``efficiency.json`` from bench/bench_lab.py). Sections without
inputs say so. The report is written to a temporary directory and renamed into place.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..atomic import replace_dir
from ..errors import CliError

REPORT_DIR = "report"
SHORT = {"attention": "A", "gdn": "G", "mamba2": "M", "short_conv": "C"}


# --- gathering -------------------------------------------------------------------------------------
def _lab_model_dirs(root: Path) -> list[Path]:
    found = []
    for cfg in sorted(root.rglob("config.json")):
        if REPORT_DIR in cfg.parts or "checkpoints" in cfg.parts:
            continue
        try:
            if json.loads(cfg.read_text()).get("model_type") == "hybridlora_lab":
                found.append(cfg.parent)
        except (json.JSONDecodeError, OSError):
            continue
    return found


def architectures(root: Path) -> list[dict[str, Any]]:
    from ..components import build_component_map
    from ..models import build_meta_model, resolve_model

    rows = []
    for directory in _lab_model_dirs(root):
        config = resolve_model(str(directory)).config
        cmap = build_component_map(build_meta_model(config))
        diagram = " ".join("".join(SHORT.get(m, "?") for m in layer) for layer in config.layer_mixers)
        rows.append({"name": config.spec.get("name") or directory.name, "path": str(directory.relative_to(root)),
                     "topology": cmap.topology, "fusion": config.fusion if "+" in "".join(config.mixer_schedule) else "-",
                     "params": cmap.total_params, "target": config.spec.get("target_params") or None,
                     "width": config.hidden_size, "mlp": config.intermediate_size, "layers": diagram,
                     "by_component": cmap.totals_by_component()})
    return rows


def pretraining_runs(root: Path) -> list[dict[str, Any]]:
    runs = []
    for info_path in sorted(root.rglob("lab_run.json")):
        log = info_path.parent / "train_log.jsonl"
        if not log.is_file():
            continue
        info = json.loads(info_path.read_text())
        steps, losses, val = [], [], []
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "step":
                steps.append(rec["step"])
                losses.append(rec["loss"])
            elif rec.get("event") == "eval" and rec.get("val_loss") is not None:
                val.append((rec["step"], rec["val_loss"]))
        name = f"{info.get('spec')} ({info.get('variant')})" if info.get("variant") not in (None, "as-written") \
            else str(info.get("spec"))
        runs.append({"name": name, "path": str(info_path.parent.relative_to(root)), "steps": steps,
                     "loss": losses, "val": val, "info": info})
    return runs


def probe_rows(root: Path) -> list[dict[str, Any]]:
    from .probes import load_records, summarize

    records = []
    for path in sorted(root.rglob("probes.jsonl")):
        records += load_records(path.parent)
    return summarize(records) if records else []


def efficiency(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(root.rglob("efficiency.json")):
        data = json.loads(path.read_text())
        for name, arch in data.get("archs", {}).items():
            out.append({"name": name, "device": data.get("device"), **arch})
    return out


# --- figures ---------------------------------------------------------------------------------------
def _figure():
    from matplotlib.figure import Figure

    return Figure(figsize=(6.4, 3.6), layout="constrained")


def loss_figure(runs: list[dict[str, Any]]):
    fig = _figure()
    ax = fig.subplots()
    for run in runs:
        ax.plot(run["steps"], run["loss"], linewidth=1, label=run["name"])
        if run["val"]:
            ax.plot(*zip(*run["val"]), "o--", markersize=3, linewidth=0.8, label=f"{run['name']} (val)")
    ax.set_xlabel("step")
    values = [*(v for run in runs for v in run["loss"]), *(v for run in runs for _, v in run["val"])]
    # a model that learns its tasks outright ends decades below the others (the topology preset's parallel model:
    # 5.6 -> 8e-5): on a linear axis every curve would sit on zero after the first steps
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
    else:
        ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig


def extrapolation_figure(rows: list[dict[str, Any]]):
    fig = _figure()
    ax = fig.subplots()
    by_arch: dict[str, list[tuple[int, dict]]] = {}
    for r in rows:
        if r["probe"] == "long_context" and r["test"].startswith("x"):
            by_arch.setdefault(r["arch"], []).append((int(r["test"][1:]), r))
    for arch, points in sorted(by_arch.items()):
        points.sort()
        xs = [p[0] for p in points]
        ys = [p[1]["accuracy"] for p in points]
        lo = [p[1]["accuracy"] - p[1]["wilson95"][0] for p in points]
        hi = [p[1]["wilson95"][1] - p[1]["accuracy"] for p in points]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, linewidth=1, label=arch)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test length / training length")
    ax.set_ylabel("retrieval accuracy (Wilson 95%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig


def efficiency_figure(rows: list[dict[str, Any]], key: str, label: str):
    fig = _figure()
    ax = fig.subplots()
    for r in rows:
        points = [(x["length"], x[key]) for x in r.get("inference", []) if key in x]
        if points:
            ax.plot(*zip(*points), marker="o", linewidth=1, label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig


# --- writing ---------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.3f}"  # a loss of 8e-5 is not "0.000"
    return str(value)


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sections(root: Path) -> tuple[list[tuple[str, list[str], list[list[Any]]]], list[tuple[str, Any]], list[str]]:
    """(tables, figures, notes) of the report."""
    tables, figures, notes = [], [], []
    archs = architectures(root)
    if archs:
        comps = sorted({c for a in archs for c in a["by_component"]})
        tables.append(("Architectures (parameters per component; layers: A attention, G Gated DeltaNet, M Mamba-2, "
                       "C short conv, two letters = one parallel layer)",
                       ["architecture", "topology", "fusion", "params", "target", "width", "MLP", "layers", *comps],
                       [[a["name"], a["topology"], a["fusion"], a["params"], a["target"], a["width"], a["mlp"],
                         a["layers"], *[a["by_component"].get(c, 0) for c in comps]] for a in archs]))
    else:
        notes.append("No lab model directories under this folder (`hybridlora lab build SPEC --variants --output DIR`).")
    runs = pretraining_runs(root)
    if runs:
        tables.append(("Pretraining", ["run", "steps", "first loss", "last loss", "validation loss", "tokens/epoch",
                                       "epochs", "parameter match"],
                       [[r["name"], len(r["steps"]), r["loss"][0] if r["loss"] else None,
                         r["loss"][-1] if r["loss"] else None, r["val"][-1][1] if r["val"] else None,
                         r["info"].get("train_tokens_per_epoch"), r["info"].get("epochs"),
                         f"{100 * r['info'].get('match', {}).get('relative_error', float('nan')):+.2f}%"] for r in runs]))
        figures.append(("Pretraining loss", loss_figure(runs)))
    else:
        notes.append("No pretraining runs (`hybridlora lab pretrain`).")
    probes = probe_rows(root)
    if probes:
        tables.append(("Probes (per answer token; Wilson 95% pooled over seeds; seed mean with Student-t 95%)",
                       ["architecture", "probe", "test", "accuracy", "Wilson 95%", "seeds", "seed mean", "t 95%"],
                       [[p["arch"], p["probe"], p["test"], p["accuracy"],
                         f"[{p['wilson95'][0]:.3f}, {p['wilson95'][1]:.3f}]", len(p["seeds"]), p["seed_mean"],
                         f"[{_fmt(p['seed_t95'][0])}, {_fmt(p['seed_t95'][1])}]"] for p in probes]))
        if any(p["probe"] == "long_context" for p in probes):
            figures.append(("Long-context retrieval against length", extrapolation_figure(probes)))
    else:
        notes.append("No probe results (`hybridlora lab probe`).")
    eff = efficiency(root)
    trained = [e for e in eff if "training" in e]  # `bench_lab.py --loop none` measures inference only
    if trained:
        tables.append(("Training efficiency", ["architecture", "device", "params", "batch × length", "tokens/s",
                                               "MFU", "peak GiB"],
                       [[e["name"], e["device"], e["params"], f"{e['training']['batch']} × {e['training']['seq_len']}",
                         round(e["training"]["tokens_per_s"]), f"{100 * e['training']['mfu']:.1f}%",
                         e["training"].get("peak_mem_gib")] for e in trained]))
    inference = [[e["name"], e["device"], x["length"], *((x["error"], None, None) if "error" in x else
                 (round(x["prefill_tokens_per_s"]), round(x["decode_tokens_per_s"]), x.get("decode_peak_mem_gib")))]
                 for e in eff for x in e.get("inference", [])]
    if inference:
        tables.append(("Inference (batch 1; prefill tokens/s, decode tokens/s as the marginal step)",
                       ["architecture", "device", "context", "prefill tok/s", "decode tok/s", "decode peak GiB"],
                       inference))
    if eff:
        figures.append(("Prefill throughput", efficiency_figure(eff, "prefill_tokens_per_s", "prefill tokens/s")))
        figures.append(("Decode throughput", efficiency_figure(eff, "decode_tokens_per_s", "decode tokens/s")))
    else:
        notes.append("No efficiency profile (`python bench/bench_lab.py --out DIR/efficiency`).")
    return tables, figures, notes


def build_report(root: str | Path) -> Path:
    from ..analysis.figures import slug, to_png

    root = Path(root)
    if not root.is_dir():
        raise CliError(f"{root} is not a directory; give the folder holding lab models, runs and results")
    tables, figures, notes = _sections(root)
    if not tables:
        raise CliError(f"{root}: nothing to report ({' '.join(notes)})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{REPORT_DIR}.", dir=root))
    md = [f"# Architecture lab report: {root.name}", ""] + [f"- {n}" for n in notes] + [""]
    body = [f"<h1>Architecture lab report: {html.escape(root.name)}</h1>"]
    body += [f"<p>{html.escape(n)}</p>" for n in notes]
    for title, headers, rows in tables:
        md += [f"## {title}", "", _md_table(headers, rows), ""]
        body.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                    + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
                                        for row in rows) + "</table>")
    for title, fig in figures:
        png = to_png(fig)
        name = f"{slug(title)}.png"
        (tmp / name).write_bytes(png)
        md += [f"## {title}", "", f"![{title}]({name})", ""]
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                    f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    (tmp / "report.md").write_text("\n".join(md), encoding="utf-8")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}img{max-width:100%}"
    (tmp / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style>"
                                     f"</head><body>{''.join(body)}</body></html>", encoding="utf-8")
    out = root / REPORT_DIR
    replace_dir(tmp, out)
    os.chmod(out, 0o755)
    return out


def register_cli(sub) -> None:
    p = sub.add_parser("report", help="lab report: architectures, loss curves, probes, extrapolation, efficiency")
    p.add_argument("dir", help="folder holding lab model directories, pretraining runs, probe results, efficiency.json")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    out = build_report(args.dir)
    print(f"report: {out / 'report.html'} (and report.md)")
    return 0
