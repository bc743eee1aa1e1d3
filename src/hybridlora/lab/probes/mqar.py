"""Multi-query associative recall (Arora et al. 2023, "Zoology"): distinct key-value pairs first, then queries of
those keys in random order, each to be answered with its value. Not in MAD; sizes ours (vocabulary 64,
length 64, a quarter of the length in pairs)."""
from __future__ import annotations

import numpy as np
import torch

from .base import IGNORE, ProbeData
from .recall_common import split_vocab

NAME = "mqar"
DEFAULTS = dict(vocab_size=64, seq_len=64)


def generate(rng: np.random.Generator, n: int, vocab_size: int = 64, seq_len: int = 64, num_pairs: int | None = None,
             gap: int = 0, filler_vocab: int = 0) -> ProbeData:
    """``gap`` filler tokens (from the top ``filler_vocab`` ids) between the pairs and the queries: the
    long-context probe stretches a sequence with it."""
    keys, values = split_vocab(vocab_size - filler_vocab)
    fillers = np.arange(vocab_size - filler_vocab, vocab_size)
    pairs = num_pairs or seq_len // 4
    if pairs > len(keys):
        raise ValueError(f"{pairs} distinct keys needed, the vocabulary has {len(keys)}")
    inputs, labels = [], []
    for _ in range(n):
        chosen = rng.choice(keys, size=pairs, replace=False)
        mapping = {int(k): int(rng.choice(values)) for k in chosen}
        tokens = [t for k in chosen for t in (int(k), mapping[int(k)])]
        tokens += [int(t) for t in rng.choice(fillers, size=gap)] if gap else []
        lab = [IGNORE] * len(tokens)
        for k in rng.permutation(chosen):
            tokens += [int(k), mapping[int(k)]]
            lab += [IGNORE, mapping[int(k)]]
        inputs.append(tokens)
        labels.append(lab)
    return ProbeData(torch.tensor(inputs), torch.tensor(labels), vocab_size)
