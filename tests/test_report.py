"""The study report: files, exact CSV columns, the published study end to end, atomic output, CLI.

The published study's accuracy matrix is checked against values computed here by reading the
raw gzipped JSONL files directly (not through the importer).
"""
from __future__ import annotations

import base64
import contextlib
import csv
import gzip
import html as html_lib
import io
import json
import math
import re
from pathlib import Path

import pytest

from hybridlora.analysis import report as report_module
from hybridlora.analysis.contract import InstanceRecord, RunInfo
from hybridlora.analysis.figures import FigureSet
from hybridlora.analysis.report import ReportError, build_report, tex_escape
from hybridlora.analysis.results import StudyResults
from hybridlora.cli import main

ACCURACY_COLUMNS = ["model", "placement", "train_domain", "seed", "benchmark", "n", "correct", "accuracy",
                    "wilson_low", "wilson_high"]
PAIRED_COLUMNS = ["model", "train_domain", "benchmark", "placement_a", "placement_b", "n_shared", "mean_diff",
                  "ci_low", "ci_high"]
MODELS = {"qwen3_5_0_8b_base": "Qwen/Qwen3.5-0.8B-Base", "falcon_h1_0_5b_base": "tiiuae/Falcon-H1-0.5B-Base"}
DOMAINS = {"gsm8k_train": "gsm8k", "codealpaca": "codealpaca", "ultrachat": "chat"}
Z = 1.959963984540054


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def raw_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- a small synthetic study

M = "toy/hybrid"


def toy_study(notes=("demo numbers carry no scientific meaning",)) -> StudyResults:
    """Base + 3 placements x 1 domain x 2 seeds on 2 benchmarks, with params, traces and norms."""
    params = {"all": 3000, "attn": 1000, "mlp": 2000}
    records, runs = [], [RunInfo(M, "base", "base", None, 0)]
    for bench, base_k in (("gsm8k", 4), ("mmlu", 6)):
        records += [InstanceRecord(M, "base", "base", None, bench, str(i), i < base_k) for i in range(10)]
    curves, norms = {}, {}
    for p_i, placement in enumerate(params):
        for seed in (1, 2):
            runs.append(RunInfo(M, placement, "gsm8k", seed, params[placement]))
            for bench, k in (("gsm8k", 6 + p_i % 2 + seed % 2), ("mmlu", 5 + p_i)):
                records += [InstanceRecord(M, placement, "gsm8k", seed, bench, str(i), i < k) for i in range(10)]
            key = (M, placement, "gsm8k", seed)
            curves[key] = [{"step": s, "loss": 2.0 / s} for s in range(1, 6)]
            norms[key] = [{"step": s, "norms": {"attention": 0.1 * s, "mlp": 0.05 * s}} for s in range(1, 6)]
    return StudyResults(
        records=records, runs=runs, title="Toy study_with_underscores", notes=list(notes),
        full_placement={M: "all"}, curves=curves, norms=norms,
        params_by_component={(M, "all"): {"attention": 1000, "mlp": 2000}, (M, "attn"): {"attention": 1000},
                             (M, "mlp"): {"mlp": 2000}},
        metadata={"config": {"rank": 8}, "versions": {"torch": "x"}})


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "report"
    paths = build_report(toy_study(), out, resamples=200, seed=0, progress=False)
    return out, paths


def test_toy_report_files_and_all_figures(toy_report):
    out, paths = toy_report
    for rel in ("report.html", "report.md", "tables/accuracy.csv", "tables/accuracy.tex",
                "tables/paired_bootstrap.csv", "tables/recipe.csv", "tables/seed_comparisons.csv"):
        assert rel in paths and paths[rel] == out / rel and paths[rel].is_file(), rel
    html = (out / "report.html").read_text(encoding="utf-8")
    for name in ("accuracy_heatmap", "delta_heatmap", "transfer_matrix", "pareto", "params", "component_params",
                 "loss_curves", "norms"):
        assert f'id="fig-{name}' in html, name
        assert any(p.name.startswith(name) for p in (out / "figures").glob("*.png")), name
    assert "Skipped figures" not in html
    # notes come first, before any result
    assert html.index("demo numbers carry no scientific meaning") < html.index("Where should LoRA go?")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.index("demo numbers carry no scientific meaning") < md.index("## Where should LoRA go?")
    assert '"rank": 8' in html_lib.unescape(html)  # metadata appendix


def test_toy_recipe_and_seed_tables(toy_report):
    out, _ = toy_report
    _, recipe = read_csv(out / "tables/recipe.csv")
    # mean accuracy (gsm8k, mmlu; seed 1, seed 2): all (0.7, 0.5; 0.6, 0.5) -> 0.575,
    # attn (0.8, 0.6; 0.7, 0.6) -> 0.675, mlp (0.7, 0.7; 0.6, 0.7) -> 0.675; threshold 0.95 * 0.575:
    # all qualify, attn has the fewest params (1000)
    assert len(recipe) == 1
    assert float(recipe[0]["full_mean_accuracy"]) == pytest.approx(0.575)
    assert float(recipe[0]["threshold"]) == pytest.approx(0.95 * 0.575)
    assert recipe[0]["recommended"] == "attn" and recipe[0]["qualifying"] == "attn;mlp;all"
    assert float(recipe[0]["ratio_to_full"]) == pytest.approx(0.675 / 0.575)
    header, seeds = read_csv(out / "tables/seed_comparisons.csv")
    assert {r["k_seeds"] for r in seeds} == {"2"}
    _, acc = read_csv(out / "tables/accuracy.csv")
    assert {r["seed"] for r in acc if r["placement"] == "base"} == {""}


def test_tex_escapes_underscores(toy_report):
    out, _ = toy_report
    tex = (out / "tables/accuracy.tex").read_text(encoding="utf-8")
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    assert "train\\_domain" in tex and "wilson\\_low" in tex
    assert not any(re.search(r"(?<!\\)_", line) for line in body)
    assert tex_escape("a_b & 50% #1 {x} $y ~ ^ \\") == \
        "a\\_b \\& 50\\% \\#1 \\{x\\} \\$y \\textasciitilde{} \\textasciicircum{} \\textbackslash{}"


# --------------------------------------------------------------------------- the published study, via the CLI


@pytest.fixture(scope="module")
def published_dir(data_dir: Path) -> Path:
    return data_dir / "published" / "lora-placement-hybrid"


@pytest.fixture(scope="module")
def published_report(published_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("published") / "report"
    code, stdout, stderr = run_cli("report", "--import", str(published_dir), "--output", str(out),
                                   "--resamples", "200", "--no-progress", "--note", "re-analysis test")
    assert code == 0, stderr
    return out, stdout


def test_cli_import_prints_report_path(published_report):
    out, stdout = published_report
    assert stdout.strip().splitlines()[-1] == str((out / "report.html").absolute())
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


def _independent_accuracy(published_dir: Path) -> dict:
    """{(model, placement, domain, seed, bench): (n_scored, correct, n_rows)} from the raw files."""
    out = {}
    for path in sorted(published_dir.glob("*.jsonl.gz")):
        f = path.name[: -len(".jsonl.gz")].split("__")
        if f[0] == "train":
            key = (MODELS[f[1]], f[2], DOMAINS[f[3]], f[4][len("seed"):], f[6])
        else:
            key = (MODELS[f[0]], "base", "base", "", f[2])
        rows = raw_rows(path)
        scored = [r["correct"] for r in rows if r.get("correct") is not None]
        out[key] = (len(scored), sum(scored), len(rows))
    return out


def test_published_accuracy_matrix_matches_raw_files(published_report, published_dir):
    out, _ = published_report
    header, rows = read_csv(out / "tables/accuracy.csv")
    assert header == ACCURACY_COLUMNS
    expected = _independent_accuracy(published_dir)
    got = {(r["model"], r["placement"], r["train_domain"], r["seed"], r["benchmark"]): r for r in rows}
    assert set(got) == set(expected) and len(rows) == 164
    for key, (n, k, _) in expected.items():
        row = got[key]
        assert int(row["n"]) == n, key
        if n == 0:
            continue
        assert int(row["correct"]) == k, key
        assert float(row["accuracy"]) == pytest.approx(k / n, abs=1e-9), key
        low, high = wilson(k, n)
        assert float(row["wilson_low"]) == pytest.approx(low, abs=1e-9), key
        assert float(row["wilson_high"]) == pytest.approx(high, abs=1e-9), key
    # a known value: Falcon base ARC-Challenge 222/299
    falcon_arc = got[("tiiuae/Falcon-H1-0.5B-Base", "base", "base", "", "arc_challenge")]
    assert (falcon_arc["n"], falcon_arc["correct"]) == ("299", "222")


def test_published_humaneval_is_not_scored(published_report):
    out, _ = published_report
    _, rows = read_csv(out / "tables/accuracy.csv")
    he = [r for r in rows if r["benchmark"] == "humaneval"]
    assert len(he) == 12
    assert all(r["accuracy"] == "not scored" and r["correct"] == "" and r["n"] == "0" for r in he)
    assert all(r["wilson_low"] == "" for r in he)
    _, paired = read_csv(out / "tables/paired_bootstrap.csv")
    assert not any(r["benchmark"] == "humaneval" for r in paired)
    _, gaps = read_csv(out / "tables/comparison_gaps.csv")
    assert {r["benchmark"] for r in gaps} == {"humaneval"} and {r["reason"] for r in gaps} == {"not scored"}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "not scored" in md and "re-analysis test" in md


def test_published_paired_table_uses_shared_ids(published_report, published_dir):
    out, _ = published_report
    header, rows = read_csv(out / "tables/paired_bootstrap.csv")
    assert header[:9] == PAIRED_COLUMNS
    assert {"mcnemar_p", "p_holm"} <= set(header[9:])
    row = [r for r in rows if (r["model"], r["train_domain"], r["benchmark"], r["placement_a"], r["placement_b"])
           == ("Qwen/Qwen3.5-0.8B-Base", "codealpaca", "gsm8k", "mlp_only", "base")]
    assert len(row) == 1 and row[0]["n_shared"] == "128"   # base has 128 ids, the run 256
    tuned = raw_rows(published_dir / ("train__qwen3_5_0_8b_base__mlp_only__codealpaca__seed3407__inline_eval"
                                      "__gsm8k.jsonl.gz"))
    base = raw_rows(published_dir / "qwen3_5_0_8b_base__base__gsm8k.jsonl.gz")
    shared = {r["example_id"] for r in base}
    diff = 100 * (sum(r["correct"] for r in tuned if r["example_id"] in shared) - sum(r["correct"] for r in base))
    assert float(row[0]["mean_diff"]) == pytest.approx(diff / len(shared), abs=1e-6)
    assert float(row[0]["ci_low"]) <= float(row[0]["mean_diff"]) <= float(row[0]["ci_high"])
    # every placement of each model is compared with base and (but the full one) with the full placement
    refs = {(r["placement_a"], r["placement_b"]) for r in rows if r["model"] == "Qwen/Qwen3.5-0.8B-Base"}
    assert ("softmax_only", "all_layers") in refs and ("all_layers", "all_layers") not in refs


def test_published_report_html_is_self_contained(published_report):
    out, _ = published_report
    html = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)
    assert "<link" not in html.lower() and not re.search(r"<script[^>]+src", html, flags=re.I)
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(images) == 6  # accuracy, delta and transfer heatmaps for two models
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # figures that need parameter counts or training traces are listed as skipped
    assert "Skipped figures" in html and "pareto__qwen-qwen3-5-0-8b-base" in html and "loss_curves" in html
    assert "Where should LoRA go?" in html and "Forgetting" in html


# --------------------------------------------------------------------------- atomic output


def _tiny() -> StudyResults:
    recs = [InstanceRecord(M, "base", "base", None, "b", str(i), i < 2) for i in range(4)]
    recs += [InstanceRecord(M, "all", "d", 1, "b", str(i), i < 3) for i in range(4)]
    return StudyResults(records=recs, runs=[RunInfo(M, "base", "base", None, 0), RunInfo(M, "all", "d", 1, 10)])


def test_failure_mid_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom while writing report.html")

    monkeypatch.setattr(report_module, "_html", broken)
    with pytest.raises(RuntimeError, match="boom"):
        build_report(_tiny(), tmp_path / "out", resamples=20, progress=False)
    assert list(tmp_path.iterdir()) == []   # no report, no temporary directory


def test_failure_keeps_the_older_report_and_success_replaces_it(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "render_figures", lambda tables: FigureSet())  # speed: no drawing
    out = tmp_path / "out"
    build_report(_tiny(), out, resamples=20, progress=False)
    (out / "stale.txt").write_text("from the old report")
    before = (out / "report.md").read_text(encoding="utf-8")
    original_write_tex = report_module._write_tex

    monkeypatch.setattr(report_module, "_write_tex", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        build_report(_tiny(), out, resamples=20, progress=False)
    assert (out / "report.md").read_text(encoding="utf-8") == before and (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    monkeypatch.setattr(report_module, "_write_tex", original_write_tex)
    build_report(_tiny(), out, resamples=20, progress=False)
    assert not (out / "stale.txt").exists() and (out / "report.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_replace_a_directory_that_is_not_a_report(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(ReportError, match="refusing"):
        build_report(_tiny(), out, resamples=20, progress=False)
    assert (out / "thesis.tex").read_text() == "do not delete"
    with pytest.raises(ReportError, match="no evaluation records"):
        build_report(StudyResults(records=[], runs=[]), tmp_path / "empty", progress=False)


# --------------------------------------------------------------------------- CLI errors and options


def test_cli_bad_directory_is_one_clear_line(tmp_path):
    code, out, err = run_cli("report", "--import", str(tmp_path / "nope"), "--output", str(tmp_path / "r"))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "no such directory" in err and err.count("\n") == 1
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    code, _, err = run_cli("report", "--import", str(tmp_path / "junk"), "--output", str(tmp_path / "r"))
    assert code == 2 and "unrecognised results layout" in err and err.count("\n") == 1
    code, _, err = run_cli("report", str(tmp_path / "nope"))
    assert code == 2 and "no such study directory" in err
    code, _, err = run_cli("report")
    assert code == 2 and "exactly one" in err
    code, _, err = run_cli("report", "--import", str(tmp_path / "junk"))
    assert code == 2 and "--output" in err
    assert not (tmp_path / "r").exists()


def _write_generic(root: Path, *, empty=False) -> None:
    root.mkdir()
    runs = []
    for placement, domain, seed, k in (("base", "base", None, 2), ("all_x", "gsm8k", 1, 3), ("small", "gsm8k", 1, 3)):
        name = f"{placement}.jsonl"
        lines = [] if empty else [json.dumps({"example_id": i, "correct": int(i < k)}) for i in range(4)]
        (root / name).write_text("\n".join(lines) + "\n")
        runs.append({"model": "m", "placement": placement, "train_domain": domain, "seed": seed,
                     "files": {"gsm8k": name}})
    (root / "manifest.json").write_text(json.dumps({"runs": runs}))


def test_cli_generic_import_with_params_and_full_placement(tmp_path):
    _write_generic(tmp_path / "res")
    (tmp_path / "params.json").write_text(json.dumps({"m": {"all_x": 100, "small": 10}}))
    out = tmp_path / "rep"
    code, stdout, err = run_cli("report", "--import", str(tmp_path / "res"), "--output", str(out), "--resamples",
                                "50", "--no-progress", "--params", str(tmp_path / "params.json"),
                                "--full-placement", "m=all_x", "--title", "Generic_import")
    assert code == 0, err
    assert stdout.strip() == str((out / "report.html").absolute())
    _, recipe = read_csv(out / "tables/recipe.csv")
    assert (recipe[0]["full_placement"], recipe[0]["full_source"], recipe[0]["recommended"]) == \
        ("all_x", "given", "small")
    assert "<title>Generic_import</title>" in (out / "report.html").read_text(encoding="utf-8")
    # a bad params file and a bad --full-placement are one-line errors
    (tmp_path / "bad.json").write_text(json.dumps({"m": {"small": -1}}))
    code, _, err = run_cli("report", "--import", str(tmp_path / "res"), "--output", str(out),
                           "--params", str(tmp_path / "bad.json"))
    assert code == 2 and "--params" in err
    code, _, err = run_cli("report", "--import", str(tmp_path / "res"), "--output", str(out),
                           "--full-placement", "all_x")
    assert code == 2 and "MODEL=PLACEMENT" in err


def test_cli_no_records_is_an_error(tmp_path):
    _write_generic(tmp_path / "res", empty=True)
    code, _, err = run_cli("report", "--import", str(tmp_path / "res"), "--output", str(tmp_path / "rep"))
    assert code == 2 and "no evaluation records" in err
    assert not (tmp_path / "rep").exists()


def test_plan_params_fills_the_published_study_counts_from_our_planner(data_dir, tmp_path):
    """The published folder has no parameter counts; --plan-params plans the study presets at r=16 so the
    recipe and Pareto front can be computed, and the report says where the counts came from."""
    from hybridlora.cli import main

    out = tmp_path / "pub"
    folder = data_dir / "published" / "lora-placement-hybrid"
    assert main(["report", "--import", str(folder), "--output", str(out), "--resamples", "20", "--no-progress",
                 "--plan-params", "16"]) == 0
    md = (out / "report.md").read_text()
    assert "were planned by hybridlora (rank 16" in md
    # Values equal `hybridlora plan <model> --preset study` (tests/test_placement.py checks those against PEFT).
    assert "| Qwen/Qwen3.5-0.8B-Base | chat | all_layers | most trainable params |" in md
    assert "softmax_only | 1,081,344" in md and "attention_only | 2,211,840" in md
