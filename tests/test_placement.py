"""Placements: study presets on the full-size models, exact module names, YAML specs, budgets, PEFT configs."""
import json
import re

import pytest
from peft import LoraConfig

from family_fixtures import tiny_map
from hybridlora.components import build_component_map
from hybridlora.families import family_named
from hybridlora.models import build_meta_model, resolve_model
from hybridlora.placement import (
    PlacementError, load_placement_file, lora_config, match_budget, named_preset, placement_from_dict, preset_group,
    resolve, save_adapter_config,
)
from hybridlora.placement.verify import attach, check_static, lora_hosts


def full_map(name):
    return build_component_map(build_meta_model(resolve_model(name).config))


@pytest.fixture(scope="module")
def qwen_map():
    return full_map("qwen3.5-0.8b")


@pytest.fixture(scope="module")
def falcon_map():
    return full_map("falcon-h1-0.5b")


@pytest.mark.parametrize("model,family", [("qwen3.5-0.8b", "qwen3_5"), ("falcon-h1-0.5b", "falcon_h1")])
def test_study_presets_trainable_params_equal_peft_on_full_size_models(model, family):
    for placement in preset_group("study", family_named(family)):
        model_meta = build_meta_model(resolve_model(model).config)  # PEFT modifies the model: fresh one each
        cmap = build_component_map(model_meta)
        resolved = resolve(placement, cmap)
        report = check_static(attach(model_meta, resolved), resolved, cmap)
        assert report.ok, report.to_dict()
        assert report.peft_trainable == resolved.trainable_params > 0


def test_qwen_study_names_and_hosts(qwen_map):
    names = [p.name for p in preset_group("study", family_named("qwen3_5"))]
    assert names == ["study/all_layers", "study/softmax_only", "study/gdn_only", "study/mlp_only",
                     "study/softmax_plus_mlp", "study/gdn_plus_mlp"]
    softmax = resolve(named_preset("softmax_only", family_named("qwen3_5")), qwen_map)
    assert {h.layer for h in softmax.hosts} == set(range(3, 24, 4))
    assert len(softmax.hosts) == 6 * 4
    gdn = resolve(named_preset("gdn_only", family_named("qwen3_5")), qwen_map)
    assert sorted({h.name.rsplit(".", 1)[1] for h in gdn.hosts}) == [
        "in_proj_a", "in_proj_b", "in_proj_qkv", "in_proj_z", "out_proj"]
    assert len(gdn.hosts) == 18 * 5
    # LoRA params of softmax_only at r=16: per full-attention layer 16 × ((1024+4096) + 2×(1024+512) + (2048+1024))
    assert softmax.trainable_params == 6 * 16 * ((1024 + 4096) + 2 * (1024 + 512) + (2048 + 1024))


def test_falcon_study_conditions(falcon_map):
    fam = family_named("falcon_h1")
    attn = resolve(named_preset("study/attention_only", fam), falcon_map)
    assert {h.role for h in attn.hosts} == {"q", "k", "v"}  # the study left o_proj out
    generic = resolve(named_preset("attention_only", fam), falcon_map)  # one name, one meaning: all four
    assert {h.role for h in generic.hosts} == {"q", "k", "v", "o"} and generic.name == "attention_only"
    everything = resolve(named_preset("all_eligible", fam), falcon_map)
    names = {h.name for h in everything.hosts}
    assert "lm_head" in names
    assert not any(n.endswith(("mamba.out_proj", "mamba.conv1d")) for n in names)
    ssm = resolve(named_preset("ssm_only", fam), falcon_map)
    assert all(h.name.endswith("mamba.in_proj") for h in ssm.hosts) and len(ssm.hosts) == 36


def test_lora_config_uses_exact_full_names_that_never_hit_other_components():
    # OLMo hybrid: "q_proj" exists in both mixers; the config must adapt only the attention one.
    cmap = tiny_map("olmo_hybrid")
    resolved = resolve(named_preset("attention_only", None), cmap)
    config = lora_config(resolved)
    assert all(name.startswith("model.layers.") for name in config.target_modules)
    hosts = lora_hosts(attach(tiny_model_fresh("olmo_hybrid"), resolved))
    assert set(hosts) == {h.name for h in resolved.hosts}
    assert not any(".linear_attn." in n for n in hosts)


def tiny_model_fresh(model_type):
    from hybridlora.models import build_model, tiny_config_for
    return build_model(tiny_config_for(model_type))


def test_yaml_placement_with_layer_ranges_and_per_target_rank(tmp_path):
    path = tmp_path / "late_attn.yaml"
    path.write_text(
        "rank: 8\nalpha: 16\ntargets:\n"
        "  - components: [softmax_attention]\n    roles: [q, v]\n    layers: '12-23'\n    rank: 32\n    alpha: 64\n"
        "  - components: [mlp]\n    layers: [0, 1]\n"
    )
    placement = load_placement_file(path)
    assert placement.name == "late_attn"
    cmap = tiny_map("qwen3_5_text")
    # the tiny model has 4 layers: re-target the same spec at its range
    spec = placement_from_dict({
        "name": "p", "rank": 8, "alpha": 16, "targets": [
            {"components": ["softmax_attention"], "roles": ["q", "v"], "layers": "3", "rank": 32, "alpha": 64},
            {"components": ["mlp"], "layers": [0, 1]}]})
    resolved = resolve(spec, cmap)
    ranks = resolved.ranks()
    assert ranks["model.layers.3.self_attn.q_proj"] == 32 and ranks["model.layers.0.mlp.up_proj"] == 8
    assert len(resolved.hosts) == 2 + 6
    peft_model = attach(tiny_model_fresh("qwen3_5_text"), resolved)
    report = check_static(peft_model, resolved, cmap)
    assert report.ok, report.to_dict()
    config = lora_config(resolved)
    assert config.r == 8 and set(config.rank_pattern.values()) == {32}


def test_budget_matching_equalises_placements(qwen_map):
    fam = family_named("qwen3_5")
    budget = 3_000_000
    for name in ("softmax_only", "gdn_only", "mlp_only", "all_layers"):
        resolved = resolve(named_preset(name, fam), qwen_map)
        matched, report = match_budget(resolved, budget)
        assert report.achieved == matched.trainable_params
        assert abs(report.relative_error) < 0.005, (name, report)
        for h in matched.hosts:
            assert h.alpha / h.rank == pytest.approx(2.0)  # the LoRA scale alpha/r is kept


def test_budget_below_rank_one_is_refused(qwen_map):
    resolved = resolve(named_preset("all_layers", family_named("qwen3_5")), qwen_map)
    with pytest.raises(PlacementError, match="below what placement"):
        match_budget(resolved, 1000)


def test_budgeted_ranks_reach_peft():
    cmap = tiny_map("falcon_h1")
    resolved, _ = match_budget(resolve(named_preset("all_eligible", family_named("falcon_h1")), cmap), 20_000)
    report = check_static(attach(tiny_model_fresh("falcon_h1"), resolved), resolved, cmap)
    assert report.ok, report.to_dict()


def test_adapter_config_round_trips_through_peft(tmp_path):
    cmap = tiny_map("qwen3_5_text")
    resolved = resolve(named_preset("all", None), cmap)
    path = save_adapter_config(resolved, tmp_path / "adapter", base_model="tiny")
    loaded = LoraConfig.from_pretrained(str(path.parent))
    assert sorted(loaded.target_modules) == sorted(h.name for h in resolved.hosts)
    assert json.loads(path.read_text())["r"] == 16


def test_explicit_role_on_kernel_bypassed_module_is_an_error(falcon_map):
    spec = placement_from_dict({"name": "bad", "targets": [{"components": ["ssm"], "roles": ["out"]}]})
    with pytest.raises(PlacementError, match="kernel-bypassed"):
        resolve(spec, falcon_map)


def test_placement_that_matches_nothing_is_an_error():
    with pytest.raises(PlacementError, match="matches no eligible module"):
        resolve(named_preset("recurrent_only", None), tiny_map("llama"))


@pytest.mark.parametrize("data,message", [
    ({"name": "x", "targets": [{"components": ["attention"]}]}, "unknown component type"),
    ({"name": "x", "targets": []}, "targets"),
    ({"name": "x", "targets": [{"components": ["mlp"], "rank": 0}]}, "rank"),
    ({"name": "x", "targets": [{"components": ["mlp"], "layers": "5-2"}]}, "end before start"),
    ({"name": "x", "targets": [{"components": ["mlp"], "colour": "red"}]}, "Extra inputs"),
])
def test_bad_placement_specs(data, message):
    with pytest.raises(PlacementError, match=message):
        placement_from_dict(data)


def test_bad_yaml_reports_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntargets: [\n  - components: [mlp\n")
    with pytest.raises(PlacementError, match=re.escape(str(path)) + ": invalid YAML at line"):
        load_placement_file(path)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(PlacementError, match="softmax_only"):
        named_preset("softmax_everything", family_named("qwen3_5"))
    with pytest.raises(PlacementError, match="Qwen3.5 and Falcon-H1 only"):
        preset_group("study", family_named("bamba"))


def test_unknown_placement_lists_each_name_once_and_suggests_the_closest():
    from hybridlora.placement import PlacementError

    with pytest.raises(PlacementError) as err:
        named_preset("atention_only", family_named("falcon_h1"))
    message = str(err.value)
    assert "did you mean 'attention_only'?" in message
    names = [n.strip() for part in message.split(": ")[1:] for n in part.split(";")[0].split("(")[0].split(",")]
    assert len(names) == len(set(names)), message  # no name listed twice
    assert "study/attention_only" in message and "hybridlora presets" in message
    # a study-only name needs no prefix (it cannot mean anything else) and comes back under its study/ name
    assert named_preset("ssm_only", family_named("falcon_h1")).name == "study/ssm_only"
    with pytest.raises(PlacementError, match="did you mean 'study/gdn_only'"):
        named_preset("study/gdn_onyl", family_named("qwen3_5"))
