"""Greedy decoding on a static cache (hybridlora.fast.decode) against transformers' greedy generate, token for
token, on tiny random-weight models of both hybrid families (CPU; the CUDA-graph replay is checked on a GPU)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from hybridlora.evaluate.lm import CausalLM, left_pad, stop_criterion, stop_finder
from hybridlora.evaluate.tokenizer import byte_tokenizer
from hybridlora.fast.decode import greedy_generate, unsupported_reason
from hybridlora.models import build_model, tiny_config_for

PROMPTS = ["Question: 2+2?\nAnswer:", "def add(a, b):\n", "x", "The quick brown fox jumps over the lazy"]
FAMILIES = ["qwen3_5_text", "falcon_h1"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return build_model(tiny_config_for(request.param), seed=1)


def left_padded(tok, prompts):
    return left_pad([tok(p).input_ids for p in prompts], tok.pad_token_id)


@contextlib.contextmanager
def on_cuda(model):
    """(model on CUDA, byte tokenizer, left-padded PROMPTS on CUDA); the module-scoped model goes back to the
    CPU afterwards, pass or fail, for the CPU tests."""
    tok = byte_tokenizer()
    ids, mask = (t.to("cuda") for t in left_padded(tok, PROMPTS))
    try:
        yield model.to("cuda"), tok, ids, mask
    finally:
        model.to("cpu")


def hf_tokens(model, ids, mask, new, stop=(), tok=None):
    """transformers' greedy generate with the stop criterion generate_until hands it."""
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList([stop_criterion(tok, stop, ids.shape[1])]) if stop else None
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             pad_token_id=tok.pad_token_id, stopping_criteria=criteria,
                             temperature=None, top_p=None, top_k=None)
    return out[:, ids.shape[1]:]


def static_tokens(model, ids, mask, new, stop=(), tok=None, check_every=16):
    stop_at = stop_finder(tok, stop) if stop else None
    return greedy_generate(model, ids, mask, max_new_tokens=new, pad_token_id=tok.pad_token_id,
                           stop_at=stop_at, check_every=check_every).tokens


def test_same_tokens_as_transformers_generate(model):
    tok = byte_tokenizer()
    ids, mask = left_padded(tok, PROMPTS)
    assert len(set(mask.sum(1).tolist())) > 1  # rows really are padded differently
    expected = hf_tokens(model, ids, mask, 48, tok=tok)
    for every in (1, 5, 16):
        assert torch.equal(static_tokens(model, ids, mask, 48, tok=tok, check_every=every), expected)


def _one_type_per_tested_family():
    from hybridlora.families import FAMILIES

    return [fam.model_types[0] for fam in FAMILIES if fam.tiny]


@pytest.mark.parametrize("model_type", _one_type_per_tested_family())
def test_every_family_with_a_tiny_config_decodes_like_transformers(model_type):
    """The static loop is used only for families checked here (unsupported_reason): one model type of each
    family that has a tiny config, token for token against generate."""
    net = build_model(tiny_config_for(model_type), seed=1)
    tok = byte_tokenizer()
    ids, mask = left_padded(tok, PROMPTS)
    assert unsupported_reason(net) is None
    assert torch.equal(static_tokens(net, ids, mask, 20, tok=tok), hf_tokens(net, ids, mask, 20, tok=tok))


def test_families_without_a_tiny_config_keep_generate():
    import types

    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="kimi_linear"), generation_config=None)
    assert "not verified for model_type 'kimi_linear'" in unsupported_reason(model)
    model.config.model_type = "gpt2"
    assert "not verified" in unsupported_reason(model)


def test_rows_end_at_eos_like_transformers(model):
    """With an end-of-sequence id that some rows generate mid-way, both end those rows there, pad the rest of
    them and stop when all rows ended (same output length)."""
    tok = byte_tokenizer()
    ids, mask = left_padded(tok, PROMPTS)
    free = hf_tokens(model, ids, mask, 40, tok=tok)
    row = free[0].tolist()
    at = next(j for j in range(3, 40) if row[j] not in row[:j])  # row 0 first generates it there
    eos = row[at]  # other rows may meet it too, or never
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [eos, 255] if eos != 255 else [eos]
    try:
        expected = hf_tokens(model, ids, mask, 40, tok=tok)
        got = static_tokens(model, ids, mask, 40, tok=tok, check_every=4)
    finally:
        model.generation_config.eos_token_id = saved
    assert (expected[0, at + 1:] == tok.pad_token_id).all() and expected[0, at] == eos
    assert torch.equal(got, expected)


@pytest.mark.parametrize("with_eos", [False, True])
def test_rows_end_at_stop_strings_like_transformers(model, with_eos):
    """Every row meets a stop string it generates by itself: both stop after the last row's stop. Ended rows
    are padded only when the model has an end-of-sequence id (transformers' rule), here one never generated."""
    tok = byte_tokenizer()
    ids, mask = left_padded(tok, PROMPTS)
    free = hf_tokens(model, ids, mask, 40, tok=tok)
    texts = tok.batch_decode(free)
    stop = tuple(text[10 + 3 * j: 12 + 3 * j] for j, text in enumerate(texts))
    saved = model.generation_config.eos_token_id
    if with_eos:
        model.generation_config.eos_token_id = next(i for i in range(1, 256) if i not in free.flatten().tolist())
    try:
        expected = hf_tokens(model, ids, mask, 40, stop=stop, tok=tok)
        got = static_tokens(model, ids, mask, 40, stop=stop, tok=tok, check_every=7)
    finally:
        model.generation_config.eos_token_id = saved
    assert expected.shape[1] < 40  # every row really ended early
    assert torch.equal(got, expected)


def test_generate_until_paths_agree_and_say_which_ran(model):
    tok = byte_tokenizer()
    hf = CausalLM(model, tok, batch_size=3, max_length=512, decode="hf")
    static = CausalLM(model, tok, batch_size=3, max_length=512, decode="static")
    auto = CausalLM(model, tok, batch_size=3, max_length=512)
    for stop in [(), ("\n", "e")]:
        assert static.generate_until(PROMPTS, stop=stop, max_new_tokens=30) == \
            hf.generate_until(PROMPTS, stop=stop, max_new_tokens=30)
    assert static.decode_path == "static cache, decode step eager (2 of 2 batches)"
    auto.generate_until(PROMPTS[:1], max_new_tokens=2)
    assert auto.decode_path == "static cache, decode step eager (1 of 1 batches)"  # auto takes the loop on the CPU


def test_logits_processors_keep_transformers_generate(model):
    saved = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        assert "repetition_penalty=1.3" in unsupported_reason(model)
        with pytest.raises(ValueError, match="repetition_penalty"):
            CausalLM(model, byte_tokenizer(), max_length=512, decode="static").generate_until(["x"], max_new_tokens=2)
    finally:
        model.generation_config.repetition_penalty = saved
    assert unsupported_reason(model) is None
    with pytest.raises(ValueError, match="decode="):
        CausalLM(model, byte_tokenizer(), decode="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_decoding_with_fast_kernels_equals_generate_on_cuda(model):
    """With fla / mamba-ssm bound (fast.use), the replayed static loop gives transformers' greedy tokens."""
    from hybridlora import fast

    try:
        with on_cuda(model) as (net, tok, ids, mask):
            fast.use("fast")
            expected = hf_tokens(net, ids, mask, 40, tok=tok)
            got = greedy_generate(net, ids, mask, max_new_tokens=40, pad_token_id=tok.pad_token_id)
    finally:
        fast.restore()
    assert got.graph == "replayed"
    assert torch.equal(got.tokens, expected.to(got.tokens.device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fla_decode_convolution_gives_the_same_tokens_on_cuda(model, monkeypatch):
    """The opt-in fla one-token convolution ($HYBRIDLORA_FLA_CONV_UPDATE=1), replayed in the decode graph, gives the
    tokens of transformers' own convolution step (float32 tiny models: no near-ties to round differently)."""
    from hybridlora import fast
    from hybridlora.fast import kernels

    try:
        with on_cuda(model) as (net, tok, ids, mask):
            fast.use("fast")
            plain = greedy_generate(net, ids, mask, max_new_tokens=40, pad_token_id=tok.pad_token_id)
            monkeypatch.setenv(kernels.CONV_UPDATE_ENV, "1")
            bound = fast.use("fast")
            fused = greedy_generate(net, ids, mask, max_new_tokens=40, pad_token_id=tok.pad_token_id)
    finally:
        fast.restore()
    assert any(v == "fla.causal_conv1d_update" for k, v in bound.items() if k.endswith("causal_conv1d_update"))
    assert fused.graph == plain.graph == "replayed"
    assert torch.equal(fused.tokens, plain.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_equals_eager_static_decoding_on_cuda(model):
    with on_cuda(model) as (net, tok, ids, mask):
        eager = greedy_generate(net, ids, mask, max_new_tokens=40, pad_token_id=tok.pad_token_id, graphs=False)
        graph = greedy_generate(net, ids, mask, max_new_tokens=40, pad_token_id=tok.pad_token_id, graphs=True)
    assert graph.graph == "replayed" and eager.graph == "eager"
    assert torch.equal(graph.tokens, eager.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_failed_decode_capture_is_named_and_redone_eagerly(model, monkeypatch):
    from hybridlora.fast import decode

    real = decode._Batch.step

    def host_read(self):  # a device value read on the host: not capturable
        real(self)
        float(self.position.float().mean())

    with on_cuda(model) as (net, tok, ids, mask):
        eager = greedy_generate(net, ids, mask, max_new_tokens=20, pad_token_id=tok.pad_token_id, graphs=False)
        monkeypatch.setattr(decode._Batch, "step", host_read)
        with pytest.warns(RuntimeWarning, match="could not be captured"):
            failed = greedy_generate(net, ids, mask, max_new_tokens=20, pad_token_id=tok.pad_token_id)
    assert failed.graph.startswith("failed:") and "aten.item" in failed.graph and "host_read" in failed.graph
    assert torch.equal(failed.tokens, eager.tokens)
    # the failed capture left the CUDA generator usable: random ops on the device still run, and advance it
    a, b = torch.rand(4, device="cuda"), torch.rand(4, device="cuda")
    assert not torch.equal(a, b)


def test_older_transformers_keep_generate(model, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    assert "5.17.0 < 5.23.0" in unsupported_reason(model)


def test_greedy_generate_keeps_no_autograd_history(model):
    """Called outside inference mode (it is a public function), the cache and outputs carry no grad history."""
    tok = byte_tokenizer()
    ids, mask = left_padded(tok, PROMPTS[:2])
    with torch.enable_grad():
        result = greedy_generate(model, ids, mask, max_new_tokens=5, pad_token_id=tok.pad_token_id)
    assert result.tokens.grad_fn is None and not result.tokens.requires_grad


def test_failed_capture_control_flow_on_cpu(model, monkeypatch):
    """The fallback's control flow with the CUDA calls stubbed: a capture that raises leads to one warning, a
    diagnosis on a throwaway batch that names the host read, and the same tokens as the eager loop."""
    from hybridlora.fast import decode

    tok = byte_tokenizer()
    ids, mask = left_padded(tok, PROMPTS)
    eager = greedy_generate(model, ids, mask, max_new_tokens=12, pad_token_id=tok.pad_token_id, graphs=False)
    for name in ("set_stream", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: "stream")
    released = []
    monkeypatch.setattr(decode, "release_generator_after_failed_capture", lambda device: released.append(device))
    monkeypatch.setattr(decode._Replayer, "_eager", lambda self: (self.batch.step(), setattr(self, "eager_steps", self.eager_steps + 1)))

    def capture(self):
        self.batch.position.float().mean().item()  # what a real capture would refuse
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode._Replayer, "_capture", capture)
    from hybridlora.fast import graphs

    def capture_read(step):  # the diagnosis step reads a device value, like the step the capture refused
        step.__self__.position.float().mean().item()

    real_spy = graphs.host_syncs  # on CPU the spy watches "cpu" tensors as it watches CUDA ones on a GPU
    monkeypatch.setattr(graphs, "host_syncs", lambda step: real_spy(lambda: (step(), capture_read(step)),
                                                                    device_type="cpu"))

    cuda_ids = ids.clone()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self is cuda_ids or self.device.type == "cuda"))
    monkeypatch.setattr(decode._Replayer, "__init__", _replayer_with_graphs(decode._Replayer.__init__))
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        failed = greedy_generate(model, cuda_ids, mask, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    assert failed.graph.startswith("failed: RuntimeError: operation not permitted")
    assert released == [cuda_ids.device]  # the generator is taken out of capture mode
    assert any("item" in c and "capture_read" in c for c in failed.culprits)
    assert torch.equal(failed.tokens, eager.tokens)


def _replayer_with_graphs(init):
    def wrapped(self, batch, graphs):
        init(self, batch, graphs)
        self.graphs = graphs  # CPU tensors: pretend the batch is on CUDA so that a capture is attempted
    return wrapped


def test_decoder_layers_compiled_by_inductor_decode_the_same_tokens(model):
    """bench_decode.py's ``graph_compiled`` path (a lever for Falcon-H1's decode step, issue 17): the decoder
    layers compiled as ``train --compile layers`` compiles them, then the static-cache loop; same greedy tokens
    as the uncompiled loop, and the model runs uncompiled again afterwards."""
    from hybridlora.fast.compile import compile_regions, uncompile

    tok = byte_tokenizer()
    ids, mask = left_padded(tok, PROMPTS)
    plain = static_tokens(model, ids, mask, 12, tok=tok)
    compile_regions(model, "layers", dynamic=False)
    try:
        compiled = static_tokens(model, ids, mask, 12, tok=tok)
    finally:
        assert uncompile(model) > 0
    assert torch.equal(compiled, plain)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())


def test_the_decode_step_timing_divides_by_the_steps_decoded_when_rows_end_early(model):
    from hybridlora.fast.decode import time_decode_step

    ids = torch.randint(1, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = None
        full = time_decode_step(model, ids, mask, 24, graphs=False)
        assert full["steps"] == (5, 23) and "ended early" not in full["timing"]
        # the 10th generated token ends the row: the long call stops at its first check after it (16 steps)
        model.generation_config.eos_token_id = int(full["result"].tokens[0, 9])
        assert int(full["result"].tokens[0, 9]) not in full["result"].tokens[0, :9].tolist(), "pick another seed"
        early = time_decode_step(model, ids, mask, 24, graphs=False)
    finally:
        model.generation_config.eos_token_id = saved
    assert early["steps"] == (5, 16) and "ended early: 5 and 16 steps decoded" in early["timing"]
