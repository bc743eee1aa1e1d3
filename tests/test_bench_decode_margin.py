"""bench/bench_decode.py's check of where two greedy runs part: it finds the earliest parting and measures the two
tokens' logit gap with an independent full forward (CPU, tiny model; the bench itself needs CUDA)."""
import importlib.util
from pathlib import Path

import torch

from hybridlora.models import build_model, tiny_config_for

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_decode_under_test", ROOT / "bench" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def greedy(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens by full forwards, with each step's logits (the test's own reference)."""
    out, logits = [], []
    seq = ids
    with torch.inference_mode():
        for _ in range(steps):
            last = model(input_ids=seq).logits[:, -1].float()
            logits.append(last)
            nxt = last.argmax(-1, keepdim=True)
            out.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
    return torch.cat(out, dim=1), logits


def test_the_earliest_parting_and_its_logit_gap_are_found():
    bench = load_bench()
    model = build_model(tiny_config_for("qwen3_5_text"), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    a, logits = greedy(model, ids, 6)
    b = a.clone()
    b[2, 4] = logits[4][2].topk(2).indices[1]  # row 2 parts at step 4 with its runner-up token
    b[0, 5] = (a[0, 5] + 1) % model.config.vocab_size  # row 0 parts later: not the earliest
    m = bench.first_difference_margin(model, ids, mask, a, b)
    assert (m["row"], m["step"]) == (2, 4)
    assert (m["token_a"], m["token_b"]) == (int(a[2, 4]), int(b[2, 4]))
    expected_gap = float(logits[4][2].topk(2).values.diff().abs())
    assert abs(m["logit_a_minus_b"] - expected_gap) < 1e-4 and abs(m["top2_gap"] - expected_gap) < 1e-4
    assert m["logit_a_minus_b"] > 0 and m["bf16_spacing_at_a"] > 0
    tie = abs(m["logit_a_minus_b"]) <= 4 * m["bf16_spacing_at_a"]
    assert m["verdict"].startswith("near tie" if tie else "NOT a tie")
    assert bench.first_difference_margin(model, ids, mask, a, a.clone()) is None
