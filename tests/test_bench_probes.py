"""bench/bench_probes.py on CPU (--tiny: checks the script, the figures mean nothing on CPU): the marginal step
time comes from two runs of different length, and the projection is written."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_probes.py"


def test_the_bench_times_steps_per_kind_and_writes_its_projection(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_probes_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("HYBRIDLORA_PROBE_GRAPHS", "keep")
    args = ["--tiny", "--archs", "sequential", "--probes", "memorization", "--graphs", "on,off", "--epochs", "2",
            "--out", str(tmp_path)]
    assert bench.main(args) == 0
    out = json.loads((tmp_path / "probe_rates.json").read_text())
    rows = out["rows"]
    assert [r["graphs"] for r in rows] == ["on", "off"]
    assert all(r["step"] == "eager" for r in rows)  # no CUDA: graphs do not apply, and the record says so
    assert all(r["steps"][1] == 2 * r["steps"][0] and r["ms_per_step"] > 0 for r in rows)
    assert out["suite_min_one_process"] > 0
    assert "suite projection" in capsys.readouterr().out
    assert os.environ["HYBRIDLORA_PROBE_GRAPHS"] == "keep"  # the bench's switching left the environment as found
