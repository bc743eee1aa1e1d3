"""What a study says on the terminal: notes once, the headline, how to resume after Ctrl-C, status, cost."""
from __future__ import annotations

import csv
import socket
from pathlib import Path

import pytest

from hybridlora.cli import main
from hybridlora.study import Job, Store, load_study_config
from hybridlora.study import runner as runner_module
from hybridlora.study.summary import headline_lines, status_lines


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_headline_names_the_recommended_placement_and_its_target_gain_with_interval(tmp_path):
    tables = tmp_path / "report" / "tables"
    tables.mkdir(parents=True)
    _write_csv(tables / "recipe.csv", [
        {"model": "m", "train_domain": "gsm8k", "recommended": "attention_only", "note": ""},
        {"model": "m", "train_domain": "chat", "recommended": "", "note": "no parameter counts"}])
    _write_csv(tables / "deltas.csv", [
        {"model": "m", "train_domain": "gsm8k", "benchmark": "gsm8k", "target": "true"},
        {"model": "m", "train_domain": "gsm8k", "benchmark": "mmlu", "target": "false"}])
    row = {"model": "m", "train_domain": "gsm8k", "placement_a": "attention_only", "placement_b": "base",
           "reference": "base", "mean_diff": "3.5", "ci_low": "-1.25", "ci_high": "8"}
    _write_csv(tables / "paired_bootstrap.csv", [dict(row, benchmark="gsm8k"), dict(row, benchmark="mmlu")])
    assert headline_lines(tmp_path / "report" / "report.html") == [
        "m: gsm8k: attention_only (vs base: gsm8k +3.50 pp [-1.25, +8.00]) | chat: no recommendation "
        "(no parameter counts)"]


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "run_study", interrupted)
    assert main(["study", "--output", str(tmp_path / "s"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: the cells finished so far are kept" in err
    assert f"hybridlora study --output {tmp_path / 's'}" in err and "Traceback" not in err


def test_status_shows_each_cell_and_a_stopped_runner(tmp_path, capsys):
    study = tmp_path / "s"
    jobs = [Job(f"job{i}", "base", f"m{i}", "base", "base", None, {"kind": "base"}) for i in range(3)]
    store = Store(study)
    store.register(jobs, {"name": "st", "models": []})
    dead = f"{socket.gethostname()}|999999999|-|dead"  # a runner of this host that is gone
    assert store.claim(dead, ids=["job0"]).id == "job0"
    assert store.claim("me", ids=["job1"]).id == "job1"
    assert store.complete("job1", "me", {"summaries": {}, "records": [], "wall_s": 12.0})
    store.close()
    lines = status_lines(study)
    assert lines[0] == f"study 'st' in {study}: 1/3 cells complete, 1 stopped, 1 pending"
    assert any("job0" in line and "stopped (its runner is gone" in line for line in lines)
    assert any("job1" in line and "complete" in line and "12 s" in line for line in lines)
    assert lines[-1].startswith("to continue: run the same")
    assert main(["study", str(study), "--status"]) == 0  # a study directory as the argument
    assert capsys.readouterr().out.splitlines()[0] == lines[0]
    assert main(["study", str(tmp_path / "nothing"), "--status"]) == 2


def test_dry_run_of_the_demo_claims_cpu_minutes_not_gpu_hours(capsys):
    runner_module.dry_run(load_study_config("demo"))
    out = capsys.readouterr().out
    assert "CPU-minutes" in out and "GPU-hours" not in out and "H100" not in out


@pytest.mark.parametrize("progress", [[], ["--no-progress"]])
def test_eval_prints_each_note_once_and_no_python_warning(tmp_path, capsys, progress):
    import warnings

    from conftest import shared_data_dir

    data = shared_data_dir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["eval", "qwen3.5-0.8b", "--tiny", "--data-dir", str(data), "--benchmarks", "mmlu",
                     "--limit", "2", "--max-length", "256", "--output", str(tmp_path / "e"), *progress])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (out + err).count("prompts kept") == 1 and "note: mmlu: prompts kept" in err
    assert not [w for w in caught if "few-shot" in str(w.message)]
    assert "fewshot_note" in (tmp_path / "e" / "mmlu.summary.json").read_text()  # the run log keeps it


def test_loading_a_local_model_prints_no_weight_loading_bar(capfd):
    """A study loads its model once per cell: transformers' "Loading weights" bar would print a line each time
    between hybridlora's own progress lines. The bar is off for local folders and back on afterwards."""
    from transformers.utils import logging as hf_logging

    from hybridlora.models import load_pretrained, resolve_model

    assert hf_logging.is_progress_bar_enabled()
    load_pretrained(resolve_model("builtin:demo-sequential"))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
