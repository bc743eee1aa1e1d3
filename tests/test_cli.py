"""The command line: JSON contract of `plan`, inspect, verify exit codes, one-line errors for bad input."""
import json
import subprocess
import sys

import pytest

from hybridlora.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_study_json_contract(capsys):
    code, out, err = run(capsys, "plan", "qwen3.5-0.8b", "--preset", "study", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["study/all_layers", "study/softmax_only", "study/gdn_only",
                                         "study/mlp_only", "study/softmax_plus_mlp", "study/gdn_plus_mlp"]
    for r in rows:
        assert isinstance(r["trainable_params"], int) and r["trainable_params"] > 0
        assert r["num_target_modules"] == len(r["target_modules"]) == len(r["rank_pattern"])
        assert all(name.startswith("model.layers.") for name in r["target_modules"])
        assert 0 < r["pct_trainable"] < 100
        assert r["pct_trainable"] == pytest.approx(100 * r["trainable_params"] / 752_393_024, abs=1e-4)


def test_plan_falcon_by_hub_id_offline_uses_catalog(capsys):
    code, out, err = run(capsys, "plan", "tiiuae/Falcon-H1-0.5B-Base", "--preset", "study", "--format", "json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert "lm_head" in rows["study/all_eligible"]["target_modules"]


def test_plan_budget_and_save_config(capsys, tmp_path):
    code, out, err = run(capsys, "plan", "qwen3.5-0.8b", "--placement", "softmax_only", "--placement", "gdn_only",
                         "--budget", "2000000", "--format", "json", "--save-config", str(tmp_path))
    assert code == 0, err
    rows = json.loads(out)
    for r in rows:
        assert r["budget"]["requested"] == 2_000_000
        assert abs(r["budget"]["relative_error"]) < 0.01
        saved = json.loads((tmp_path / r["name"] / "adapter_config.json").read_text())
        assert sorted(saved["target_modules"]) == sorted(r["target_modules"])


def test_inspect_table_and_json(capsys):
    code, out, _ = run(capsys, "inspect", "falcon-h1-0.5b")
    assert code == 0 and "parallel" in out and "521,411,104" in out
    code, out, _ = run(capsys, "inspect", "lfm2-350m", "--format", "json")
    data = json.loads(out)
    assert data["family"] == "lfm2" and "short_conv" in data["params_by_component"]


def test_verify_ok(capsys):
    code, out, err = run(capsys, "verify", "qwen3.5-0.8b", "--placement", "softmax_only")
    assert code == 0, out + err
    assert out.startswith("[OK] study/softmax_only: 24/24 hosts")


@pytest.mark.parametrize("argv,message", [
    (["inspect", "qwen3.5-0.9b"], "did you mean qwen3.5-0.8b"),
    (["plan", "llama-3.2-1b", "--placement", "recurrent_only"], "matches no eligible module"),
    (["plan", "falcon-h1-0.5b", "--placement", "gdn_only"], "unknown placement 'gdn_only'"),
    (["plan", "bamba-9b", "--preset", "study"], "Qwen3.5 and Falcon-H1 only"),
    (["plan", "qwen3.5-0.8b", "--placement", "missing.yaml"], "not found"),
])
def test_bad_inputs_one_line_nonzero(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_kernel_bypassed_target_is_refused_with_reason(capsys, tmp_path):
    spec = tmp_path / "out.yaml"
    spec.write_text("targets:\n  - components: [ssm]\n    roles: [out]\n")
    code, _, err = run(capsys, "plan", "falcon-h1-0.5b", "--placement", str(spec))
    assert code == 2 and "kernel-bypassed" in err and "mamba.out_proj" in err


def test_bad_yaml_is_one_line(capsys, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("targets: [\n")
    code, _, err = run(capsys, "plan", "qwen3.5-0.8b", "--placement", str(spec))
    assert code == 2 and "invalid YAML" in err and err.count("\n") == 1


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "hybridlora.cli", "catalog", "--format", "json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {"qwen3.5-0.8b", "falcon-h1-0.5b"} <= names


def test_verify_local_directory_with_weights(capsys, tmp_path):
    from hybridlora.models import build_model, tiny_config_for

    build_model(tiny_config_for("falcon_h1")).save_pretrained(tmp_path / "tiny-falcon")
    code, out, err = run(capsys, "verify", str(tmp_path / "tiny-falcon"), "--preset", "study", "--load-weights")
    assert code == 0, out + err
    assert out.count("[OK]") == 6 and "liveness on model" in out
    code, out, err = run(capsys, "inspect", str(tmp_path / "tiny-falcon" / "config.json"), "--format", "json")
    assert code == 0 and json.loads(out)["topology"] == "parallel"
