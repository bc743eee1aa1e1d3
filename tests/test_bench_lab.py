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
