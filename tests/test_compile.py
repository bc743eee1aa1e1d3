"""torch.compile regions in the trainer (hybridlora.fast.compile), on CPU with tiny models: same numbers as the
eager step with dropout off, compiled modules reset afterwards, bound kernels opaque to dynamo, study job ids
unchanged while compile is off."""
from __future__ import annotations

import json

import pytest
import torch

from hybridlora import fast
from hybridlora.components import build_component_map
from hybridlora.data.formatting import TokenizedExample
from hybridlora.families import family_named
from hybridlora.fast.compile import compile_regions, decoder_layers
from hybridlora.models import build_model, tiny_config_for
from hybridlora.placement import named_preset, resolve
from hybridlora.train import TrainConfig, TrainingError, lora_state, train


def _examples(n: int = 8, length: int = 40) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, 200, (length,), generator=g).tolist()
        out.append(TokenizedExample(f"e{i}", ids, [-100] + ids[1:]))
    return out


def _run(model_type: str, preset: str, scope: str, tmp_path):
    model = build_model(tiny_config_for(model_type))
    resolved = resolve(named_preset(preset, family_named(build_component_map(model).family)), build_component_map(model))
    cfg = TrainConfig(epochs=1, micro_batch_size=4, grad_accum=1, progress=False, save_every=0, norm_every=0,
                      lora_dropout=0.0, compile=scope)  # no dropout: inductor draws other masks than eager
    out = tmp_path / scope
    validation = [_examples(1, length)[0] for length in (9, 17, 23, 31, 40)]  # five batch shapes
    result = train(model, resolved, _examples(), out, cfg, pad_id=0, val_set=validation)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return result, lora_state(result.peft_model), log


@pytest.mark.parametrize("model_type,preset,scope", [("falcon_h1", "all_eligible", "layers"),
                                                     ("qwen3_5_text", "all_layers", "lora")])
def test_compiled_training_matches_eager(model_type, preset, scope, tmp_path):
    from torch._dynamo.utils import counters

    eager, eager_state, _ = _run(model_type, preset, "off", tmp_path)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled, compiled_state, log = _run(model_type, preset, scope, tmp_path)
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo really compiled something
    assert compiled.final_loss == pytest.approx(eager.final_loss, rel=1e-5)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-5)  # validation runs the eager code
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-6, msg=name)
    line = next(r for r in log if r["event"] == "compile")["compile"]
    assert line.startswith(f"{scope}: ") and "compiled" in line
    # handed back running eagerly: no module keeps its compiled forward
    assert not any(getattr(m, "_compiled_call_impl", None) for m in compiled.peft_model.modules())


def test_compile_scope_is_validated():
    with pytest.raises(TrainingError, match="compile must be off, lora or layers"):
        TrainConfig(compile="everything").validate()
    with pytest.raises(ValueError, match="compile scope must be one of"):
        compile_regions(torch.nn.Linear(2, 2), "everything")
    with pytest.raises(ValueError, match="has no such modules"):
        compile_regions(torch.nn.Linear(2, 2), "layers")


def test_decoder_layers_are_the_language_models_stack():
    model = build_model(tiny_config_for("qwen3_5_text"))
    assert decoder_layers(model) is model.model.layers
    assert decoder_layers(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 9))) is None


def test_the_recompile_limit_covers_every_layer_of_a_deep_model_and_is_put_back():
    """Decoding guards each compiled layer on its cache index, so a deep model compiles once per (layer, shape):
    a flat limit of 64 sent Falcon-H1's (36 layers, prefill + step) later compilations back to eager."""
    import torch._dynamo

    from hybridlora.fast.compile import COMPILES_PER_LAYER, uncompile

    before = torch._dynamo.config.recompile_limit
    config = tiny_config_for("falcon_h1")
    config.num_hidden_layers = 40
    with torch.device("meta"):
        model = build_model(config)
    compile_regions(model, "layers")
    try:
        assert torch._dynamo.config.recompile_limit >= COMPILES_PER_LAYER * 40 > 2 * 40
    finally:
        assert uncompile(model) == 40
    assert torch._dynamo.config.recompile_limit == before


def test_compile_errors_end_training_with_a_one_line_hint(tmp_path, monkeypatch):
    """An error from dynamo / Inductor is reported as a TrainingError that says to train with compile off,
    logged, and the model is handed back uncompiled."""
    from torch._dynamo.exc import TorchDynamoException

    import hybridlora.train.loop as loop
    from hybridlora.fast.compile import is_compile_error

    def broken(*args, **kwargs):
        raise TorchDynamoException("lowering failed")

    monkeypatch.setattr(loop, "_eager_forward_backward", broken)
    model = build_model(tiny_config_for("qwen3_5_text"))
    resolved = resolve(named_preset("softmax_only", family_named(build_component_map(model).family)),
                       build_component_map(model))
    cfg = TrainConfig(epochs=1, micro_batch_size=4, grad_accum=1, progress=False, save_every=0, compile="lora")
    with pytest.raises(TrainingError, match="torch.compile .lora. failed: TorchDynamoException: lowering failed; "
                                            "train again with compile: off"):
        train(model, resolved, _examples(), tmp_path / "run", cfg, pad_id=0)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "error" and "compile: off" in log[-1]["message"]
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())
    assert not is_compile_error(ValueError("model code")) and is_compile_error(TorchDynamoException("x"))


def test_bound_kernels_are_opaque_and_torch_methods_stay_traceable():
    """Functions bound by fast.use are graph breaks for dynamo (Triton autotuning, host loops of the
    references); a modeling class's own torch method (a norm's forward left on torch) is traced and fused."""
    import transformers.models.falcon_h1.modeling_falcon_h1 as falcon
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen

    try:
        fast.use("fast")
        assert getattr(falcon.mamba2_chunk_scan, "_hybridlora_opaque", False)
        assert getattr(qwen.torch_chunk_gated_delta_rule, "_hybridlora_opaque", False)
        if not torch.cuda.is_available():  # the norms stay on torch here
            assert not getattr(qwen.Qwen3_5RMSNorm.forward, "_hybridlora_opaque", False)
    finally:
        fast.restore()


def test_study_job_ids_do_not_change_while_compile_is_off():
    from hybridlora.study.config import StudyConfig
    from hybridlora.study.grid import expand_grid

    base = {"name": "t", "models": [{"model": "qwen3.5-0.8b", "tiny": True}], "domains": [{"name": "gsm8k"}], "placements": ["attention_only"],
            "seeds": [0]}
    off = expand_grid(StudyConfig.model_validate(base))
    on = expand_grid(StudyConfig.model_validate({**base, "train": {"compile": "layers"}}))
    trained_off = [j for j in off if j.kind == "train"]
    trained_on = [j for j in on if j.kind == "train"]
    assert "compile" not in trained_off[0].spec["train"]
    assert trained_on[0].spec["train"]["compile"] == "layers"
    assert trained_off[0].id != trained_on[0].id  # a compiled run draws other dropout masks
