"""``hybridlora report --import DIR --score-code``: the published study's unscored HumanEval completions executed.

A small copy of the published layout (the first rows of a few real files, in a temporary folder) keeps the
test short; the full folder is scored by the command in docs/EVALUATION.md.
"""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from hybridlora.analysis.code_scoring import SCORED_BENCHMARK, SCORED_FILE
from hybridlora.analysis.importer import load_results
from hybridlora.cli import EXIT_USAGE, main

ROWS = 12
RUNS = ("softmax_only", "mlp_only")


def _rows(path: Path, n: int = ROWS) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle][:n]


@pytest.fixture()
def small_published(data_dir, tmp_path) -> Path:
    source = data_dir / "published" / "lora-placement-hybrid"
    folder = tmp_path / "published"
    folder.mkdir()
    names = ["qwen3_5_0_8b_base__base__arc_challenge.jsonl.gz"]
    for placement in RUNS:
        for bench in ("humaneval", "arc_challenge"):
            names.append(f"train__qwen3_5_0_8b_base__{placement}__codealpaca__seed3407__inline_eval__{bench}.jsonl.gz")
    for name in names:
        rows = _rows(source / name)
        (folder / name).write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return folder


def test_importer_keeps_the_completions(small_published):
    result = load_results(small_published)
    he = [k for k in result.completions if k[4] == "humaneval"]
    assert len(he) == ROWS * len(RUNS)
    raw = _rows(small_published / f"train__qwen3_5_0_8b_base__{RUNS[0]}__codealpaca__seed3407__inline_eval__"
                                   "humaneval.jsonl.gz")
    key = ("Qwen/Qwen3.5-0.8B-Base", RUNS[0], "codealpaca", 3407, "humaneval", "0")
    assert result.completions[key] == {"task_id": raw[0]["task_id"], "completion": raw[0]["completion"]}


def test_score_code_fills_the_humaneval_column(small_published, data_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["report", "--import", str(small_published), "--output", str(out), "--score-code",
                 "--data-dir", str(data_dir), "--resamples", "200", "--no-progress",
                 "--full-placement", f"Qwen/Qwen3.5-0.8B-Base={RUNS[1]}"])  # paired tests vs this placement
    assert code == 0, capsys.readouterr().err
    outcomes = [json.loads(line) for line in (out / SCORED_FILE).read_text().splitlines()]
    assert len(outcomes) == ROWS * len(RUNS)
    for row in outcomes:  # raw text kept, executed text = raw cut at the first standard stop
        assert row["raw_completion"].startswith(row["completion"])
        rest = row["raw_completion"][len(row["completion"]):]
        assert rest == "" or rest.startswith(("\nclass", "\ndef", "\n#", "\nif", "\nprint"))
        assert row["status"] in ("passed", "failed", "timeout")
    with open(out / "tables" / "accuracy.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["benchmark"] == SCORED_BENCHMARK]
    assert {r["placement"] for r in rows} == set(RUNS)
    for r in rows:
        expected = [o["correct"] for o in outcomes if o["placement"] == r["placement"]]
        assert int(r["n"]) == ROWS and int(r["correct"]) == sum(expected)
        assert float(r["wilson_low"]) <= float(r["accuracy"]) <= float(r["wilson_high"])
    with open(out / "tables" / "paired_bootstrap.csv", newline="") as handle:
        paired = [r for r in csv.DictReader(handle) if r["benchmark"] == SCORED_BENCHMARK]
    assert [(r["placement_a"], r["placement_b"], int(r["n_shared"])) for r in paired] == [(RUNS[0], RUNS[1], ROWS)]
    assert all(paired[0][k] != "" for k in ("mean_diff", "ci_low", "ci_high", "mcnemar_p"))
    report = (out / "report.md").read_text()
    assert "HumanEval was scored by hybridlora" in report and "\\nclass" in report


def test_score_code_errors(small_published, data_dir, tmp_path, capsys):
    code = main(["report", str(tmp_path), "--score-code"])
    assert code == EXIT_USAGE and "works with --import" in capsys.readouterr().err
    no_code = tmp_path / "no_code"
    no_code.mkdir()
    name = "qwen3_5_0_8b_base__base__arc_challenge.jsonl.gz"
    (no_code / name).write_bytes((small_published / name).read_bytes())
    code = main(["report", "--import", str(no_code), "--output", str(tmp_path / "r"), "--score-code",
                 "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "no unscored HumanEval completions" in err
    assert not (tmp_path / "r").exists()


def test_score_code_on_the_generic_layout(data_dir, tmp_path, capsys):
    """Generic results: rows with task_id + completion and no correct are executed; scored rows are left alone."""
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle][:3]
    root = tmp_path / "generic"
    root.mkdir()
    good = [{"example_id": p["task_id"], "task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    bad = [dict(row, completion="    return None\n") for row in good]
    for name, rows in (("a_he.jsonl", good), ("b_he.jsonl", bad)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "a_mmlu.jsonl").write_text("".join(json.dumps({"example_id": str(i), "correct": i % 2}) + "\n"
                                               for i in range(4)))
    runs = [{"model": "org/M", "placement": "attention_only", "train_domain": "codealpaca", "seed": 1,
             "files": {"humaneval": "a_he.jsonl", "mmlu": "a_mmlu.jsonl"}},
            {"model": "org/M", "placement": "all", "train_domain": "codealpaca", "seed": 1,
             "files": {"humaneval": "b_he.jsonl", "mmlu": "a_mmlu.jsonl"}}]
    (root / "manifest.json").write_text(json.dumps({"runs": runs}))
    out = tmp_path / "report"
    code = main(["report", "--import", str(root), "--output", str(out), "--score-code", "--data-dir", str(data_dir),
                 "--resamples", "100", "--no-progress", "--full-placement", "org/M=all"])
    assert code == 0, capsys.readouterr().err
    with open(out / "tables" / "accuracy.csv", newline="") as handle:
        acc = {(r["placement"], r["benchmark"]): (r["correct"], r["n"]) for r in csv.DictReader(handle)}
    assert acc[("attention_only", SCORED_BENCHMARK)] == ("3", "3")
    assert acc[("all", SCORED_BENCHMARK)] == ("0", "3")
    assert acc[("all", "mmlu")] == ("2", "4")  # other benchmarks untouched
