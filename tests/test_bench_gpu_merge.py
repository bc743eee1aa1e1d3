"""bench/bench_gpu.py --merge: runs that each measured part of a model (one with --skip mc, one MC-only) combine
into one projection, whatever order they are given in. Uses the committed H200 runs of 2026-12-02/03."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "results"
QWEN_NO_MC = RUNS / "2026-12-03-h200" / "session15" / "qwen_bench.json"  # training, generation; MC skipped
QWEN_MC_ONLY = RUNS / "2026-12-02-h200" / "session9" / "qwen_mc_bench.json"  # MC; training skipped


def fresh_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("order", [(QWEN_NO_MC, QWEN_MC_ONLY), (QWEN_MC_ONLY, QWEN_NO_MC)])
def test_merge_combines_partial_runs_into_one_projection(order):
    bench = fresh_bench()
    bench.main(["--merge", *map(str, order)])
    sections, errors = bench.RESULTS["sections"], bench.RESULTS["errors"]
    qwen = sections["projection"]["qwen"]
    assert isinstance(qwen, dict), qwen  # not "incomplete measurements"
    assert qwen["fast"]["mc_h"] > 0 and qwen["fast"]["train_h"] > 0
    assert sections["qwen_training"]["rows"] and "study_style_s_per_question" in sections["qwen_mc_eval"]
    assert "projection" not in errors  # the first run's failed projection, recomputed, is no longer reported


def test_a_skipped_section_makes_the_projection_incomplete_not_a_crash():
    bench = fresh_bench()
    bench.main(["--merge", str(QWEN_NO_MC)])
    assert bench.RESULTS["sections"]["projection"]["qwen"] == "incomplete measurements"
    assert "projection" not in bench.RESULTS["errors"]
