"""Several ablation conditions in one batch (``ablate --conditions-per-batch``): each row computes what its
condition computes alone, in every family, and every path that runs a forward keeps a row's copies together."""
from __future__ import annotations

import copy
import json
import sqlite3

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


def _records(root, job: str) -> dict:
    """Every per-instance line a job wrote (benchmark JSONL and perplexity windows), by file."""
    out = {}
    for path in sorted((root / "runs" / job).rglob("*.jsonl")):
        out[path.name] = [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                          for line in path.read_text().splitlines()]
    return out


def test_conditions_sharing_batches_get_the_records_they_get_alone(tmp_path, data_dir, capsys):
    """Seven conditions (skip and mean of three removals, and the intact model) in groups of three — the last
    group filled with intact rows — against the same conditions run one by one: every perplexity window, every
    multiple-choice score and every generated completion equal."""
    from hybridlora.cli import main
    from test_ablation import _args

    extra = ["--remove", "softmax_attention", "--remove", "linear_attention@0-1", "--remove", "mlp@0",
             "--method", "skip,mean", "--benchmarks", "mmlu,gsm8k", "--limit", "3", "--max-new-tokens", "6",
             "--format", "json", "--no-report"]
    objects, roots = {}, {}
    for k in (1, 3):
        roots[k] = tmp_path / f"k{k}"
        roots[k].mkdir()
        assert main(_args(roots[k], data_dir, *extra, "--conditions-per-batch", str(k))) == 0
        objects[k] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(objects[1]) == 7
    for alone, shared in zip(objects[1], objects[3]):
        assert (alone["name"], alone["method"]) == (shared["name"], shared["method"])
        assert alone["metrics"] == shared["metrics"]
        assert _records(roots[1] / "abl", alone["job"]) == _records(roots[3] / "abl", shared["job"])
    assert len({json.dumps(o["metrics"]["perplexity"]) for o in objects[3]}) == 7  # the conditions differ
    db = sqlite3.connect(roots[3] / "abl" / "study.db")
    summaries = [json.loads(s) for (s,) in db.execute("SELECT summary FROM metrics WHERE benchmark = 'mmlu'")]
    assert len(summaries) == 7
    assert all(s["conditions_per_batch"] == 3 and s["settings"]["batch_size"] == 8 for s in summaries)
    assert [a for (a,) in db.execute("SELECT attempts FROM jobs")] == [1] * 7


# not named `benchmark`: pytest-benchmark, where installed, owns a fixture of that name and fails the test's set-up
@pytest.mark.parametrize("bench_name, limit", [("arc_challenge", 6), ("mmlu", 64)])  # one prefix; per subject
def test_prefix_reuse_with_shared_conditions_scores_as_each_condition_alone(data_dir, bench_name, limit):
    from hybridlora.ablation.shared import SharedLM
    from hybridlora.evaluate.lm import CausalLM
    from hybridlora.evaluate.runner import prepare_benchmark
    from hybridlora.evaluate.tokenizer import byte_tokenizer

    model = tiny_model("qwen3_5_text")
    mu = model_units(build_component_map(model))
    ids = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    units = mu.of("linear_attention")[:2]
    means = collect_means(model, units, mu.layers_path, [ids[0].tolist()])
    conditions = [([], "none"), (units, "skip"), (units, "mean")]
    alone = []
    for units_, method in conditions:
        lm = CausalLM(model, byte_tokenizer(), batch_size=4, max_length=1536, prefix_reuse=True)
        prepared = prepare_benchmark(lm, bench_name, data_dir=data_dir, limit=limit)
        if method == "none":
            alone.append(lm.score_choices(prepared.inputs))
            continue
        with Ablation(model, units_, method, mu.layers_path, means=means):
            alone.append(lm.score_choices(prepared.inputs))
    assert lm.prefix_reused_rows >= 2 and lm.prefix_reuse_note is None
    fanned = CausalLM(model, byte_tokenizer(), batch_size=12, max_length=1536, prefix_reuse=True, copies=3)
    shared = SharedLM(fanned, 3)
    with SharedAblation(model, conditions, mu.layers_path, means=means):
        scores = [shared.view(c).score_choices(prepared.inputs) for c in range(3)]
    assert fanned.prefix_reuse_note is None and shared.view(0).prefix_reused_rows == lm.prefix_reused_rows
    for c in range(3):
        assert max(abs(a - b) for x, y in zip(scores[c], alone[c]) for a, b in zip(x, y)) <= 1e-4
    assert max(abs(a - b) for x, y in zip(alone[0], alone[1]) for a, b in zip(x, y)) > 1e-3  # they differ


def test_a_condition_asking_twice_for_one_request_is_an_error():
    from hybridlora.ablation.shared import SharedLM

    class Scorer:
        def score_choices(self, rows):
            return [[float(i)] for i in range(len(rows))]

    shared = SharedLM(Scorer(), 2)
    rows = [([1, 2], [], [3])]
    assert shared.view(1).score_choices(rows) == [[1.0]]  # row 0's second copy
    assert shared.view(0).score_choices(rows) == [[0.0]]
    shared.view(0).score_choices(rows)  # a new round: computed again
    with pytest.raises(RuntimeError, match="asked twice"):
        shared.view(0).score_choices(rows)
@pytest.mark.parametrize("model_type", ["qwen3_5_text", "falcon_h1"])
def test_shared_decoding_gives_each_condition_its_own_tokens(model_type):
    """The static decode loop over interleaved rows (its step a CUDA graph where CUDA is present, recording the
    hooks) decodes for each condition the tokens it decodes alone; eos cleared so that every step runs."""
    from hybridlora.fast.decode import greedy_generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = copy.deepcopy(tiny_model(model_type)).to(device)  # a copy: the cached CPU model stays as other tests expect
    model.generation_config.eos_token_id = None
    mu = model_units(build_component_map(model))
    ids = torch.randint(1, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1)).to(device)
    mixers = [c for c in mu.components if c not in ("mlp", "moe")]
    conditions = [([], "none")] + [(mu.of(c), "zero" if mu.of(c)[0].parallel else "skip") for c in mixers]
    graphs = device == "cuda"

    def run(ids):
        with torch.inference_mode():
            return greedy_generate(model, ids, torch.ones_like(ids), max_new_tokens=12, pad_token_id=0,
                                   graphs=graphs)
    alone = []
    for units, method in conditions:
        if method == "none":
            alone.append(run(ids).tokens)
            continue
        with Ablation(model, units, method, mu.layers_path):
            alone.append(run(ids).tokens)
    k = len(conditions)
    with SharedAblation(model, conditions, mu.layers_path):
        result = run(ids.repeat_interleave(k, 0))
    assert result.graph == ("replayed" if graphs else "eager")
    for c in range(k):
        assert torch.equal(result.tokens[c::k], alone[c]), c
    assert not torch.equal(alone[0], alone[1])  # the removals change the tokens


def test_an_output_whose_first_dimension_is_not_the_batch_is_refused(monkeypatch):
    """A module returning its tokens flattened (``[batch x tokens, width]``) would assign conditions by token, not
    by row: refused, not mixed up."""
    model = tiny_model("qwen3_5_text")
    mu = model_units(build_component_map(model))
    unit = mu.of("softmax_attention")[0]
    module = model.get_submodule(unit.modules[0])
    flatten = module.register_forward_hook(lambda m, a, out: (out[0].reshape(-1, out[0].shape[-1]), *out[1:]))
    try:
        with SharedAblation(model, [([], "none"), ([unit], "skip")], mu.layers_path), \
                pytest.raises(AblationError, match="first dimension is the batch"):
            _logits(model, torch.ones((2, 6), dtype=torch.long))
    finally:
        flatten.remove()


def test_dry_run_names_the_groups_and_a_k_beyond_the_removals(capsys, data_dir):
    from hybridlora.cli import main

    base = ["ablate", "qwen3.5-0.8b", "--tiny", "--dry-run", "--data-dir", str(data_dir)]
    assert main(base + ["--conditions-per-batch", "4"]) == 0
    out, err = capsys.readouterr()
    assert "6 distinct removals to run in 2 groups of 4 sharing each forward" in out and "exceeds" not in err
    assert main(base + ["--conditions-per-batch", "9"]) == 0
    out, err = capsys.readouterr()
    assert "in 1 group of 9" in out and "each forward carries 3 intact fillers" in err
