"""``hybridlora eval --score-completions FILE``: HumanEval completions made elsewhere, scored in the sandbox."""
from __future__ import annotations

import gzip
import json

import pytest

from hybridlora.cli import EXIT_USAGE, main
from hybridlora.evaluate import humaneval


@pytest.fixture(scope="module")
def problems(data_dir) -> dict:
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as handle:
        return {row["task_id"]: row for row in map(json.loads, handle)}


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(argv, capsys):
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("error:")]


def test_scores_completions_with_records_like_other_benchmarks(problems, data_dir, tmp_path, capsys):
    tail = "\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n"  # untrimmed, as stored by some studies
    rows = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"] + tail},
            {"task_id": "HumanEval/2", "completion": "    return 0.0\n"},
            {"task_id": "HumanEval/4", "completion": problems["HumanEval/4"]["canonical_solution"]}]
    source = write_rows(tmp_path / "c.jsonl", rows)
    out_dir = tmp_path / "out"
    code, out, errors = run_cli(["--score-completions", source, "--confirm-run-unsafe-code", "--data-dir",
                                 str(data_dir), "--output", str(out_dir)], capsys)
    assert (code, errors) == (0, [])
    assert "pass@1  0.6667  (2/3)" in out
    records = [json.loads(line) for line in (out_dir / "humaneval.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in records] == [1, 0, 1]
    assert [r["example_id"] for r in records] == ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    assert records[0]["raw_completion"] == rows[0]["completion"]  # kept as given
    assert "SystemExit" not in records[0]["completion"] and records[0]["trim"].startswith("cut at")
    assert records[1]["status"] == "failed" and "AssertionError" in records[1]["detail"]
    summary = json.loads((out_dir / "humaneval.summary.json").read_text())
    assert summary["metric"] == "pass@1" and summary["n"] == 3 and summary["correct"] == 2
    assert json.loads((out_dir / "summary.json").read_text())["humaneval"]["accuracy"] == pytest.approx(2 / 3)
    # untrimmed, the study's trailing main block runs and the first completion fails to load
    code, out, _ = run_cli(["--score-completions", source, "--confirm-run-unsafe-code", "--no-trim",
                            "--data-dir", str(data_dir), "--output", str(tmp_path / "raw")], capsys)
    assert code == 0 and "(1/3)" in out


@pytest.mark.parametrize("content,argv,message", [
    (None, ["--confirm-run-unsafe-code"], "no such file"),
    ('{"task_id": "HumanEval/0", "completion": "x"}\n', [], "add --confirm-run-unsafe-code"),
    ('{"task_id": "HumanEval/0"\n', ["--confirm-run-unsafe-code"], "c.jsonl:1: invalid JSON"),
    ('{"task_id": "HumanEval/0"}\n', ["--confirm-run-unsafe-code"], "c.jsonl:1: each line needs"),
    ('{"task_id": "HumanEval/0", "completion": "a"}\n{"task_id": "HumanEval/0", "completion": "b"}\n',
     ["--confirm-run-unsafe-code"], "c.jsonl:2: task_id 'HumanEval/0' repeats line 1"),
    ('{"task_id": "MBPP/1", "completion": "a"}\n', ["--confirm-run-unsafe-code"], "not HumanEval problems"),
    ('{"task_id": "HumanEval/0", "completion": "a"}\n', ["qwen3.5-0.8b", "--confirm-run-unsafe-code"],
     "scores a file, not a model"),
    ("\n", ["--confirm-run-unsafe-code"], "no completions"),
])
def test_bad_input_is_one_line(content, argv, message, data_dir, tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    if content is not None:
        path.write_text(content)
    code, _, errors = run_cli(["--score-completions", str(path), "--data-dir", str(data_dir),
                               "--output", str(tmp_path / "out"), *argv], capsys)
    assert code == EXIT_USAGE and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_eval_without_model_or_completions_is_an_error(capsys):
    code, _, errors = run_cli([], capsys)
    assert code == EXIT_USAGE and "needs a MODEL" in errors[0]


def test_standard_trim():
    text = "    return 1\n# done\n\nif __name__ == '__main__':\n    import doctest\n"
    assert humaneval.trim_completion(text, humaneval.STANDARD_STOP) == "    return 1"
    assert humaneval.trim_completion("    x = 1\n    # inner comment\n    return x\nprint(1)",
                                     humaneval.STANDARD_STOP) == "    x = 1\n    # inner comment\n    return x"
