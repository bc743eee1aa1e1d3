"""Fuzzy in-context recall (MAD): keys and values are motifs of one to ``motif`` tokens (keys and values from
disjoint token ranges, so their boundaries are visible); a value motif must be recalled in full after its key
motif reappears. MAD baseline: vocabulary 16, length 128, key and value motifs of up to 3 tokens."""
from __future__ import annotations

import numpy as np
import torch

from .base import ProbeData
from .recall_common import label_repeated_values, split_vocab

NAME = "fuzzy_recall"
DEFAULTS = dict(vocab_size=16, seq_len=128, motif=3, num_keys=4)
PAD = 0


def _motifs(rng: np.random.Generator, tokens: np.ndarray, count: int, motif: int) -> list[tuple[int, ...]]:
    found: set[tuple[int, ...]] = set()
    while len(found) < count:
        found.add(tuple(int(t) for t in rng.choice(tokens, size=int(rng.integers(1, motif + 1)))))
    return sorted(found)


def generate(rng: np.random.Generator, n: int, vocab_size: int = 16, seq_len: int = 128, motif: int = 3,
             num_keys: int = 4) -> ProbeData:
    keys, values = split_vocab(vocab_size, first=1)  # token 0 pads the tail
    inputs, labels = [], []
    for _ in range(n):
        key_motifs = _motifs(rng, keys, num_keys, motif)
        value_of = {k: tuple(int(t) for t in rng.choice(values, size=int(rng.integers(1, motif + 1))))
                    for k in key_motifs}
        tokens, value_at, key_of = [], [], []
        while True:
            k = key_motifs[int(rng.integers(len(key_motifs)))]
            if len(tokens) + len(k) + len(value_of[k]) > seq_len:
                break
            tokens += list(k)
            value_at.append(list(range(len(tokens), len(tokens) + len(value_of[k]))))
            tokens += list(value_of[k])
            key_of.append(k)
        tokens += [PAD] * (seq_len - len(tokens))
        inputs.append(tokens)
        labels.append(label_repeated_values(tokens, value_at, key_of))
    return ProbeData(torch.tensor(inputs), torch.tensor(labels), vocab_size)
