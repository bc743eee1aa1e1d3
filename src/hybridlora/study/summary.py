"""What a study tells the terminal: the notes of its cells once, the headline of its report, how to resume, and
the progress of a running or stopped study (``hybridlora study DIR --status``)."""
from __future__ import annotations

import csv
import shlex
import socket
from collections import defaultdict
from pathlib import Path

from .store import Store, owner_alive


# ---------------------------------------------------------------------------------------------- notes
def cell_notes(study_dir: Path, ids: list[str]) -> list[str]:
    """One line per benchmark whose prompts lost few-shot examples, over every complete cell of ``ids``
    (each cell's own note stays in its ``runs/<job>/eval/summary.json``)."""
    kept: dict[str, list[float]] = defaultdict(list)
    facts: dict[str, tuple] = {}
    store = Store(study_dir, create=False)
    try:
        for job in store.jobs(ids):
            if job["status"] != "complete":
                continue
            for bench, summary in store.metrics(job["id"]).items():
                if summary.get("fewshot_note") and summary.get("mean_fewshot_kept") is not None:
                    kept[bench].append(summary["mean_fewshot_kept"])
                    facts[bench] = (summary.get("num_fewshot"), (summary.get("settings") or {}).get("max_length"))
    finally:
        store.close()
    lines = []
    for bench, values in kept.items():
        shots, limit = facts[bench]
        span = f"{min(values):.1f}" if min(values) == max(values) else f"{min(values):.1f}–{max(values):.1f}"
        lines.append(f"note: {bench}: prompts kept {span} of {shots} few-shot examples on average in {len(values)} "
                     f"cell(s) (context limit {limit} tokens); raise eval.max_length to keep more")
    return lines


# ---------------------------------------------------------------------------------------------- headline
def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _pp(text: str) -> str:
    return f"{float(text):+.2f}"


def headline_lines(report_html: Path) -> list[str]:
    """Per model and training domain: the recommended placement and its gain over the base model on the domain's
    own benchmark(s), with the 95% paired-bootstrap interval — read from the report's tables."""
    tables = Path(report_html).parent / "tables"
    targets = {(r["model"], r["train_domain"], r["benchmark"]) for r in _read_csv(tables / "deltas.csv")
               if r["target"] == "true"}
    vs_base = [r for r in _read_csv(tables / "paired_bootstrap.csv") if r["reference"] == "base"]
    out: dict[str, list[str]] = {}
    for rec in _read_csv(tables / "recipe.csv"):
        model, domain, pick = rec["model"], rec["train_domain"], rec["recommended"]
        if not pick:
            out.setdefault(model, []).append(f"{domain}: no recommendation ({rec['note'] or 'see the report'})")
            continue
        gains = [f"{r['benchmark']} {_pp(r['mean_diff'])} pp [{_pp(r['ci_low'])}, {_pp(r['ci_high'])}]"
                 for r in vs_base if (r["model"], r["train_domain"], r["placement_a"]) == (model, domain, pick)
                 and (model, domain, r["benchmark"]) in targets]
        gain = "; ".join(gains) if gains else "no target benchmark scored"
        out.setdefault(model, []).append(f"{domain}: {pick} (vs base: {gain})")
    return [f"{model}: " + " | ".join(parts) for model, parts in out.items()]


# ---------------------------------------------------------------------------------------------- resume
def resume_command(config_arg: str | None, study_dir: Path, only: str | None) -> str:
    parts = ["hybridlora", "study"] + ([config_arg] if config_arg else []) + ["--output", str(study_dir)]
    if only:
        parts += ["--only", only]
    return shlex.join(parts)


# ---------------------------------------------------------------------------------------------- status
def _state(job: dict) -> str:
    if job["status"] != "running":
        return job["status"]
    if owner_alive(job["owner"] or "", me=""):
        host, pid = (job["owner"] or "?|?").split("|")[:2]
        where = f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"
        return f"running ({where})"
    return "stopped (its runner is gone; re-run the study to resume it)"


def status_lines(study_dir: Path) -> list[str]:
    """The grid of a study directory, job by job, and what to do next."""
    store = Store(study_dir, create=False)
    try:
        jobs = store.jobs()
        config = store.get("config") or {}
    finally:
        store.close()
    rows = [(j["id"], j["model"], j["placement"], j["train_domain"], "" if j["seed"] is None else str(j["seed"]),
             _state(j), "" if j["wall_s"] is None else f"{j['wall_s']:.0f} s") for j in jobs]
    headers = ("job", "model", "placement", "domain", "seed", "state", "wall")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r[5].split(" ")[0]] += 1
    done = counts["complete"]
    lines = [f"study {config.get('name', '?')!r} in {study_dir}: {done}/{len(jobs)} cells complete"
             + "".join(f", {n} {k}" for k, n in counts.items() if k != "complete" and n)]
    lines += [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    report = Path(study_dir) / "report" / "report.html"
    if report.is_file():
        partial = "PARTIAL report" in report.read_text(encoding="utf-8", errors="replace")[:4000]
        lines.append(f"report: {report}" + (" (partial: written before every cell was complete)" if partial else ""))
    if counts["running"]:
        lines.append("in progress: the same `hybridlora study` command run again joins the running runner(s)")
    elif counts["stopped"] or counts["pending"] or counts["failed"]:
        lines.append("to continue: run the same `hybridlora study` command again (finished cells are kept)")
    return lines
