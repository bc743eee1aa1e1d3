"""Selective copying (MAD): a few content tokens scattered among blanks; after a copy marker the model must
write the content tokens in order (each one given the ones before it). MAD baseline: vocabulary 16, length 256,
16 tokens to copy."""
from __future__ import annotations

import numpy as np
import torch

from .base import IGNORE, ProbeData

NAME = "selective_copying"
DEFAULTS = dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16)
BLANK, COPY = 0, 1


def generate(rng: np.random.Generator, n: int, vocab_size: int = 16, seq_len: int = 256,
             num_tokens_to_copy: int = 16) -> ProbeData:
    context = seq_len - num_tokens_to_copy - 1
    if context < num_tokens_to_copy:
        raise ValueError("seq_len too short for the tokens to copy")
    inputs, labels = [], []
    for _ in range(n):
        content = rng.integers(2, vocab_size, size=num_tokens_to_copy)
        where = np.sort(rng.choice(context, size=num_tokens_to_copy, replace=False))
        tokens = [BLANK] * context
        for pos, tok in zip(where, content):
            tokens[pos] = int(tok)
        tokens += [COPY] + [int(t) for t in content]
        inputs.append(tokens)
        labels.append([IGNORE] * (context + 1) + [int(t) for t in content])
    return ProbeData(torch.tensor(inputs), torch.tensor(labels), vocab_size)
