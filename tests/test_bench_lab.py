"""bench/bench_lab.py on CPU (--tiny: checks the script, measures nothing): a rerun into the same folder with the
same settings skips the architectures already measured, so a run stopped by a time limit continues."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_lab.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_lab_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rerun_skips_finished_architectures_and_measures_unfinished_or_changed_ones(tmp_path, capsys):
    bench = _bench()
    args = ["--tiny", "--archs", "sequential,parallel", "--loop", "plain", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    first = json.loads((tmp_path / "efficiency.json").read_text())
    assert all(entry["complete"] for entry in first["archs"].values()) and len(first["archs"]) == 2
    capsys.readouterr()

    name = next(iter(first["archs"]))
    first["archs"][name]["complete"] = False  # as if a time limit stopped it during inference
    (tmp_path / "efficiency.json").write_text(json.dumps(first))
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("measured already") == 1 and out.count("building and timing") == 1
    assert f"-- {name}: building and timing" in out

    both = args[:-4] + ["--loop", "both", "--out", str(tmp_path)]
    assert bench.main(both) == 0  # other settings: everything again
    assert capsys.readouterr().out.count("building and timing") == 2
    assert bench.main(both) == 0
    assert capsys.readouterr().out.count("building and timing") == 0
    assert bench.main(both + ["--fresh"]) == 0
    assert capsys.readouterr().out.count("building and timing") == 2


def test_loop_none_measures_inference_only_and_writes_each_length_as_it_finishes(tmp_path, monkeypatch, capsys):
    bench = _bench()
    from hybridlora.lab import efficiency
    from hybridlora.lab.report import build_report

    real = efficiency.inference_profile
    seen_on_disk = []

    def watched(model, lengths, **kw):  # what efficiency.json holds when each length is reported
        on_row = kw.pop("on_row")

        def spy(row):
            on_row(row)
            data = json.loads((tmp_path / "eff" / "efficiency.json").read_text())
            seen_on_disk.append([r["length"] for a in data["archs"].values() for r in a["inference"]])
        return real(model, lengths, on_row=spy, **kw)

    monkeypatch.setattr(efficiency, "inference_profile", watched)
    assert bench.main(["--tiny", "--archs", "sequential", "--loop", "none", "--out", str(tmp_path / "eff")]) == 0
    assert seen_on_disk == [[64], [64, 128]]  # a run stopped after the first length keeps it
    entry = next(iter(json.loads((tmp_path / "eff" / "efficiency.json").read_text())["archs"].values()))
    assert "training" not in entry and entry["complete"] and [r["length"] for r in entry["inference"]] == [64, 128]
    assert "L=   128: prefill" in capsys.readouterr().out
    report = (build_report(tmp_path) / "report.md").read_text()
    assert "Training efficiency" not in report and "## Inference" in report and "| 128 |" in report
