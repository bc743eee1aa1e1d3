"""The architecture lab, stage 5: the report over models, runs, probe results and efficiency profiles."""
from __future__ import annotations

import json

import torch

from hybridlora.cli import main
from hybridlora.lab.probes import Settings, run_suite
from hybridlora.lab.spec import spec_from_dict


def test_report_puts_architectures_probes_and_efficiency_side_by_side(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nvocab_size: 300\ndepth: 2\ntarget_params: 150000\nmixers: [attention, gdn]\n"
                    "ratio: '1:1'\n")
    assert main(["lab", "build", str(spec), "--variants", "--output", str(tmp_path / "lab" / "models")]) == 0
    small = Settings(name="test", train_examples=32, test_examples=16, epochs=1, batch_size=16, target_params=30_000)
    run_suite({"s": spec_from_dict({"name": "s", "mixers": ["attention", "gdn"], "ratio": "1:1"})},
              ["long_context"], [0, 1], small, tmp_path / "lab" / "probes", progress=False)
    (tmp_path / "lab" / "eff").mkdir()
    (tmp_path / "lab" / "eff" / "efficiency.json").write_text(json.dumps({"device": "cpu", "archs": {"s-sequential": {
        "params": 150000, "training": {"batch": 2, "seq_len": 64, "tokens_per_s": 600.0, "mfu": 0.0},
        "inference": [{"length": 64, "prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 30.0}]}}}))
    capsys.readouterr()
    assert main(["lab", "report", str(tmp_path / "lab")]) == 0
    md = (tmp_path / "lab" / "report" / "report.md").read_text()
    for needle in ("s-parallel", "s-all-attention", "AG AG", "long_context", "x8", "Wilson", "600",
                   "long-context-retrieval-against-length.png"):
        assert needle in md, needle
    assert (tmp_path / "lab" / "report" / "long-context-retrieval-against-length.png").stat().st_size > 1000
    assert "No pretraining runs" in md
    # a rebuild replaces the report in place
    assert main(["lab", "report", str(tmp_path / "lab")]) == 0


def test_report_of_an_empty_or_missing_folder_is_one_error_line(tmp_path, capsys):
    for target in (tmp_path, tmp_path / "missing"):
        assert main(["lab", "report", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "report").exists()


def test_efficiency_profiles_run_on_a_tiny_model():
    """Smoke check of the measurement code bench/bench_lab.py runs (rates on CPU mean nothing)."""
    from hybridlora.lab.efficiency import inference_profile, trainer_profile, training_profile
    from hybridlora.lab.solve import build

    model, _ = build(spec_from_dict({"name": "e", "mixers": ["attention", "mamba2"], "topology": "parallel",
                                     "width": 32, "depth": 2, "vocab_size": 64}))
    plain = training_profile(model, batch=1, seq_len=16, steps=1, warmup=1)
    looped = trainer_profile(model, batch=2, seq_len=16, steps=1, warmup=1)
    assert plain["tokens_per_s"] > 0 and plain["precision"] == "fp32" and 0 <= plain["mfu"] < 1
    assert looped["tokens_per_s"] > 0 and looped["batching"].startswith("packing on")
    model.generation_config.eos_token_id = 3
    rows = inference_profile(model, [8, 16], decode_tokens=4, repeats=1, warmup=0)
    assert [r["length"] for r in rows] == [8, 16]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert all(r["decode_path"] == "eager" for r in rows)  # CPU: the static-cache loop, no graphs
    assert model.generation_config.eos_token_id == 3 and next(model.parameters()).dtype == torch.float32


def test_losses_that_span_decades_get_a_log_axis_and_keep_their_digits():
    """The topology preset's parallel model ended at 8.4e-5 where the others stayed near 0.1: a linear axis put
    every curve on zero and the table said 0.000."""
    from hybridlora.lab import report

    wide = [{"name": "a", "steps": [1, 2, 3], "loss": [5.6, 0.4, 8.4e-5], "val": [(3, 8.7e-5)]},
            {"name": "b", "steps": [1, 2, 3], "loss": [5.7, 0.5, 0.1], "val": []}]
    narrow = [{"name": "b", "steps": [1, 2, 3], "loss": [5.7, 0.5, 0.1], "val": [(3, 0.11)]}]
    assert report.loss_figure(wide).axes[0].get_yscale() == "log"
    assert report.loss_figure(narrow).axes[0].get_yscale() == "linear"
    assert report.loss_figure([{**narrow[0], "loss": [1.0, 0.5, 0.0]}]).axes[0].get_yscale() == "linear"  # a zero
    assert report._fmt(8.4e-5) == "8.40e-05" and report._fmt(0.0) == "0.000" and report._fmt(0.0859) == "0.086"
