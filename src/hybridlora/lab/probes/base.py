"""What every probe shares: generated data as (inputs, labels) tensors, settings, the brief training, accuracy.

A probe's generator returns :class:`ProbeData` — ``inputs`` ``[N, L]`` and ``labels`` ``[N, L]`` where a label
is the token the model must produce *at that position* (-100 elsewhere). The causal-LM probes read the label
from the logits one position earlier, as the trainer's loss does. Accuracy is per answer token.

Training is brief and in memory (no checkpoints: a probe run takes seconds to minutes): AdamW, cosine schedule
with warmup, the trainer's precision rule (bf16 autocast on CUDA, fp32 on CPU) and its kernel binding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

IGNORE = -100


@dataclass
class ProbeData:
    inputs: torch.Tensor  # [N, L] token ids
    labels: torch.Tensor  # [N, L]: the token to produce at each position (predicted one position earlier), or -100
    vocab_size: int

    def __post_init__(self) -> None:
        if self.inputs.shape != self.labels.shape:
            raise ValueError("inputs and labels must have one shape")

    @property
    def answers(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass(frozen=True)
class Settings:
    """Task sizes and the training recipe. ``mad()`` are the MAD benchmark's baseline task settings (athms/mad-lab
    configs/tasks/*.yml and mad/configs.py: 12,800 training and 1,280 test examples, batch 128, 200 epochs, AdamW
    lr 5e-4 (the benchmark sweeps 1e-4, 5e-4, 1e-3 and weight decay 0, 0.1), cosine schedule; models of width 128
    with two mixer+MLP blocks); ``tiny()`` shrinks everything so a pair of architectures runs on 2 CPU cores."""
    name: str = "tiny"
    train_examples: int = 512
    test_examples: int = 128
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    depth: int = 2
    target_params: int = 60_000
    scale: float = 0.25  # multiplies the MAD task lengths (sequence lengths, tokens to copy)
    task: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-probe overrides

    @property
    def steps(self) -> int:
        """Optimizer steps of one run."""
        return math.ceil(self.train_examples / self.batch_size) * self.epochs

    @staticmethod
    def tiny() -> "Settings":
        return Settings()

    @staticmethod
    def mad() -> "Settings":
        return Settings(name="mad", train_examples=12_800, test_examples=1_280, epochs=200, batch_size=128,
                        lr=5e-4, weight_decay=0.0, warmup_ratio=0.0, depth=2, target_params=450_000, scale=1.0)


def rng_for(seed: int, stream: str) -> np.random.Generator:
    """Independent, reproducible streams per (seed, purpose): train and test data never share draws."""
    return np.random.default_rng([seed, sum(ord(c) * 31 ** i for i, c in enumerate(stream)) % (2 ** 31)])


# --- training and scoring ---------------------------------------------------------------------------
def lm_loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed CE over answers, answers, correct answers) of a causal LM on a batch, all as device tensors: no
    host sync per step, so a GPU run queues its steps ahead (a probe model is small and launch-bound)."""
    logits = model(input_ids=inputs, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != IGNORE
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == target) & keep).sum()
    return loss, keep.sum(), correct


def train_and_score(model, train: ProbeData, test: ProbeData, settings: Settings, seed: int,
                    loss_fn: Callable = lm_loss, extra_params: list | None = None,
                    tests: dict[str, ProbeData] | None = None) -> dict[str, Any]:
    """Train ``model`` (and ``extra_params``: a probe's own head) on ``train``; score per answer token on
    ``test`` (and any further named test sets). Returns counts, accuracies and the loss curve."""
    from ...train.loop import _autocast, bind_kernels
    from . import graphed

    device = next(model.parameters()).device
    bind_kernels(model)
    ctx, precision = _autocast(device, "auto")
    if precision == "bf16":
        ctx = graphed.autocast(device)  # the same casts, no cache: the graph and the eager step share it
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                            fused=device.type == "cuda")
    n = train.inputs.shape[0]
    total = math.ceil(n / settings.batch_size) * settings.epochs
    warmup = int(settings.warmup_ratio * total)
    def schedule(s: int) -> float:  # linear warmup, then cosine to zero
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    inputs, labels = train.inputs.to(device), train.labels.to(device)  # the whole set once, not a copy a step

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, mean loss over the batch's answers, backward (gradients accumulate)."""
        with ctx:
            loss, answers, _ = loss_fn(model, x, y)
        # a count on the device stays there; a Python count is a kernel argument (a host copy could not be captured)
        mean = loss / (answers.clamp(min=1) if torch.is_tensor(answers) else max(int(answers), 1))
        mean.backward()
        return mean.detach()

    model.train()
    fast_step, how = None, "eager"
    if graphed.wanted(device) and n >= settings.batch_size:
        first = torch.arange(settings.batch_size, device=device)
        fast_step, how = graphed.GraphedStep.capture(step, params, inputs[first], labels[first])
    curve = []
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, settings.batch_size):
            idx = order[i:i + settings.batch_size]
            x, y = inputs[idx], labels[idx]
            if fast_step is None:
                mean = step(x, y)
            elif fast_step.fits(x):
                mean = fast_step(x, y)  # zeroes the gradients it adds into, then replays
            else:
                mean = fast_step.run_eagerly(step, x, y, params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if fast_step is None:
                opt.zero_grad(set_to_none=True)
            curve.append(mean)
    curve = torch.stack(curve).tolist() if curve else []  # one host sync for the whole run
    model.eval()
    scored = {"test": score(model, test, settings, loss_fn, ctx)}
    for name, data in (tests or {}).items():
        scored[name] = score(model, data, settings, loss_fn, ctx)
    return {"scores": scored, "loss_curve": curve, "precision": precision, "steps": total, "step": how}


@torch.no_grad()
def score(model, data: ProbeData, settings: Settings, loss_fn: Callable, ctx) -> dict[str, Any]:
    device = next(model.parameters()).device
    answers = correct = 0
    for i in range(0, data.inputs.shape[0], settings.batch_size):
        with ctx:
            _, a, c = loss_fn(model, data.inputs[i:i + settings.batch_size].to(device),
                              data.labels[i:i + settings.batch_size].to(device))
        answers, correct = answers + a, correct + c
    answers, correct = int(answers), int(correct)
    return {"answers": answers, "correct": correct, "accuracy": correct / max(answers, 1)}
