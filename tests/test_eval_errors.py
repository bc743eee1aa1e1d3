"""``hybridlora eval`` user errors: one line on stderr, exit status 2, before anything is loaded or written."""
from __future__ import annotations

import json
import sys

import pytest

from hybridlora.cli import EXIT_USAGE, main
from hybridlora.evaluate.cli import check_adapter


def run_cli(argv, capsys):
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return code, out, errors


def make_adapter(folder, model, suffixes, base=None):
    """A saved PEFT LoRA adapter on the tiny ``model`` (exact module names, as hybridlora writes them)."""
    from peft import LoraConfig, get_peft_model

    from hybridlora.evaluate.lm import load_lm

    net = load_lm(model, tiny=True).model
    names = [n for n, _ in net.named_modules() if n.endswith(suffixes)]
    get_peft_model(net, LoraConfig(r=2, target_modules=names)).save_pretrained(str(folder))
    if base is not None:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = base
        path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "llama": make_adapter(root / "llama", "llama-3.2-1b", ("q_proj", "v_proj")),
        "falcon_mamba": make_adapter(root / "falcon", "falcon-h1-0.5b", ("mamba.in_proj",)),
        "llama_named_falcon": make_adapter(root / "named", "llama-3.2-1b", ("q_proj",),
                                           base="tiiuae/Falcon-H1-0.5B-Base"),
        "llama_full_name": make_adapter(root / "full", "llama-3.2-1b", ("q_proj",), base="meta-llama/Llama-3.2-1B"),
    }


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Fail the test if the model (and so PEFT) is reached: the checks must come first."""
    import hybridlora.evaluate.lm as lm_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input check")

    monkeypatch.setattr(lm_module, "load_lm", refuse)


@pytest.fixture()
def offline(monkeypatch):
    import hybridlora.models

    monkeypatch.setattr(hybridlora.models, "hub_reachable", lambda *a, **k: False)


def test_adapter_naming_another_base_model(adapters, data_dir, tmp_path, capsys, no_model_loading):
    adapter = adapters["llama_named_falcon"]
    code, out, errors = run_cli(["llama-3.2-1b", "--tiny", "--adapter", str(adapter), "--data-dir", str(data_dir),
                                 "--output", str(tmp_path / "out")], capsys)
    assert code == EXIT_USAGE and len(errors) == 1 and not out
    assert "belongs to tiiuae/Falcon-H1-0.5B-Base" in errors[0] and "not llama-3.2-1b" in errors[0]
    assert f"hybridlora eval tiiuae/Falcon-H1-0.5B-Base --adapter {adapter}" in errors[0]
    assert not (tmp_path / "out").exists()


def test_adapter_targets_absent_from_model(adapters, data_dir, capsys, no_model_loading):
    adapter = adapters["falcon_mamba"]  # names no base model: only its modules tell
    code, _, errors = run_cli(["llama-3.2-1b", "--tiny", "--adapter", str(adapter), "--data-dir", str(data_dir)],
                              capsys)
    assert code == EXIT_USAGE and len(errors) == 1
    assert "target modules are not in llama-3.2-1b (tiny)" in errors[0] and "mamba.in_proj" in errors[0]
    assert "pass the MODEL (and --tiny setting) it was trained with" in errors[0]


def test_adapter_weights_of_another_size(adapters, data_dir, capsys, no_model_loading):
    adapter = adapters["llama_full_name"]  # right model name, but trained on the tiny variant
    code, _, errors = run_cli(["llama-3.2-1b", "--adapter", str(adapter), "--data-dir", str(data_dir)], capsys)
    assert code == EXIT_USAGE and len(errors) == 1
    assert "LoRA weights do not fit llama-3.2-1b" in errors[0] and "in_features is 2048" in errors[0]


def test_matching_adapter_passes_the_check_and_evaluates(adapters, data_dir, tmp_path, capsys):
    check_adapter("llama-3.2-1b", adapters["llama"], tiny=True)  # no error
    check_adapter("meta-llama/Llama-3.2-1B", adapters["llama_full_name"], tiny=True)
    code, _, errors = run_cli(["llama-3.2-1b", "--tiny", "--adapter", str(adapters["llama"]), "--benchmarks", "mmlu",
                               "--limit", "1", "--data-dir", str(data_dir), "--output", str(tmp_path),
                               "--no-progress"], capsys)
    assert code == 0 and not errors
    assert json.loads((tmp_path / "mmlu.summary.json").read_text())["adapter"] == str(adapters["llama"])


def test_adapter_directory_without_config(tmp_path, data_dir, capsys, no_model_loading):
    code, _, errors = run_cli(["llama-3.2-1b", "--tiny", "--adapter", str(tmp_path), "--data-dir", str(data_dir)],
                              capsys)
    assert code == EXIT_USAGE and errors == [f"error: --adapter {tmp_path}: no adapter_config.json there; "
                                             "pass a PEFT adapter directory"]


def test_unknown_benchmark(data_dir, capsys, no_model_loading):
    code, _, errors = run_cli(["llama-3.2-1b", "--tiny", "--benchmarks", "mmlu,squad", "--data-dir", str(data_dir)],
                              capsys)
    assert code == EXIT_USAGE and len(errors) == 1
    assert "unknown benchmark 'squad'" in errors[0] and "mmlu, arc_challenge" in errors[0]


@pytest.mark.parametrize("protocol", ["study", "lm-eval"])
def test_missing_data(tmp_path, capsys, offline, no_model_loading, protocol):
    if protocol == "lm-eval":
        pytest.importorskip("lm_eval")
    code, out, errors = run_cli(["llama-3.2-1b", "--tiny", "--benchmarks", "arc_challenge", "--protocol", protocol,
                                 "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"),
                                 "--no-progress"], capsys)
    assert code == EXIT_USAGE and len(errors) == 1 and not out
    assert "no local data at" in errors[0] and "--data-dir" in errors[0] and "allenai/ai2_arc" in errors[0]
    assert not (tmp_path / "out").exists()


def test_lm_eval_not_installed(monkeypatch, data_dir, capsys, no_model_loading):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    code, _, errors = run_cli(["llama-3.2-1b", "--tiny", "--protocol", "lm-eval", "--data-dir", str(data_dir)],
                              capsys)
    assert code == EXIT_USAGE and len(errors) == 1
    assert "lm-evaluation-harness" in errors[0] and "pip install 'hybridlora[lmeval]'" in errors[0]


def test_batch_size_auto_is_eight_on_cpu_and_bad_values_are_refused(data_dir, tmp_path, capsys):
    from hybridlora.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "qwen3.5-0.8b", "--tiny", "--data-dir", str(data_dir), "--benchmarks", "arc_challenge",
                 "--limit", "2", "--batch-size", "auto", "--output", str(out)]) == 0
    import json

    assert json.loads((out / "arc_challenge.summary.json").read_text())["settings"]["batch_size"] == 8
    with pytest.raises(SystemExit) as exc:
        main(["eval", "qwen3.5-0.8b", "--tiny", "--batch-size", "0"])
    assert exc.value.code == 2 and "positive integer or 'auto'" in capsys.readouterr().err


def test_prefix_reuse_with_the_lm_eval_protocol_is_refused(data_dir, tmp_path, capsys, no_model_loading):
    code, out, errors = run_cli(["llama-3.2-1b", "--tiny", "--protocol", "lm-eval", "--prefix-reuse",
                                 "--data-dir", str(data_dir), "--output", str(tmp_path / "out")], capsys)
    assert code == EXIT_USAGE and len(errors) == 1 and not out
    assert errors[0].startswith("error: --prefix-reuse applies to --protocol study only")
    assert not (tmp_path / "out").exists()
