"""The architecture lab, stage 1: spec -> matched models, one layer class, transformers/PEFT integration."""
from __future__ import annotations

import pytest
import torch

from hybridlora.cli import main
from hybridlora.components import build_component_map
from hybridlora.lab import spec_from_dict, variants
from hybridlora.lab.model import LabConfig, LabForCausalLM
from hybridlora.lab.solve import build, solve
from hybridlora.lab.spec import SpecError

TINY = dict(name="t", vocab_size=300, depth=4, target_params=300_000, head_dim=16, mixers=["attention", "gdn"],
            ratio="3:1", fusion="sum")


def tiny_spec(**changes):
    return spec_from_dict({**TINY, **changes})


@pytest.mark.parametrize("recurrent", ["gdn", "mamba2"])
def test_every_variant_meets_the_parameter_target_within_one_percent(recurrent):
    for name, spec in variants(tiny_spec(mixers=["attention", recurrent])).items():
        config, match = solve(spec)
        model = LabForCausalLM(config)
        assert match.achieved == sum(p.numel() for p in model.parameters()), name
        assert abs(match.achieved - 300_000) / 300_000 <= 0.01, (name, match.line())
    assert set(variants(tiny_spec())) == {"sequential", "parallel", "all_attention", "all_recurrent"}


def test_placement_rule_spreads_attention_and_never_puts_it_first():
    assert tiny_spec(depth=8).layer_mixers() == [("gdn",), ("gdn",), ("gdn",), ("attention",)] * 2
    assert tiny_spec(depth=6, ratio="1:1").layer_mixers()[0] == ("gdn",)
    first = tiny_spec(depth=8, attention_first=True).layer_mixers()
    assert first[0] == ("attention",) and first.count(("attention",)) == 2


def _module_kinds(model):
    """(class name, parameter shapes) of every module: what a model holds, without where it is wired."""
    return sorted({type(m).__name__ for m in model.modules()})


def test_sequential_and_parallel_hold_the_same_kinds_of_modules():
    seq, _ = build(tiny_spec(fusion="sum"))
    par, _ = build(tiny_spec(topology="parallel", ratio=None, fusion="sum"))
    assert _module_kinds(seq) == _module_kinds(par)
    # the same decoder layer class, norms, MLP and embedding everywhere; zero-centred norms start at zero
    for model in (seq, par):
        assert {type(layer).__name__ for layer in model.model.layers} == {"LabDecoderLayer"}
        norms = [m.weight for n, m in model.named_modules() if type(m).__name__ == "Qwen3_5RMSNorm"]
        assert norms and all(torch.count_nonzero(w) == 0 for w in norms)
    # normalized fusion only adds its norms and projection
    normed, _ = build(tiny_spec(topology="parallel", ratio=None, fusion="normalized"))
    assert set(_module_kinds(normed)) - set(_module_kinds(par)) == {"LabFusion", "ModuleDict"}


@pytest.mark.parametrize("recurrent", ["gdn", "mamba2"])
@pytest.mark.parametrize("silenced", ["attention", "recurrent"])
def test_sum_parallel_layer_with_one_branch_zeroed_equals_the_other_branchs_sequential_layer(recurrent, silenced):
    kept = recurrent if silenced == "attention" else "attention"
    drop = "attention" if silenced == "attention" else recurrent
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, fusion="sum",
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
                  linear_num_value_heads=2, mamba_n_heads=4, mamba_chunk_size=8)
    torch.manual_seed(0)
    parallel = LabForCausalLM(LabConfig(layer_mixers=[["attention", recurrent]] * 2, **common)).eval()
    sequential = LabForCausalLM(LabConfig(layer_mixers=[[kept]] * 2, **common)).eval()
    missing, unexpected = sequential.load_state_dict(parallel.state_dict(), strict=False)
    assert not missing and unexpected  # every sequential weight comes from the parallel model
    for layer in parallel.model.layers:
        layer.silenced = {drop}
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(parallel(x).logits, sequential(x).logits, rtol=0, atol=1e-5)
        for layer in parallel.model.layers:
            layer.silenced = set()
        assert not torch.allclose(parallel(x).logits, sequential(x).logits, atol=1e-3)  # both branches count


@pytest.mark.parametrize("mixers,topology", [(["attention", "gdn"], "parallel"), (["attention", "mamba2"], "sequential"),
                                             (["attention", "short_conv"], "sequential")])
def test_save_load_same_logits_and_generate_matches_uncached(tmp_path, mixers, topology):
    from transformers import AutoModelForCausalLM

    spec = tiny_spec(mixers=mixers, topology=topology, ratio=None if topology == "parallel" else "3:1",
                     fusion="normalized", target_params=0, width=32)
    model, _ = build(spec, seed=3)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is LabForCausalLM
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
        out = loaded.generate(x[:, :4], max_new_tokens=6, do_sample=False)
        ids = x[:, :4]
        for _ in range(6):  # the cached decode equals greedy decoding without a cache
            ids = torch.cat([ids, loaded(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_component_map_classifies_every_module_and_infers_topology(tmp_path):
    par, _ = build(tiny_spec(topology="parallel", ratio=None, fusion="normalized", mixers=["attention", "mamba2"]))
    seq, _ = build(tiny_spec())
    for model, topology in ((par, "parallel"), (seq, "sequential")):
        cmap = build_component_map(model)
        assert cmap.family == "lab" and not cmap.unclassified and cmap.topology == topology
    comps = {(m.component, m.role) for m in build_component_map(par).modules}
    assert {("ssm", "in"), ("softmax_attention", "q"), ("other", "fuse"), ("mlp", "down")} <= comps
    assert not build_component_map(par).module("model.layers.0.mamba.out_proj").eligible  # kernel-bypassed


def test_peft_attach_liveness_and_reload(tmp_path):
    from hybridlora.placement import named_preset, resolve
    from hybridlora.placement.verify import verify_placement
    from hybridlora.train.loop import attach_lora, load_adapter

    spec = tiny_spec(topology="parallel", ratio=None, fusion="normalized")
    model, _ = build(spec, seed=1)
    model.save_pretrained(tmp_path / "base")
    for preset in ("attention_only", "recurrent_only", "all"):
        report, _ = verify_placement(model.config, named_preset(preset, None), model=build(spec, seed=1)[0])
        assert report.ok and not report.dead, (preset, report.dead)
    cmap = build_component_map(model)
    peft = attach_lora(model, resolve(named_preset("all", None), cmap), dropout=0.0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        expected = peft.eval()(x).logits
        reloaded = load_adapter(LabForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(x).logits, expected)


def test_cli_inspect_and_verify_on_a_built_lab_model(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nvocab_size: 300\ndepth: 4\ntarget_params: 200000\nmixers: [attention, gdn]\n"
                    "ratio: '3:1'\n")
    assert main(["lab", "build", str(spec), "--variants", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "s-parallel" in out and "s-all-attention" in out
    assert main(["inspect", str(tmp_path / "out" / "s-parallel")]) == 0
    assert "parallel" in capsys.readouterr().out
    # liveness runs on a small same-family model that keeps the depth (the only attention layer is the last)
    assert main(["verify", str(tmp_path / "out" / "s-sequential"), "--placement", "recurrent_only",
                 "--placement", "attention_only"]) == 0


@pytest.mark.parametrize("text,needle", [
    ("depth: 0\n", "depth must be at least 1"),
    ("mixers: [attention, lstm]\n", "unknown mixer(s) lstm"),
    ("topology: parallel\nmixers: [gdn, mamba2]\n", "parallel layer runs attention beside one recurrent mixer"),
    ("pattern: [attention, gdn]\n", "starts with attention"),
    ("ratio: three\n", "RECURRENT:ATTENTION"),
    ("widht: 64\n", "unknown field(s) widht"),
    ("target_params: 10\n", "below the smallest model"),
    ("depth: [\n", "not valid YAML"),
    ("fusion: concat\n", "fusion must be one of"),
])
def test_bad_specs_are_one_error_line(tmp_path, capsys, text, needle):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    assert main(["lab", "build", str(spec), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_spec_names_the_shipped_ones(capsys):
    assert main(["lab", "build", "no-such-spec"]) == 2
    assert "tiny-gdn" in capsys.readouterr().err


def test_spec_errors_are_spec_errors():
    with pytest.raises(SpecError):
        spec_from_dict({"mixers": ["gdn", "mamba2"], "ratio": "1:1"})


def test_gradient_checkpointing_gives_the_same_gradients():
    model, _ = build(tiny_spec(topology="parallel", ratio=None, fusion="normalized"), seed=0)
    x = torch.randint(0, 300, (2, 10))

    def grads():
        model.zero_grad()
        model.train()
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing and callable(model.model._gradient_checkpointing_func)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_all_recurrent_controls_generate_like_uncached_greedy(mixer):
    """A stack without attention has no KV cache layer to count tokens: cached decoding must still work."""
    model = LabForCausalLM(LabConfig(layer_mixers=[[mixer]], num_hidden_layers=2, mamba_chunk_size=8)).eval()
    x = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=4, do_sample=False)
        ids = x
        for _ in range(4):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
