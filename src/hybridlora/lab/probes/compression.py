"""Compression (MAD): a random sequence ends in a compression token; a small decoder must rebuild the whole
sequence from the model's output at that one position, so everything has to pass through one vector. As in MAD
the decoder is an MLP over that vector plus a learned per-position embedding, trained jointly with the model.
MAD baseline: vocabulary 16, length 32."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import IGNORE, ProbeData

NAME = "compression"
DEFAULTS = dict(vocab_size=16, seq_len=32)
COMPRESS = 0


def generate(rng: np.random.Generator, n: int, vocab_size: int = 16, seq_len: int = 32) -> ProbeData:
    content = rng.integers(1, vocab_size, size=(n, seq_len - 1))
    inputs = np.concatenate([content, np.full((n, 1), COMPRESS)], axis=1)
    labels = np.concatenate([content, np.full((n, 1), IGNORE)], axis=1)  # labels: the positions to rebuild
    return ProbeData(torch.tensor(inputs), torch.tensor(labels), vocab_size)


class Decoder(nn.Module):
    """Rebuilds ``length`` tokens from one hidden vector."""

    def __init__(self, width: int, length: int, vocab_size: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.out = nn.Linear(width, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, length, V]
        return self.out(self.mlp(h[:, None, :] + self.position))


def make_loss(model, data: ProbeData):
    """(loss function, the decoder's parameters): the probe's own head on top of the model's last position."""
    device = next(model.parameters()).device
    decoder = Decoder(model.config.hidden_size, data.inputs.shape[1] - 1, data.vocab_size).to(device)

    def loss_fn(m, inputs, labels):
        hidden = m.model(input_ids=inputs, use_cache=False).last_hidden_state[:, -1]
        logits = decoder(hidden).float()
        target = labels[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        return loss, target.numel(), (logits.argmax(-1) == target).sum()  # no host read of the device a step

    return loss_fn, list(decoder.parameters())
