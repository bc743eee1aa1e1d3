"""How many CUDA graphs one training cell captures: the distinct row lengths (512-token buckets) a cell of the
``paper`` study meets, from the study data's example lengths and the trainer's own step order (CPU only).

Each distinct bucket costs one capture (two eager warm-up steps and the capture itself); the count feeds the
projection in docs/PERFORMANCE.md. Lengths are characters / ``--chars-per-token`` as in bench_train_loop.py.

Usage::

    python bench/graph_buckets.py --data ../shared/data
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_train_loop as btl  # noqa: E402
from hybridlora.fast import pack_order  # noqa: E402
from hybridlora.fast.graphs import bucket_length  # noqa: E402


def census(lengths: list[int], *, examples: int = 2000, epochs: int = 3, per_step: int = 16, pack_tokens: int = 4096,
           seed: int = 3407) -> dict[int, int]:
    """{bucket length: rows} over a cell's whole run, in the trainer's order (``randperm(n, seed + epoch)``)."""
    lengths = lengths[:examples]
    seen: dict[int, int] = {}
    for epoch in range(epochs):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order), per_step):
            step = [lengths[i] for i in order[start:start + per_step]]
            for group in pack_order(step, pack_tokens):
                bucket = bucket_length(sum(step[i] for i in group))
                seen[bucket] = seen.get(bucket, 0) + 1
    return dict(sorted(seen.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with gsm8k/, codealpaca/, hh-rlhf/")
    ap.add_argument("--chars-per-token", type=float, default=4.0)
    ap.add_argument("--max-length", type=int, default=1024)
    args = ap.parse_args(argv)
    out = {}
    for domain, pairs in btl.study_lengths(args.data, args.chars_per_token).items():
        rows = census([min(p + r, args.max_length) for p, r in pairs])
        out[domain] = {"captures": len(rows), "rows_per_bucket": rows, "rows": sum(rows.values())}
        print(domain, json.dumps(out[domain]))
    per_model = 6 * sum(v["captures"] for v in out.values())
    print(f"captures per model (6 placements x 3 domains): {per_model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
