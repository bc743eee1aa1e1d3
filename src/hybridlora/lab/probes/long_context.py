"""Long-context retrieval: multi-query associative recall trained at one length and tested at 1x, 2x, 4x and
8x that length. The pairs and queries stay the same; filler tokens between them stretch the distance the recall
has to bridge (and the positions attention sees beyond training)."""
from __future__ import annotations

import numpy as np

from .base import ProbeData
from . import mqar

NAME = "long_context"
DEFAULTS = dict(vocab_size=64, seq_len=64, num_pairs=8, filler_vocab=8)
FACTORS = (1, 2, 4, 8)


def generate(rng: np.random.Generator, n: int, vocab_size: int = 64, seq_len: int = 64, num_pairs: int = 8,
             filler_vocab: int = 8, factor: int = 1) -> ProbeData:
    gap = factor * seq_len - 4 * num_pairs
    if gap < 0:
        raise ValueError("seq_len must hold the pairs and queries (4 x num_pairs tokens)")
    return mqar.generate(rng, n, vocab_size=vocab_size, seq_len=seq_len, num_pairs=num_pairs, gap=gap,
                         filler_vocab=filler_vocab)
