"""Does cutting the shared prefix at a chunk boundary make prefix reuse exact enough for Qwen3.5 in bf16? (issue 17)

On the H200, `--prefix-reuse` switched itself off for Qwen3.5-0.8B's architecture: a reused row's scored log-probs
differed from the whole row's by 5.1e-2, just over the bf16 bound of 5e-2 (docs/ABLATION.md). A guess to test:
fla's chunked Gated DeltaNet splits a sequence into chunks of 64 tokens from its first token, so a prefix cut
elsewhere puts the continuation's chunk boundaries where the whole row has none, and bf16 rounds the two
decompositions differently; a prefix cut at a multiple of 64 (or of Mamba-2's chunk) would give the whole row's
chunks. This prints, per model and cut, the largest difference at the last position (where a question's letters
are read), at the row's next tokens after the cut (stricter than the check) and over everything, at batch 1 (the
check runs at the evaluation's batch size); `bench_ablation.py`'s prefix-reuse line is the check itself.

    python bench/diag_prefix_alignment.py --models qwen,falcon          # GPU, full-size architectures, bf16
    python bench/diag_prefix_alignment.py --tiny --models qwen          # CPU check of the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_ablation  # noqa: E402  (its builder: the same models as the ablation bench)
from hybridlora.evaluate import prefix  # noqa: E402


def build(name: str, tiny: bool, device: str, dtype: torch.dtype):
    """bench_ablation's full-size (or --tiny) random-weight model, with missing fast kernels said."""
    from types import SimpleNamespace

    from hybridlora import fast

    model, _, _ = bench_ablation.build(name, SimpleNamespace(tiny=tiny, device=device, dtype=dtype))
    fast.warn_missing_kernels(model)  # a reference path where fla should run is said, not hidden
    return model


def differences(model, row: list[int], cut: int, device: torch.device) -> dict:
    """Largest |reused − whole| log-prob: at the last position over the vocabulary (where a multiple-choice score
    reads its letters), at the row's next tokens over every position after the cut (stricter than the check,
    which reads a question's few choice tokens), and over everything."""
    positions = list(range(cut, len(row) - 1))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([row], device=device)).logits.float()
        whole = torch.log_softmax(logits, -1)[0, positions]
        cache = prefix.run_prefix(model, row[:cut], device)
        reused = prefix.suffix_logprobs(model, cache, [row], cut, [positions], 0, device)[0]
    nxt = torch.tensor(row[cut + 1:], device=device)
    pick = torch.arange(len(positions), device=device)
    return {"cut": cut, "last": float((reused[-1] - whole[-1]).abs().max()),
            "next_tokens": float((reused[pick, nxt] - whole[pick, nxt]).abs().max()),
            "everything": float((reused - whole).abs().max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen,falcon")
    ap.add_argument("--length", type=int, default=900, help="row length (an MMLU prompt is about 900 tokens)")
    ap.add_argument("--cuts", default="777,768,800,832,810,640,575,576",
                    help="prefix lengths: multiples of 64, 128 and 256 beside cuts that are not")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    from hybridlora import fast

    fast.use("fast")  # the kernels an evaluation binds (fla's chunked Gated DeltaNet on CUDA)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    results = {}
    for name in args.models.split(","):
        model = build(name, args.tiny, device.type, dtype)
        row = torch.randint(1, model.config.vocab_size, (args.length,),
                            generator=torch.Generator().manual_seed(0)).tolist()
        rows = []
        for cut in (int(c) for c in args.cuts.split(",")):
            r = differences(model, row, cut, device)
            rows.append(r)
            aligned = next((f"÷{a}" for a in (256, 128, 64) if cut % a == 0), "none")
            print(f"{name:>7} cut {cut:4d} ({aligned:>5}): "
                  f"last position {r['last']:.2e}, next tokens {r['next_tokens']:.2e}, everything "
                  f"{r['everything']:.2e} (the check's bf16 bound {prefix.LOW_PRECISION_TOLERANCE:.0e}, at batch 1 "
                  "here)", flush=True)
        results[name] = rows
        del model
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "prefix_alignment.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
