"""Key-value sequences shared by the recall probes: keys and values from disjoint token ranges."""
from __future__ import annotations

import numpy as np

from .base import IGNORE


def split_vocab(vocab: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values: the lower and upper half of ``[first, vocab)``."""
    half = (vocab - first) // 2
    return np.arange(first, first + half), np.arange(first + half, first + 2 * half)


def random_map(rng: np.random.Generator, keys: np.ndarray, values: np.ndarray) -> dict[int, int]:
    """A fresh assignment key -> value for one sequence (values may repeat across keys)."""
    return {int(k): int(rng.choice(values)) for k in keys}


def label_repeated_values(tokens: list[int], value_at: list[int], key_of: list[tuple[int, ...]]) -> list[int]:
    """Labels for a key-value stream: a value's tokens are answers when its key already appeared earlier in the
    stream (the first time a key is shown, its value cannot be known)."""
    labels = [IGNORE] * len(tokens)
    seen: set[tuple[int, ...]] = set()
    for positions, key in zip(value_at, key_of):
        if key in seen:
            for t in (positions if isinstance(positions, list) else [positions]):
                labels[t] = tokens[t]
        seen.add(key)
    return labels
