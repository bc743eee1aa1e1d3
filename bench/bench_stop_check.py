"""Host cost of the per-step stop-string check in greedy generation: decoding every generated token vs the tail
window (``hybridlora.evaluate.lm.stop_window``), side by side on this machine's CPU.

The check runs once per decode step on the host, between GPU steps, so its cost adds to every step. This
times one check (``batch_decode`` of the batch + the substring test) at several generated lengths with the
offline tokenizers (the tiny BPE tokenizer trained on the local data, and the byte tokenizer), then sums it
over whole generations of the study's sizes (GSM8K: 256 questions × 256 tokens, HumanEval: 164 × 512).

Usage::

    python bench/bench_stop_check.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hybridlora.evaluate.lm import stop_window  # noqa: E402

STOP = ["Question:", "\n\n\n", "</s>"]  # the GSM8K-style stop strings; the window depends on the longest
GENERATIONS = {"gsm8k": (256, 256), "humaneval": (164, 512)}  # (questions in one batch, new tokens)


def check_seconds(tok, batch: int, length: int, window: int | None, reps: int = 3) -> float:
    import random

    rng = random.Random(length)
    vocab = min(len(tok), 30000)
    rows = [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]
    start = 0 if window is None else max(0, length - window)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        texts = tok.batch_decode([r[start:] for r in rows], skip_special_tokens=False)
        [any(s in x for s in STOP) for x in texts]
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--stride", type=int, default=32, help="time every N-th step and interpolate")
    args = ap.parse_args(argv)
    from hybridlora.data import build_tiny_tokenizer
    from hybridlora.evaluate.tokenizer import byte_tokenizer

    window = stop_window(STOP)
    out = {"window_tokens": window}
    for name, tok in (("tiny BPE", build_tiny_tokenizer(data_dir=args.data_dir)), ("byte", byte_tokenizer())):
        res = out.setdefault(name, {})
        for bench, (batch, new) in GENERATIONS.items():
            totals = {}
            for label, w in (("full decode", None), ("tail window", window)):
                steps = range(args.stride, new + 1, args.stride)
                per = [check_seconds(tok, batch, n, w) for n in steps]
                totals[label] = sum(per) * args.stride  # each timed step stands for `stride` steps
            res[bench] = {k: round(v, 3) for k, v in totals.items()}
            res[bench]["ratio"] = round(totals["full decode"] / totals["tail window"], 1)
            print(name, bench, json.dumps(res[bench]), flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
