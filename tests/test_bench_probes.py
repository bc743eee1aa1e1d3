"""bench/bench_probes.py on CPU (--tiny: checks the script, the figures mean nothing on CPU): the marginal step
time comes from two runs of different length, and the projection is written."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

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
    # without CUDA graphs do not apply, and the record says so
    assert [r["step"] for r in rows] == ["cuda graph" if torch.cuda.is_available() else "eager", "eager"]
    assert all(r["steps"][1] == 2 * r["steps"][0] for r in rows)
    # a tiny graphed step can sit under the timing noise: then the record and a warning say so
    assert all(r["measured"] == (r["ms_per_step"] > 0) for r in rows) and rows[1]["measured"]
    printed = capsys.readouterr().out
    assert all(r["measured"] or f"graphs {r['graphs']}: the longer run was not slower" in printed for r in rows)
    assert out["suite_min_one_process"] > 0
    assert "suite projection" in printed
    assert os.environ["HYBRIDLORA_PROBE_GRAPHS"] == "keep"  # the bench's switching left the environment as found
