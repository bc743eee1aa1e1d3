"""Several ablation conditions in one batch (``ablate --conditions-per-batch``): each row computes what its
condition computes alone, in every family, and every path that runs a forward keeps a row's copies together."""
from __future__ import annotations

import pytest
import torch

from family_fixtures import REQUIRED_MODEL_TYPES, tiny_model
from hybridlora.ablation.methods import Ablation, AblationError, SharedAblation, collect_means, model_units
from hybridlora.components import build_component_map


def _conditions(mu, means_for):
    """Intact, a whole component, one unit of another, a mean, and a whole layer (sequential models)."""
    mixers = [c for c in mu.components if c not in ("mlp", "moe")]
    first = mu.of(mixers[0])
    other = mu.of(mixers[-1])[-1:]
    conditions = [([], "none"), (first, "zero" if first[0].parallel else "skip"),
                  (other, "zero" if other[0].parallel else "skip"), (mu.units[:1], "mean")]
    if not any(u.parallel for u in mu.units):
        conditions.append(([mu.units[-1]], "skip_layer"))
    return conditions


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("model_type", REQUIRED_MODEL_TYPES)
def test_each_row_computes_what_its_condition_computes_alone(model_type):
    model = tiny_model(model_type)
    mu = model_units(build_component_map(model))
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    means = collect_means(model, mu.units[:1], mu.layers_path, [ids[0].tolist()])
    conditions = _conditions(mu, means)
    alone = []
    for units, method in conditions:
        if method == "none":
            alone.append(_logits(model, ids))
            continue
        with Ablation(model, units, method, mu.layers_path, means=means):
            alone.append(_logits(model, ids))
    k = len(conditions)
    with SharedAblation(model, conditions, mu.layers_path, means=means):
        shared = _logits(model, ids.repeat_interleave(k, 0))  # row r: condition r % k
    for c in range(k):
        torch.testing.assert_close(shared[c::k], alone[c], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[1], alone[0], atol=1e-4)  # the conditions differ, so the test can fail
    assert torch.equal(_logits(model, ids), alone[0])  # detached: intact again


def test_a_batch_that_splits_a_rows_copies_is_refused():
    model = tiny_model("qwen3_5_text")
    mu = model_units(build_component_map(model))
    conditions = [([], "none"), (mu.of("softmax_attention"), "skip"), (mu.of("linear_attention"), "skip")]
    with SharedAblation(model, conditions, mu.layers_path), pytest.raises(AblationError, match="3 conditions"):
        _logits(model, torch.ones((4, 6), dtype=torch.long))


def test_mean_conditions_need_stored_means():
    model = tiny_model("qwen3_5_text")
    mu = model_units(build_component_map(model))
    with pytest.raises(AblationError, match="no stored mean"):
        SharedAblation(model, [([], "none"), (mu.units[:1], "mean")], mu.layers_path, means={})
