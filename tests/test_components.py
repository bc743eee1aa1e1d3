"""Component maps: golden maps of every required family, topology, schedules, counts, structural fallback."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from family_fixtures import REQUIRED_MODEL_TYPES, compact_map, tiny_map, tiny_model
from hybridlora import components
from hybridlora.components import build_component_map
from hybridlora.models import build_meta_model, resolve_model

GOLDEN = json.loads((Path(__file__).parent / "golden" / "component_maps.json").read_text())


@pytest.mark.parametrize("model_type", REQUIRED_MODEL_TYPES)
def test_golden_component_map(model_type):
    cmap = tiny_map(model_type)
    golden = GOLDEN[model_type]
    assert cmap.unclassified == []
    assert cmap.classifier == "family table"
    assert cmap.topology == golden["topology"]
    assert [[layer.kind, layer.mixers] for layer in cmap.schedule] == golden["schedule"]
    assert cmap.total_params == golden["total_params"]
    assert compact_map(cmap) == golden["modules"]


@pytest.mark.parametrize("model_type", REQUIRED_MODEL_TYPES)
def test_every_parameter_is_counted_once(model_type):
    cmap = tiny_map(model_type)
    model = tiny_model(model_type)
    assert sum(m.params for m in cmap.modules) == sum(p.numel() for p in model.parameters())


def test_olmo_hybrid_linear_mixer_names_are_not_attention():
    # Trap: OLMo hybrid's Gated DeltaNet reuses q_proj/k_proj/v_proj/o_proj.
    cmap = tiny_map("olmo_hybrid")
    for m in cmap.modules:
        if ".linear_attn." in m.name:
            assert m.component == "linear_attention", m.name
        if ".self_attn." in m.name and m.name.endswith("_proj"):
            assert m.component == "softmax_attention", m.name


def test_kimi_linear_mixers_share_self_attn_but_are_told_apart():
    source = resolve_model("kimi-linear-48b-a3b")
    cmap = build_component_map(build_meta_model(source.config))
    kinds = {layer.index: layer.kind for layer in cmap.schedule}
    q_projs = [m for m in cmap.modules if m.name.endswith("self_attn.q_proj")]
    assert q_projs, "Kimi catalog entry should have q_proj modules"
    for m in q_projs:
        expected = "linear_attention" if kinds[m.layer] == "linear_attention" else "softmax_attention"
        assert m.component == expected, m.name
    assert {m.component for m in q_projs} == {"linear_attention", "softmax_attention"}
    assert cmap.unclassified == []


def test_zamba2_shared_block_weights_are_counted_once():
    cmap = tiny_map("zamba2")
    later = [m for m in cmap.modules if m.name.startswith("model.layers.3.shared_transformer")]
    assert later and all(m.params == 0 for m in later)
    assert all(m.tied_to == m.name.replace("layers.3", "layers.1") for m in later)
    assert cmap.schedule[1].mixers == cmap.schedule[3].mixers == ["softmax_attention", "ssm"]


def test_topologies():
    assert tiny_map("falcon_h1").topology == "parallel"
    assert all(layer.mixers == ["softmax_attention", "ssm"] for layer in tiny_map("falcon_h1").schedule)
    for mt in ("qwen3_5_text", "jamba", "bamba", "lfm2", "llama"):
        assert tiny_map(mt).topology == "sequential"


def test_qwen35_full_size_map_matches_published_facts():
    cmap = build_component_map(build_meta_model(resolve_model("qwen3.5-0.8b").config))
    assert cmap.total_params == 752_393_024
    full = [layer.index for layer in cmap.schedule if layer.kind == "full_attention"]
    assert full == list(range(3, 24, 4))
    assert all(layer.mixers == ["linear_attention"] for layer in cmap.schedule if layer.index not in full)
    head = cmap.module("lm_head")
    assert head.tied_to == "model.embed_tokens" and head.params == 0
    q = cmap.module("model.layers.3.self_attn.q_proj")
    assert (q.in_features, q.out_features) == (1024, 2 * 8 * 256)  # q carries the output gate


def test_falcon_h1_full_size_map():
    cmap = build_component_map(build_meta_model(resolve_model("tiiuae/Falcon-H1-0.5B-Base").config))
    assert cmap.total_params == 521_411_104
    assert cmap.topology == "parallel" and len(cmap.schedule) == 36
    out = cmap.module("model.layers.0.mamba.out_proj")
    assert not out.eligible and "kernel-bypassed" in out.reason
    assert cmap.module("lm_head").params == 32_784 * 1024  # untied


def test_structural_classifier_agrees_with_family_table(monkeypatch):
    model = tiny_model("qwen3_5_text")
    by_table = {m.name: m.component for m in build_component_map(model).modules}
    monkeypatch.setattr(components, "family_for", lambda model_type: None)
    structural = build_component_map(model)
    assert structural.classifier == "structural" and structural.family is None
    assert structural.unclassified == []
    for m in structural.modules:
        if isinstance(model.get_submodule(m.name), nn.Linear):
            assert m.component == by_table[m.name], m.name
    assert structural.topology == "sequential"


def test_structural_classifier_lists_what_it_cannot_classify(monkeypatch):
    model = tiny_model("llama")
    model.model.mystery = nn.Linear(4, 4)
    try:
        monkeypatch.setattr(components, "family_for", lambda model_type: None)
        cmap = build_component_map(model)
    finally:
        del model.model.mystery
    assert cmap.unclassified == ["model.mystery (Linear)"]
    assert cmap.module("model.mystery").component == "other"


def test_meta_map_has_no_memory():
    model = build_meta_model(resolve_model("qwen3.5-0.8b").config)
    assert all(p.device == torch.device("meta") for p in model.parameters())
