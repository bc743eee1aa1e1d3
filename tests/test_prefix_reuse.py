"""Multiple-choice scoring with the few-shot prefix run once (evaluate/prefix.py): same log-probs as whole rows."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hybridlora.evaluate import prefix
from hybridlora.evaluate.lm import CausalLM
from hybridlora.evaluate.runner import prepare_benchmark
from hybridlora.evaluate.tokenizer import byte_tokenizer
from hybridlora.models import build_model, tiny_config_for

DATA = Path(os.environ.get("HYBRIDLORA_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "arc").is_dir(), reason="needs ../shared/data")


def _scores(model, benchmark: str, reuse: bool, limit: int = 9) -> tuple[list[list[float]], CausalLM]:
    lm = CausalLM(model, byte_tokenizer(), batch_size=4, max_length=1536, prefix_reuse=reuse)
    prepared = prepare_benchmark(lm, benchmark, data_dir=DATA, limit=limit)
    return lm.score_choices(prepared.inputs), lm


@needs_data
@pytest.mark.parametrize("model_type", ["qwen3_5_text", "falcon_h1", "llama"])
@pytest.mark.parametrize("task", ["arc_challenge", "hellaswag"])
def test_reused_prefix_gives_the_whole_rows_log_probs(model_type, task):
    model = build_model(tiny_config_for(model_type), seed=0)
    whole, _ = _scores(model, task, reuse=False)
    reused, lm = _scores(model, task, reuse=True)
    assert lm.prefix_reuse_note is None and lm.prefix_reused_rows >= 2  # the cache path ran, and was trusted
    diff = max(abs(a - b) for row_a, row_b in zip(whole, reused) for a, b in zip(row_a, row_b))
    assert diff <= 1e-4
    spread = max(abs(a - b) for row in whole for a, b in zip(row, row[1:]))
    assert spread > 1e-3  # the choices' scores differ: equal scores would not show a wrong path


@needs_data
def test_the_head_runs_only_where_a_score_reads_in_both_paths(monkeypatch):
    """Whole rows and reused rows alike ask the model for logits at the positions some row's scores read (the
    choices' shared tokens and the letter), not at every position of the forward: a 248k vocabulary makes full
    logits gigabytes; the prefix's own forward keeps one position. The scores stay the whole rows' (the equality
    test above); here every forward's logits are counted against its width."""
    model = build_model(tiny_config_for("qwen3_5_text"), seed=0)
    kept: list[tuple[int, int]] = []  # (logit positions computed, input width) of each scoring forward
    forward = type(model).forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        kept.append((out.logits.shape[1], kwargs["input_ids"].shape[1]))
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    for reuse in (False, True):
        kept.clear()
        _, lm = _scores(model, "arc_challenge", reuse=reuse)
        assert kept and (lm.prefix_reused_rows >= 2) == reuse
        assert all(positions <= 2 * lm.batch_size < width for positions, width in kept), kept


@needs_data
@pytest.mark.parametrize("moved", ["unscored", "scored"])
def test_the_check_compares_the_log_probs_the_scores_read(monkeypatch, moved):
    """Rounding in bf16 moves the largest of a vocabulary's log-probs more than the check's tolerance while the
    scores agree (measured on Qwen3.5-0.8B's architecture): a difference outside the scored tokens must not turn
    reuse off, one in them must."""
    model = build_model(tiny_config_for("llama"), seed=0)
    whole, _ = _scores(model, "arc_challenge", reuse=False)
    real = prefix.suffix_logprobs
    letters = {ord(c) for c in "ABCD"}  # the byte tokenizer's choice letters, scored at each row's last position

    def shifted(*args, **kwargs):
        rows = real(*args, **kwargs)
        column = min(letters) if moved == "scored" else next(t for t in range(256) if t not in letters)
        for logp in rows:
            logp[-1, column] += 1.0
        return rows

    monkeypatch.setattr(prefix, "suffix_logprobs", shifted)
    scores, lm = _scores(model, "arc_challenge", reuse=True)
    if moved == "unscored":
        assert lm.prefix_reuse_note is None and lm.prefix_reused_rows >= 2
        assert max(abs(a - b) for x, y in zip(whole, scores) for a, b in zip(x, y)) <= 1e-4
    else:
        assert lm.prefix_reuse_note.startswith("prefix reuse off for this model: its log-probs differ")


@needs_data
@pytest.mark.parametrize("name", ["builtin:demo-sequential", "builtin:demo-parallel"])
def test_lab_models_reuse_the_prefix_exactly(name):
    """The lab's own model class (both wirings) continues from the prefix's cache like the transformers models."""
    from hybridlora.evaluate.lm import load_lm

    model = load_lm(name).model
    whole, _ = _scores(model, "arc_challenge", reuse=False)
    reused, lm = _scores(model, "arc_challenge", reuse=True)
    assert lm.prefix_reuse_note is None and lm.prefix_reused_rows >= 2
    assert max(abs(a - b) for x, y in zip(whole, reused) for a, b in zip(x, y)) <= 1e-4


@needs_data
@pytest.mark.parametrize("model_type", ["qwen3_5_text", "falcon_h1", "llama"])
def test_groups_of_several_subjects_share_one_prefix_forward_and_give_the_whole_rows_log_probs(model_type,
                                                                                                  monkeypatch):
    """MMLU's per-subject shots: once the cut is trusted, subjects of similar prefix length run their prefixes in
    one forward and their questions in common batches (each row on its own subject's cache row), and every score
    is the whole row's."""
    model = build_model(tiny_config_for(model_type), seed=0)
    whole, _ = _scores(model, "mmlu", reuse=False, limit=64)
    chunks = []
    real = prefix.run_prefixes

    def spy(model_, prefixes, device, copies=1):
        chunks.append(len(prefixes))
        return real(model_, prefixes, device, copies)

    monkeypatch.setattr(prefix, "run_prefixes", spy)
    reused, lm = _scores(model, "mmlu", reuse=True, limit=64)
    assert lm.prefix_reuse_note is None and max(chunks) >= 2  # some forward ran several subjects' prefixes
    assert lm.prefix_reused_rows >= 2 * max(chunks)
    assert max(abs(a - b) for row_a, row_b in zip(whole, reused) for a, b in zip(row_a, row_b)) <= 1e-4


@needs_data
def test_a_chunk_cache_of_the_wrong_batch_turns_reuse_off_and_scores_the_rest_whole(monkeypatch):
    model = build_model(tiny_config_for("qwen3_5_text"), seed=0)
    whole, _ = _scores(model, "mmlu", reuse=False, limit=64)
    real = prefix.run_prefixes
    monkeypatch.setattr(prefix, "run_prefixes", lambda m, prefixes, device, copies=1: real(m, prefixes[:1], device,
                                                                                              copies))
    reused, lm = _scores(model, "mmlu", reuse=True, limit=64)
    assert lm.prefix_reuse_note == ("prefix reuse off for this model: its cache's rows do not follow the prefixes' "
                                    "batch; rows scored whole")
    assert max(abs(a - b) for row_a, row_b in zip(whole, reused) for a, b in zip(row_a, row_b)) <= 1e-4


def test_chunks_take_groups_of_similar_length_up_to_a_count():
    groups = [(400, [0]), (100, [1]), (120, [2]), (126, [3]), (110, [4]), (500, [5])]
    chunk, rest = prefix._next_chunk(groups, most=8)
    assert chunk == [(100, [1]), (110, [4]), (120, [2])]  # 126 > 100 x 1.25: the next chunk's
    assert rest == [(126, [3]), (400, [0]), (500, [5])]
    chunk, rest = prefix._next_chunk(groups, most=2)
    assert chunk == [(100, [1]), (110, [4])] and len(rest) == 4
    assert prefix._next_chunk([(400, [0])], most=8) == ([(400, [0])], [])


@needs_data
def test_a_wrong_cache_is_caught_and_every_row_is_scored_whole(monkeypatch):
    model = build_model(tiny_config_for("qwen3_5_text"), seed=0)
    whole, _ = _scores(model, "arc_challenge", reuse=False)
    real = prefix.batch_cache

    def stale(cache, *args):  # states of another prefix: what a cache copied wrongly would give
        for layer in cache.layers:
            for name, value in list(vars(layer).items()):
                if torch.is_tensor(value) and value.dim() > 1:
                    setattr(layer, name, value.flip(-1))
        return real(cache, *args)

    monkeypatch.setattr(prefix, "batch_cache", stale)
    scores, lm = _scores(model, "arc_challenge", reuse=True)
    assert lm.prefix_reuse_note.startswith("prefix reuse off for this model: its log-probs differ")
    assert lm.prefix_reused_rows == 0  # every row scored whole (batched otherwise: equal up to float order)
    assert max(abs(a - b) for row_a, row_b in zip(whole, scores) for a, b in zip(row_a, row_b)) <= 1e-5


def test_groups_share_a_prefix_that_stops_before_the_first_scored_position():
    rows = [[1] * 80 + [2, 3], [1] * 80 + [4, 5, 6], [9] * 90, [1] * 40 + [7] * 40 + [8]]
    first = [81, 82, 89, 80]
    groups, whole = prefix.prefix_groups(rows, first)
    assert groups == [(80, [0, 1])]  # rows 0, 1 share 80 tokens; row 3 shares only 40 with them: its own
    assert sorted(whole) == [2, 3]
    # a shot set's rows stay one group when a row that kept fewer shots shares only the header with them
    full = [[5] * 300 + [i] * 20 for i in range(6)]
    fewer = [[5] * 70 + [8] * 200 + [9]]
    groups, whole = prefix.prefix_groups(full + fewer, [300] * 6 + [260])
    assert groups == [(300, [0, 1, 2, 3, 4, 5])] and whole == [6]
    groups, _ = prefix.prefix_groups(rows[:2], [70, 82])
    assert groups == [(70, [0, 1])]  # bounded by row 0's first scored position
    assert prefix.prefix_groups([[1] * 20, [1] * 20], [19, 19]) == ([], [0, 1])  # too short to pay


@needs_data
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fla / mamba-ssm kernels continuing a cache)")
@pytest.mark.parametrize("model_type", ["qwen3_5_text", "falcon_h1"])
def test_reuse_on_cuda_with_the_fast_kernels_matches_whole_rows(model_type):
    """On the GPU the prefix and the questions run through fla's / mamba-ssm's kernels with the cached recurrent
    and convolution state handed in: bf16 log-probs within the check's own tolerance of whole rows."""
    model = build_model(tiny_config_for(model_type), seed=0).to("cuda", torch.bfloat16)
    whole, _ = _scores(model, "arc_challenge", reuse=False)
    reused, lm = _scores(model, "arc_challenge", reuse=True)
    assert lm.kernels.startswith("kernels (") and lm.prefix_reuse_note is None and lm.prefix_reused_rows >= 2
    assert max(abs(a - b) for x, y in zip(whole, reused) for a, b in zip(x, y)) <= prefix.LOW_PRECISION_TOLERANCE


@needs_data
def test_a_forward_that_fails_on_the_cache_turns_reuse_off_instead_of_crashing(monkeypatch):
    model = build_model(tiny_config_for("llama"), seed=0)
    whole, _ = _scores(model, "arc_challenge", reuse=False)

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch in this family's cache")

    monkeypatch.setattr(prefix, "suffix_logprobs", broken)
    scores, lm = _scores(model, "arc_challenge", reuse=True)
    assert "forward on a copied cache failed (RuntimeError: shape mismatch" in lm.prefix_reuse_note
    assert max(abs(a - b) for x, y in zip(whole, scores) for a, b in zip(x, y)) <= 1e-5


def _shift_unless_cut_at(monkeypatch, multiple: int | None):
    """Scored log-probs moved by 1.0 on every reused row whose prefix is not a multiple of ``multiple`` tokens (all
    of them for None): what bf16 rounding of mis-aligned chunks would look like, made large."""
    real = prefix.suffix_logprobs
    letters = [ord(c) for c in "ABCD"]
    cuts = []

    def shifted(model, cache, rows, prefix_length, *args, **kwargs):
        cuts.append(prefix_length)
        out = real(model, cache, rows, prefix_length, *args, **kwargs)
        if multiple is None or prefix_length % multiple:
            for logp in out:
                logp[-1, letters] += 1.0
        return out

    monkeypatch.setattr(prefix, "suffix_logprobs", shifted)
    return cuts


@needs_data
def test_a_prefix_that_fails_uncut_is_retried_cut_at_a_chunk_boundary(monkeypatch):
    model = build_model(tiny_config_for("qwen3_5_text"), seed=0)
    whole, _ = _scores(model, "arc_challenge", reuse=False)
    cuts = _shift_unless_cut_at(monkeypatch, 64)
    reused, lm = _scores(model, "arc_challenge", reuse=True)
    assert lm.prefix_reuse_note is None and lm.prefix_reused_rows >= 2 and lm.prefix_reuse_align == 64
    assert cuts[0] % 64 and all(c % 64 == 0 for c in cuts[1:])  # the uncut prefix was tried first, then only cut
    assert max(abs(a - b) for x, y in zip(whole, reused) for a, b in zip(x, y)) <= 1e-4


@needs_data
def test_when_no_cut_passes_reuse_is_off_and_the_note_names_each_difference(monkeypatch):
    model = build_model(tiny_config_for("qwen3_5_text"), seed=0)
    whole, _ = _scores(model, "arc_challenge", reuse=False)
    cuts = _shift_unless_cut_at(monkeypatch, None)
    scores, lm = _scores(model, "arc_challenge", reuse=True)
    assert lm.prefix_reuse_note.startswith("prefix reuse off for this model: its log-probs differ from the whole "
                                           "row's by 1.00e+00 (cut at a multiple of 64 tokens: 1.00e+00")
    assert len(set(cuts)) == len(cuts) >= 2 and lm.prefix_reused_rows == 0 and lm.prefix_reuse_align is None
    assert max(abs(a - b) for x, y in zip(whole, scores) for a, b in zip(x, y)) <= 1e-5


def test_a_group_too_short_for_every_cut_left_is_scored_whole_and_decides_nothing():
    # a later benchmark keeps only the cut that passed before (128 here): a 100-token prefix has no such cut
    assert prefix._checked_cut(100, [0, 1], check=None, alignments=(128,), run={}) is None


def _stand_in_groups(monkeypatch, lengths: list[int], chunk: int, batch_size: int = 8, fail_on_call: int = 0):
    """score_with_reuse over fake groups of two rows each, with a stand-in model whose reused rows are exact only
    when the prefix is cut at a multiple of ``chunk``; returns (off, reused, align, confirmed, scores, checks)."""
    rows = []
    for g, n in enumerate(lengths):  # each group: two rows sharing n tokens, then differing
        head = [1000 + g] + [7] * (n - 1)
        rows += [head + [1, 2, 3], head + [4, 5, 6]]
    monkeypatch.setattr(prefix, "prefix_groups", lambda r, f: ([(n, [2 * g, 2 * g + 1]) for g, n in
                                                                enumerate(lengths)], []))
    monkeypatch.setattr(prefix, "run_prefix", lambda model, p, device, copies=1: len(p))
    calls = []

    def suffix(model, cut, rs, length, pos, pad, device, copies=1, cache_rows=None):
        calls.append(length)
        if len(calls) == fail_on_call:
            raise RuntimeError("out of memory")  # as a later batch of a group might
        return [torch.tensor([0.0 if length % chunk == 0 else 1.0]) for _ in rs]

    monkeypatch.setattr(prefix, "suffix_logprobs", suffix)
    scores, checks, scored = {}, [], []

    def check(indices, logps):
        checks.append(indices[0])
        return float(logps[0][0]) == 0.0, float(logps[0][0])

    def whole(idx):
        scored.extend(idx)
        scores.update({i: "whole" for i in idx})

    def use(i, logp):
        scored.append(i)
        scores[i] = float(logp[0])

    out = prefix.score_with_reuse([(r, [], []) for r in rows], lambda i: [len(rows[i]) - 1], whole, use,
                                  model=None, batch_size=batch_size, pad_id=0, device=None, check=check)
    assert sorted(scored) == list(range(len(rows)))  # every row scored exactly once
    return (*out, scores, checks)


def test_a_pass_that_a_larger_chunk_could_explain_is_not_trusted_for_unchecked_groups(monkeypatch):
    # 128-token chunks: the first group's 64-cut is 256, which passes only because 128 divides it; the second
    # group's 64-cut (192) would be wrong, so it is checked, fails, and moves the run to 128-token cuts
    off, reused, align, confirmed, scores, checks = _stand_in_groups(monkeypatch, [300, 200, 450], chunk=128)
    assert off is None and align == 128 and confirmed
    assert all(v == 0.0 for v in scores.values()) and len(scores) == 6  # every row scored once, none wrong
    assert checks == [0, 0, 2, 2]  # group 0: uncut fails, 64 passes; group 1: 64 fails, 128 passes; group 2 trusted


def test_a_failure_in_a_later_batch_scores_the_rest_whole_and_none_twice(monkeypatch):
    # one row a batch; the second forward (group 0's second batch, after its check passed) fails as an OOM would
    off, reused, _, _, scores, _ = _stand_in_groups(monkeypatch, [256, 320], chunk=64, batch_size=1,
                                                    fail_on_call=2)
    assert off.startswith("prefix reuse off for this model: its forward on a copied cache failed (RuntimeError")
    assert reused == 1 and scores == {0: 0.0, 1: "whole", 2: "whole", 3: "whole"}
