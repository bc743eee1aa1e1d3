"""bench/project_paper.py: the `paper` preset's grid read from the preset, and the projection arithmetic checked
against the H100 notes' hand-made one (bench/results/2026-11-22-h100-history/NOTES.md, "Projection, fourth
device session" and the sixth session's unmerged MC figures) on the same committed raw files."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "bench" / "results" / "2026-11-22-h100"
H100_FILES = ["--train-loop", f"{H100}-session5/train_loop_bench_graphs.json",
              f"{H100}-session5/train_loop_bench_qwen_norms.json",
              "--decode", f"{H100}-session5/bench_decode_full_length.json",
              "--mc", f"{H100}/falcon_bench.json", f"{H100}-session7/qwen_mc_bench.json"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("project_paper_under_test", ROOT / "bench" / "project_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grid_is_the_presets(bench):
    work = bench.preset_work()
    for model in ("qwen", "falcon"):
        w = work[model]
        assert len(w["cells"]) == 18 and {steps for _, steps in w["cells"]} == {375}  # 2000 / 16 x 3 epochs
        assert sorted({d for d, _ in w["cells"]}) == ["chat", "codealpaca", "gsm8k"]
        assert w["evaluations"] == 19 and w["mc_items"] == 512 + 299 + 512
        assert w["generation"] == {"gsm8k": (256, 256), "humaneval": (164, 512)}


def test_h100_projection_matches_the_notes_arithmetic(bench, tmp_path, capsys):
    out = tmp_path / "projection.json"
    assert bench.main([*H100_FILES, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    qwen, falcon = result["models"]["qwen"], result["models"]["falcon"]
    notes = {"qwen": {"train_h": 0.129, "mc_h": 0.036, "generation_h": 0.057},
             "falcon": {"train_h": 0.193, "mc_h": 0.056, "generation_h": 0.059}}
    for row, expected in ((qwen, notes["qwen"]), (falcon, notes["falcon"])):
        for part, hours in expected.items():
            assert row[part] == pytest.approx(hours, abs=0.0015), part
        assert not row["missing"]
    assert falcon["captures_h"] == pytest.approx(0.057, abs=0.002)  # notes: 90 captures at ~2.5 s, ≈ 0.06 h
    assert qwen["generation_s_per_evaluation"] == pytest.approx(10.8, abs=0.1)  # notes: 10.8 s per evaluation
    assert 0.55 < result["total_h"] < 0.7 and result["total_h_bound"] >= result["total_h"]
    assert "both models: 0.62 h" in capsys.readouterr().out


def test_unmeasured_parts_are_named_not_guessed(bench, tmp_path, capsys):
    out = tmp_path / "projection.json"
    assert bench.main(["--mc", f"{H100}-session7/qwen_mc_bench.json", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    qwen = result["models"]["qwen"]
    assert "mc_h" in qwen and "train_h" not in qwen and "total_h" not in qwen and "total_h" not in result
    assert any("study-length training" in m for m in qwen["missing"])
    assert any("humaneval" in m for m in qwen["missing"])
    assert "not measured" in capsys.readouterr().out


H200 = ROOT / "bench" / "results" / "2026-12-03-h200"
H200_FILES = ["--train-loop", f"{H200}/session16/perf/qwen/train_loop_bench.json",
              f"{H200}/session16/perf/falcon/train_loop_bench.json",
              "--decode", f"{H200}/session15/bench_decode.json", f"{H200}/session16/perf/falcon_decode/bench_decode.json",
              "--mc", f"{ROOT}/bench/results/2026-12-02-h200/session9/qwen_mc_bench.json",
              f"{H200}/session15/falcon_bench.json"]


def test_h200_projection_is_the_one_docs_state(bench, tmp_path, capsys):
    """docs/PERFORMANCE.md's H200 projection cell, recomputed from the committed raw files: every part measured,
    and each model's rates taken from its own files (Falcon-H1's decode from the later file)."""
    out = tmp_path / "projection.json"
    assert bench.main([*H200_FILES, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    qwen, falcon = result["models"]["qwen"], result["models"]["falcon"]
    assert not qwen["missing"] and not falcon["missing"]
    assert qwen["train_h"] == pytest.approx(0.122, abs=0.001) and falcon["train_h"] == pytest.approx(0.176, abs=0.001)
    assert falcon["generation_s_per_evaluation"] == pytest.approx(10.07, abs=0.02)  # session 16's 10.8 / 10.9 ms steps
    assert "both models: 0.55 h (≤ 1.12 h)" in capsys.readouterr().out
