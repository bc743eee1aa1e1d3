"""The `paper` preset's wall time on one GPU, projected from the benches' measured rates (docs/PERFORMANCE.md).

The grid comes from the preset itself (through the study's own config and grid code): per model, its training
cells (each domain's examples, epochs and batch give the optimizer steps) and its evaluations (each cell plus
the base model), the multiple-choice items per evaluation and the generation benchmarks with their new tokens.
The rates come from the raw output of three benches, on whatever GPU they ran:

* ``--train-loop``: ``bench_train_loop.py`` JSON with the study-length section (``real``, mode ``graphs``):
  seconds per optimizer step per domain, and the seconds of the steps that captured a CUDA graph;
* ``--decode``: ``bench_decode.py`` JSON: seconds per decode step (graph path) and the setup of each
  generation benchmark's shape;
* ``--mc``: ``bench_gpu.py`` JSON(s) with a model's multiple-choice section: seconds per question with the
  adapter unmerged, as the study evaluates.

Later files replace earlier ones per model and section. Everything counted is an upper bound in the same way as
the benches: generation runs to the benchmark's max new tokens (no early stop), decode-graph rates are the base
model's (a merged adapter's cost; the study evaluates unmerged), and the graph captures per cell are an
assumption (``--captures-per-cell``, 5: the H100 notes' 90 captures for a model's 18 cells), each costed at the
fastest measured capture, plus once the measured captures' excess over it (a machine's first capture of a row
length also autotunes), with every capture at the slowest measured as the bound. Not counted: building and
loading models, merging, the report.

    python bench/project_paper.py --train-loop T.json --decode D.json --mc Q.json F.json [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_train_loop import MODELS  # noqa: E402  (the benches' model keys -> catalog name, placement)

BENCH_MODELS = {key: catalog_name for key, (catalog_name, _) in MODELS.items()}
PRESET = "paper"


def preset_work(preset: str = PRESET) -> dict:
    """Per bench model key: its training cells' (domain, optimizer steps) and its evaluation work."""
    from hybridlora.evaluate.runner import get_benchmark
    from hybridlora.models import catalog
    from hybridlora.study.config import load_study_config
    from hybridlora.study.grid import expand_grid

    config = load_study_config(preset)
    jobs = expand_grid(config)
    limits = {b: min(n or math.inf, config.eval.limit or math.inf) for b, n in config.eval.benchmarks.items()}
    generation = {b: (int(n), get_benchmark(b).MAX_NEW_TOKENS) for b, n in limits.items()
                  if get_benchmark(b).KIND == "generate"}
    mc_items = int(sum(n for b, n in limits.items() if b not in generation))
    out = {}
    for key, name in BENCH_MODELS.items():
        hub_id = catalog()[name]["hub_id"]
        mine = [j for j in jobs if j.spec["model"]["model"] == hub_id]
        cells = []
        for job in (j for j in mine if j.kind == "train"):
            train, domain = job.spec["train"], job.spec["domain"]
            per_step = train["micro_batch_size"] * train["grad_accum"]
            cells.append((domain["train_domain"], math.ceil(domain["max_examples"] / per_step) * train["epochs"]))
        out[key] = {"cells": cells, "evaluations": len(mine), "mc_items": mc_items, "generation": generation}
    return out


def _read(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        try:
            out.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            print(f"error: cannot read bench output {path}: {exc}; give the JSON file a bench wrote", file=sys.stderr)
            raise SystemExit(2) from None
    return out


def training_rates(files: list[dict], key: str) -> dict | None:
    """{domain: s per step}, capture seconds, from the ``real`` sections' graph runs (later files win)."""
    found = None
    for data in files:
        real = (data.get(key) or {}).get("real") or {}
        per_domain = {name.split()[0]: row["s_per_step_median"] for name, row in real.items()
                      if name.endswith(" graphs") and "s_per_step_median" in row}
        if per_domain:
            captures = [s for name, row in real.items() if name.endswith(" graphs") for s in row.get("capture_step_s", [])]
            found = {"s_per_step": per_domain, "capture_s": captures}
    return found


def decode_rates(files: list[dict], key: str) -> dict:
    """{benchmark: (s per step, setup s, batch)} of the graph path (later files win)."""
    found = {}
    for data in files:
        for bench, shape in ((data.get(key) or {}).items()):
            graph = shape.get("graph") if isinstance(shape, dict) else None
            if graph and "s_per_step" in graph:
                found[bench] = (graph["s_per_step"], graph.get("setup_s", 0.0), shape["batch"])
    return found


def mc_rate(files: list[dict], key: str) -> float | None:
    found = None
    for data in files:
        section = (data.get("sections") or {}).get(f"{key}_mc_eval") or {}
        found = section.get("fast_adapter_s_per_question", found)
    return found


def project(work: dict, train: dict | None, decode: dict, mc_s: float | None, captures_per_cell: int) -> dict:
    """Hours per part for one model; a part whose rate was not measured says so instead of a number."""
    missing = []
    row: dict = {}
    if train and all(domain in train["s_per_step"] for domain, _ in work["cells"]):
        row["train_h"] = sum(steps * train["s_per_step"][domain] for domain, steps in work["cells"]) / 3600
        if train["capture_s"]:
            # A capture whose kernels are tuned costs the fastest one measured; the first capture of each row
            # length on a machine also autotunes (fla's norms: once per machine, kept on disk), so the measured
            # captures' excess over that is added once. The bound: every capture as slow as the slowest.
            n, measured = captures_per_cell * len(work["cells"]), train["capture_s"]
            once = sum(measured) - len(measured) * min(measured)
            row["captures_h"] = (n * min(measured) + once) / 3600
            row["captures_h_bound"] = n * max(measured) / 3600
        else:
            missing.append("graph capture seconds")
    else:
        missing.append("study-length training (bench_train_loop.py real section, graphs)")
    if mc_s is not None:
        row["mc_h"] = work["evaluations"] * work["mc_items"] * mc_s / 3600
    else:
        missing.append("multiple choice (bench_gpu.py MC section)")
    if all(b in decode for b in work["generation"]):
        per_eval = 0.0
        for bench, (items, new_tokens) in work["generation"].items():
            s_step, setup, batch = decode[bench]
            per_eval += math.ceil(items / batch) * (new_tokens * s_step + setup)
        row["generation_h"] = work["evaluations"] * per_eval / 3600
        row["generation_s_per_evaluation"] = per_eval
    else:
        missing += [f"decode shape {b}" for b in work["generation"] if b not in decode]
    parts = ("train_h", "captures_h", "mc_h", "generation_h")
    if not missing:
        row["total_h"] = sum(row[p] for p in parts)
        row["total_h_bound"] = row["total_h"] - row["captures_h"] + row["captures_h_bound"]
    row["missing"] = missing
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-loop", nargs="+", default=[], help="bench_train_loop.py JSON file(s)")
    ap.add_argument("--decode", nargs="+", default=[], help="bench_decode.py JSON file(s)")
    ap.add_argument("--mc", nargs="+", default=[], help="bench_gpu.py JSON file(s) with MC sections")
    ap.add_argument("--captures-per-cell", type=int, default=5)
    ap.add_argument("--json", help="also write the projection here")
    args = ap.parse_args(argv)
    work = preset_work()
    train_files, decode_files, mc_files = _read(args.train_loop), _read(args.decode), _read(args.mc)
    result = {"preset": PRESET, "captures_per_cell": args.captures_per_cell, "models": {}}
    for key in BENCH_MODELS:
        result["models"][key] = project(work[key], training_rates(train_files, key), decode_rates(decode_files, key),
                                        mc_rate(mc_files, key), args.captures_per_cell)
    rows = result["models"].values()
    if all("total_h" in r for r in rows):
        result["total_h"] = sum(r["total_h"] for r in rows)
        result["total_h_bound"] = sum(r["total_h_bound"] for r in rows)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def format_table(result: dict) -> str:
    parts = [("training, steady state", "train_h"), ("graph captures", "captures_h"), ("multiple choice", "mc_h"),
             ("generation", "generation_h"), ("total", "total_h")]
    keys = list(result["models"])
    lines = [f"`{result['preset']}` projection, hours on one GPU", "| part | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for label, field in parts:
        cells = []
        for key in keys:
            row = result["models"][key]
            value = row.get(field)
            bound = row.get(f"{field}_bound")
            cells.append("not measured" if value is None else f"{value:.3f}" + (f" (≤ {bound:.3f})" if bound else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key in keys:
        if result["models"][key]["missing"]:
            lines.append(f"{key}: not measured: {', '.join(result['models'][key]['missing'])}")
    if "total_h" in result:
        lines.append(f"both models: {result['total_h']:.2f} h (≤ {result['total_h_bound']:.2f} h)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
