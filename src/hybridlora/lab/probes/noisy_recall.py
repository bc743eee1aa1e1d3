"""Noisy in-context recall (MAD): in-context recall with noise tokens (their own vocabulary) between the pairs;
the model must recall values and ignore the noise. MAD baseline: vocabulary 32 of which 16 are noise, length
128, noise fraction 0.2."""
from __future__ import annotations

import numpy as np
import torch

from .base import ProbeData
from .recall_common import label_repeated_values, random_map, split_vocab

NAME = "noisy_recall"
DEFAULTS = dict(vocab_size=32, noise_vocab_size=16, seq_len=128, frac_noise=0.2)


def generate(rng: np.random.Generator, n: int, vocab_size: int = 32, noise_vocab_size: int = 16, seq_len: int = 128,
             frac_noise: float = 0.2) -> ProbeData:
    keys, values = split_vocab(vocab_size - noise_vocab_size)
    noise = np.arange(vocab_size - noise_vocab_size, vocab_size)
    inputs, labels = [], []
    for _ in range(n):
        mapping = random_map(rng, keys, values)
        tokens, value_at, key_of = [], [], []
        while len(tokens) < seq_len:
            if rng.random() < frac_noise or len(tokens) == seq_len - 1:
                tokens.append(int(rng.choice(noise)))
            else:  # a pair stays adjacent: noise goes between pairs
                k = int(rng.choice(keys))
                tokens += [k, mapping[k]]
                value_at.append(len(tokens) - 1)
                key_of.append((k,))
        inputs.append(tokens)
        labels.append(label_repeated_values(tokens, value_at, key_of))
    return ProbeData(torch.tensor(inputs), torch.tensor(labels), vocab_size)
