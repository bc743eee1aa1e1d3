"""In-context recall (MAD): a stream of key-value pairs under a per-sequence mapping; every value whose key was
shown before must be recalled. MAD baseline: vocabulary 16, length 128, multi-query."""
from __future__ import annotations

import numpy as np
import torch

from .base import ProbeData
from .recall_common import label_repeated_values, random_map, split_vocab

NAME = "in_context_recall"
DEFAULTS = dict(vocab_size=16, seq_len=128)


def generate(rng: np.random.Generator, n: int, vocab_size: int = 16, seq_len: int = 128) -> ProbeData:
    keys, values = split_vocab(vocab_size)
    inputs, labels = [], []
    for _ in range(n):
        mapping = random_map(rng, keys, values)
        tokens, value_at, key_of = [], [], []
        for k in rng.choice(keys, size=seq_len // 2):
            tokens += [int(k), mapping[int(k)]]
            value_at.append(len(tokens) - 1)
            key_of.append((int(k),))
        inputs.append(tokens)
        labels.append(label_repeated_values(tokens, value_at, key_of))
    return ProbeData(torch.tensor(inputs), torch.tensor(labels), vocab_size)
