"""Verification: liveness of adapters on every required family, and dead adapters flagged by name."""
import pytest

from family_fixtures import REQUIRED_MODEL_TYPES
from hybridlora.components import build_component_map
from hybridlora.families import family_for
from hybridlora.models import build_model, resolve_model, tiny_config_for
from hybridlora.placement import named_preset, resolve
from hybridlora.placement.resolve import Host, ResolvedPlacement
from hybridlora.placement.verify import attach, check_liveness, check_static, verify_placement


def fresh(model_type):
    return build_model(tiny_config_for(model_type))


@pytest.mark.parametrize("model_type", REQUIRED_MODEL_TYPES)
def test_every_eligible_adapter_is_live(model_type):
    model = fresh(model_type)
    cmap = build_component_map(model)
    everything = {"name": "everything", "targets": [{"components": ["softmax_attention", "linear_attention", "ssm",
                                                                     "short_conv", "mlp", "moe", "lm_head", "other"]}]}
    from hybridlora.placement import placement_from_dict
    resolved = resolve(placement_from_dict(everything), cmap)
    peft_model = attach(model, resolved, init_lora_weights=False)
    assert check_static(peft_model, resolved, cmap).ok
    live, dead = check_liveness(peft_model)
    assert dead == {}
    assert len(live) == len(resolved.hosts)


def test_jamba_dt_proj_adapter_is_reported_dead():
    # Jamba's mixer multiplies by dt_proj.weight without calling the module: the family marks it ineligible,
    # and liveness independently proves an adapter there would never act.
    model = fresh("jamba")
    cmap = build_component_map(model)
    targets = [m for m in cmap.modules if m.name.endswith(("mamba.dt_proj", "mamba.x_proj"))]
    assert any(not m.eligible and "kernel-bypassed" in m.reason for m in targets)
    hosts = [Host(m.name, m.component, m.role, m.layer, 4, 8.0, 4 * m.lora_params_per_rank) for m in targets]
    forced = ResolvedPlacement(named_preset("recurrent_only", None), hosts, {}, cmap.total_params)
    live, dead = check_liveness(attach(model, forced, init_lora_weights=False))
    assert sorted(dead) == sorted(m.name for m in targets if m.name.endswith("dt_proj"))
    assert all("no gradient" in why for why in dead.values())
    assert sorted(live) == sorted(m.name for m in targets if m.name.endswith("x_proj"))


def test_perturbation_check_detects_an_adapter_with_no_effect():
    model = fresh("llama")
    cmap = build_component_map(model)
    resolved = resolve(named_preset("value_only", None), cmap)
    peft_model = attach(model, resolved, init_lora_weights=False)
    victim = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    victim.forward = lambda x, *a, **k: victim.base_layer(x)  # LoRA path cut off
    live, dead = check_liveness(peft_model)
    assert list(dead) == ["model.layers.0.self_attn.v_proj"]


@pytest.mark.parametrize("model,placement", [("qwen3.5-0.8b", "all_layers"), ("falcon-h1-0.5b", "all_eligible"),
                                             ("jamba-v0.1", "all"), ("nemotron-nano-9b-v2", "all")])
def test_verify_full_size_catalog_models(model, placement):
    source = resolve_model(model)
    family = family_for(source.config.model_type) or family_for(getattr(source.config, "text_config", source.config).model_type)
    report, resolved = verify_placement(source.config, named_preset(placement, family))
    assert report.ok, {k: v for k, v in report.to_dict().items() if k != "live"}
    assert report.liveness_checked_on == "tiny same-family model"
    assert len(report.live) == len(resolved.hosts)
