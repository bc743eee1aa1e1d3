"""The architecture lab, stage 2: full-parameter pretraining on WikiText-2 (CPU, tiny), exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybridlora.cli import main

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SPEC = ("name: pt\nvocab_size: 300\ndepth: 2\ntarget_params: 150000\nhead_dim: 16\nmixers: [attention, gdn]\n"
        "topology: parallel\nfusion: normalized\n")
ARGS = ["--corpus", str(WIKITEXT), "--tokens", "6000", "--seq-len", "64", "--micro-batch-size", "4",
        "--max-docs", "300", "--lr", "3e-3", "--save-every", "4", "--no-progress"]

pytestmark = pytest.mark.skipif(not WIKITEXT.is_file(), reason="needs ../shared/data/wikitext-2")


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["event"] == "step"]


def test_pretraining_lowers_the_loss_and_resumes_exactly(tmp_path, capsys):
    spec = tmp_path / "pt.yaml"
    spec.write_text(SPEC)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["lab", "pretrain", str(spec), *ARGS, "--output", str(full)]) == 0
    losses = _losses(full)
    assert len(losses) >= 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it learned something
    assert main(["lab", "pretrain", str(spec), *ARGS, "--output", str(split), "--stop-after-steps", "9"]) == 0
    assert not (split / "model").exists() and "resume with --resume" in capsys.readouterr().out
    assert main(["lab", "pretrain", str(spec), *ARGS, "--output", str(split), "--resume"]) == 0
    assert _losses(split) == pytest.approx(losses, abs=1e-6)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(full / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(split / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    run = json.loads((full / "lab_run.json").read_text())
    assert abs(run["match"]["relative_error"]) <= 0.01
    # the saved directory is one every command accepts: tokenizer beside the weights, component map
    assert (full / "model" / "tokenizer.json").is_file()
    assert main(["inspect", str(full / "model")]) == 0
    assert "parallel" in capsys.readouterr().out
    # a finished run is not overwritten
    assert main(["lab", "pretrain", str(spec), *ARGS, "--output", str(full)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_pretrain_bad_inputs_are_one_error_line(tmp_path, capsys):
    spec = tmp_path / "pt.yaml"
    spec.write_text(SPEC)
    bad_jsonl = tmp_path / "c.jsonl"
    bad_jsonl.write_text('{"body": "x"}\n')
    for extra in (["--corpus", str(bad_jsonl), "--tokens", "10"], ["--corpus", str(WIKITEXT), "--tokens", "0"],
                  ["--corpus", str(tmp_path / "nope"), "--tokens", "10"]):
        assert main(["lab", "pretrain", str(spec), *extra, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "o" / "model").exists()
