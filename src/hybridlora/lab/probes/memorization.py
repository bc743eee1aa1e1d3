"""Memorisation (MAD): one fixed key -> value table (drawn from the probe seed) for every sequence; values follow
their keys, so they can only be known from what the weights stored. MAD baseline: vocabulary 256, length 32,
256 training sequences; the test uses fresh sequences over the same table."""
from __future__ import annotations

import numpy as np
import torch

from .base import IGNORE, ProbeData
from .recall_common import split_vocab

NAME = "memorization"
DEFAULTS = dict(vocab_size=256, seq_len=32)
SHARED_TABLE = True  # train and test must draw from one table: the generator takes ``table_seed``


def generate(rng: np.random.Generator, n: int, vocab_size: int = 256, seq_len: int = 32,
             table_seed: int = 0) -> ProbeData:
    keys, values = split_vocab(vocab_size)
    table_rng = np.random.default_rng(table_seed)
    table = {int(k): int(table_rng.choice(values)) for k in keys}
    inputs, labels = [], []
    for _ in range(n):
        tokens, lab = [], []
        for k in rng.choice(keys, size=seq_len // 2):
            tokens += [int(k), table[int(k)]]
            lab += [IGNORE, table[int(k)]]
        inputs.append(tokens)
        labels.append(lab)
    return ProbeData(torch.tensor(inputs), torch.tensor(labels), vocab_size)
