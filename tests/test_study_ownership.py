"""A study directory belongs to one config; the report in it is complete or says it is partial, whatever order
runners finish in."""
from __future__ import annotations

import threading
from pathlib import Path

import yaml

from hybridlora.cli import main
from hybridlora.study import Job, Store
from hybridlora.study import runner as runner_module

from test_study import mini


def _grid(study: Path) -> list[str]:
    store = Store(study, create=False)
    try:
        return store.grid()
    finally:
        store.close()


def test_another_config_is_refused_and_add_cells_adds_its_cells(tmp_path, capsys):
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(mini(tmp_path, placements=["all"])))
    study = tmp_path / "study"
    assert main(["study", str(first), "--only", "kind=base,model=q", "--quiet"]) == 0
    capsys.readouterr()
    snapshot, grid = (study / "study.yaml").read_text(), _grid(study)
    report = (study / "report" / "report.html").read_text()

    clash = tmp_path / "clash.yaml"  # another config: other eval set, same model labels
    clash.write_text(yaml.safe_dump(mini(tmp_path, name="other", eval={
        "benchmarks": {"mmlu": 3}, "batch_size": 4, "max_length": 256})))
    assert main(["study", str(clash), "--only", "kind=base,model=q", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "holds the study 'mini' of another config" in err and "eval" in err and "name" in err
    assert "--add-cells" in err and "--output" in err
    # nothing changed: config snapshot, grid and report are the first study's
    assert (study / "study.yaml").read_text() == snapshot and _grid(study) == grid
    assert (study / "report" / "report.html").read_text() == report
    # adding its cells would put two different computations under one name in the report: refused too
    assert main(["study", str(clash), "--only", "kind=base,model=q", "--quiet", "--add-cells"]) == 2
    err = capsys.readouterr().err
    assert "already in the study, computed otherwise" in err and err.count("\n") == 1
    assert _grid(study) == grid

    # the same config again, named by another path of the same directory, is the same study
    assert main(["study", str(first), "--only", "kind=base,model=q", "--quiet",
                 "--output", str(tmp_path / "." / "study")]) == 0
    capsys.readouterr()

    other = tmp_path / "other.yaml"  # another config adding a placement
    other.write_text(yaml.safe_dump(mini(tmp_path, name="other", placements=["attention_only"])))
    assert main(["study", str(other), "--only", "model=q", "--quiet", "--add-cells"]) == 0
    capsys.readouterr()
    union = _grid(study)
    assert union[:len(grid)] == grid and len(union) == len(grid) + 1  # the new placement's cell
    assert (study / "study.yaml").read_text() == snapshot  # the owner's config stays
    html = (study / "report" / "report.html").read_text()
    assert "cells of 2 configs" in html and "attention_only" in html
    # running the added config again is not refused, and adds nothing twice
    assert main(["study", str(other), "--only", "model=q", "--quiet"]) == 0
    assert _grid(study) == union


def _fake_study(study: Path) -> list[Job]:
    """A two-cell study (base evaluations of two models) registered by hand, nothing run."""
    jobs = [Job(f"job{i}", "base", f"m{i}", "base", "base", None, {"kind": "base"}) for i in range(2)]
    store = Store(study)
    store.register(jobs, {"name": "race", "models": []})
    store.close()
    return jobs


def _complete(study: Path, job_id: str) -> None:
    store = Store(study)
    try:
        assert store.claim("me", ids=[job_id]).id == job_id
        records = [{"benchmark": "mmlu", "example_id": str(i), "correct": i % 2 == 0} for i in range(6)]
        assert store.complete(job_id, "me", {"summaries": {"mmlu": {"n": 6, "correct": 3, "accuracy": 0.5}},
                                             "records": records})
    finally:
        store.close()


def test_partial_report_says_so_and_a_late_partial_build_never_overwrites_the_complete_one(tmp_path, monkeypatch):
    study = tmp_path / "s"
    _fake_study(study)
    _complete(study, "job0")
    from hybridlora.analysis import report as report_module

    real_build = report_module.build_report
    release, first_call = threading.Event(), threading.Event()

    def slow_first_build(results, out, **kw):
        if not first_call.is_set():  # runner A: read the partial state, then is slow to write
            first_call.set()
            assert release.wait(30)
        return real_build(results, out, **kw)

    from hybridlora.study import results as results_module

    real_load, loads, second_load = results_module.load_study_results, [], threading.Event()

    def counted_load(study_dir):
        loads.append(study_dir)
        if len(loads) == 2:
            second_load.set()
        return real_load(study_dir)

    monkeypatch.setattr(report_module, "build_report", slow_first_build)
    monkeypatch.setattr(results_module, "load_study_results", counted_load)
    runner_a = threading.Thread(target=runner_module.build_study_report, args=(study,))
    runner_a.start()
    assert first_call.wait(30)
    _complete(study, "job1")  # runner B finishes the grid and builds its report while A is still writing
    runner_b = threading.Thread(target=runner_module.build_study_report, args=(study,))
    runner_b.start()
    # Unguarded, B reads the complete state now and writes its report before A writes its older one; guarded,
    # B waits for A. Either way A is released only once B has done all it can do before A finishes.
    if second_load.wait(5):
        runner_b.join(120)
    release.set()
    runner_a.join(60)
    runner_b.join(60)
    html = (study / "report" / "report.html").read_text()
    assert "PARTIAL" not in html and "not complete" not in html

    # and a report of an unfinished grid says so in its title
    study2 = tmp_path / "s2"
    _fake_study(study2)
    _complete(study2, "job0")
    monkeypatch.setattr(report_module, "build_report", real_build)
    runner_module.build_study_report(study2)
    html = (study2 / "report" / "report.html").read_text()
    assert "<h1>PARTIAL report (1 of 2 cells complete)" in html
