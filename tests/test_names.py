"""One name, one meaning: the presets command, study conditions vs generic presets, adapter configs given as
models, train --rank/--alpha."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridlora.cli import main

from conftest import shared_data_dir

DATA = shared_data_dir()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_presets_lists_generic_and_study_names_with_their_targets(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip() and not line.startswith("Use")}
    assert "softmax_attention q, k, v" in rows["study/attention_only"]  # Falcon-H1's study condition
    assert "softmax_attention all roles" in rows["attention_only"]
    assert "study/gdn_only" in rows and "value_only" in rows
    code, out, _ = run(capsys, "presets", "qwen3.5-0.8b")
    assert code == 0 and "study/gdn_only" in out and "study/ssm_only" not in out
    code, _, err = run(capsys, "presets", "no-such-model")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_the_same_name_means_the_same_placement_on_both_demo_families(capsys):
    from hybridlora.study import expand_grid, load_study_config

    code, out, _ = run(capsys, "plan", "falcon-h1-0.5b", "--placement", "attention_only", "--format", "json")
    assert code == 0 and json.loads(out)[0]["trainable_params"] == 3_096_576  # q, k, v, o
    code, out, _ = run(capsys, "plan", "falcon-h1-0.5b", "--placement", "study/attention_only", "--format", "json")
    assert code == 0 and json.loads(out)[0]["trainable_params"] == 2_211_840  # the study's q, k, v
    demo = expand_grid(load_study_config("demo"))
    for job in demo:
        if job.kind == "train":  # the demo's placements are generic presets on both models
            assert job.spec["placement"]["name"] == job.placement and not job.placement.startswith("study/")


def test_inspect_of_an_adapter_config_says_it_is_an_adapter(capsys, tmp_path):
    code, _, err = run(capsys, "plan", "qwen3.5-0.8b", "--placement", "study/softmax_only",
                       "--save-config", str(tmp_path))
    assert code == 0, err
    adapter_config = next(tmp_path.rglob("adapter_config.json"))
    for target in (adapter_config, adapter_config.parent):
        code, _, err = run(capsys, "inspect", str(target))
        assert code == 2 and err.count("\n") == 1
        assert "is a PEFT adapter config" in err and "Qwen/Qwen3.5-0.8B-Base" in err and "upgrade" not in err


@pytest.mark.parametrize("flag, value, message", [("--rank", "0", "--rank 0: give a LoRA rank of at least 1"),
                                                   ("--alpha", "-2", "--alpha -2: give a positive LoRA alpha")])
def test_train_refuses_bad_rank_and_alpha(capsys, tmp_path, flag, value, message):
    code, _, err = run(capsys, "train", "qwen3.5-0.8b", "--tiny", "--placement", "attention_only", "--data", "gsm8k",
                       "--data-dir", str(DATA), "--output", str(tmp_path / "r"), flag, value)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_train_rank_and_alpha_reach_the_adapter(capsys, tmp_path):
    code, out, err = run(capsys, "train", "qwen3.5-0.8b", "--tiny", "--placement", "attention_only", "--data",
                         "gsm8k", "--data-dir", str(DATA), "--max-examples", "8", "--val-examples", "2", "--epochs",
                         "1", "--rank", "4", "--alpha", "8", "--no-progress",
                         "--output", str(tmp_path / "r"))
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) <= {4} and config["r"] == 4
    assert config["lora_alpha"] == 8
