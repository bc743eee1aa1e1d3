"""LoRA fine-tuning of a model with a resolved placement: a lean, resumable loop.

Only the placement's LoRA weights train (PEFT freezes everything else). Optimizer: torch AdamW (weight decay
on LoRA weights), cosine schedule with linear warmup (transformers). The loss of one optimizer step is the mean
over all loss tokens of its ``micro_batch_size × grad_accum`` examples. Where every mixer can keep packed
examples apart (``packing.packing_supported``: hybridlora.fast's functions bound), those examples are packed
into rows of at most ``pack_tokens`` tokens; otherwise each micro-batch is right-padded (the run log's
``batching`` line says which, and why). The loss is computed without a full logits tensor
(``hybridlora.fast.causal_lm_loss_sum``). Optional gradient checkpointing (non-reentrant, with input grads
enabled for PEFT) trades compute for activation memory.

Determinism and resume: epoch ``e`` visits the data in ``randperm(n, seed + e)`` order, so the position
of optimizer step ``s`` in the data is a function of ``s`` alone. A checkpoint holds the LoRA weights,
optimizer, scheduler and RNG states plus a fingerprint of the data, recipe and placement; resuming from it
continues exactly where the run stopped (and refuses a checkpoint whose fingerprint differs). On CPU in fp32 the
resumed adapter equals the uninterrupted one to within 1e-6 (tests/test_train.py; bitwise in practice, also seen
on an H100 in bf16 for the tiny models); on GPU, kernels that are not bitwise deterministic can make the two
differ by float rounding. A fresh start refuses an output directory that holds checkpoints (pass ``resume``) or
a finished adapter.

Output directory (every file is written to a temporary name and renamed into place)::

    adapter/               PEFT adapter (save_pretrained), written at the end
    run_config.yaml        model, placement (hosts, ranks), training config
    data_manifest.json     ids of the train/validation examples used and the skipped-row counts
    train_log.jsonl        one JSON object per line: event "start" | "resume" / "step" / "lora_norms" / "eval" /
                           "end" | "stopped" | "error"; on resume, lines after the checkpoint's step are dropped
    checkpoints/step-N/    lora.pt + trainer_state.pt (the last ``keep_checkpoints`` are kept)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import replace_dir
from ..data.formatting import TokenizedExample, TokenizedSet, collate
from .packing import batching_line, pack_tokens_for

LOG_NAME = "train_log.jsonl"
ADAPTER_DIR = "adapter"
CKPT_DIR = "checkpoints"


FULL_PARAMETER = "full-parameter"  # the run name when train() gets no placement: every weight trains


class TrainingError(RuntimeError):
    """Training could not run or stopped (bad configuration, non-finite loss, nothing to resume)."""


@dataclass
class TrainConfig:
    """The study's recipe as defaults; every field is overridable."""
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    epochs: int = 3
    micro_batch_size: int = 4
    grad_accum: int = 4  # effective batch = micro_batch_size × grad_accum = 16
    max_length: int = 1024
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 3407
    save_every: int = 100  # optimizer steps between checkpoints (0: only the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    log_every: int = 1
    norm_every: int = 10  # LoRA ‖B·A‖ dynamics every N steps (0: never)
    eval_every: int = 0  # validation loss every N steps (0: only at the end)
    loss_on: str = "assistant"
    precision: str = "auto"  # "auto" (fp32 on CPU, bf16 autocast on GPU) | "fp32" | "bf16"
    progress: bool = True
    gradient_checkpointing: bool = False
    packing: str = "auto"  # "auto": pack each step's examples when every mixer keeps them apart | "off"
    pack_tokens: int = 0  # tokens per packed row (0: micro_batch_size × max_length, a padded micro-batch's size)
    cuda_graphs: str = "auto"  # "auto": replay packed rows' forward + backward as CUDA graphs on CUDA | "off"
    compile: str = "off"  # torch.compile regions: "off" | "lora" (every LoRA layer) | "layers" (decoder layers)

    @property
    def effective_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be at least 1"),
            (self.grad_accum >= 1, "grad_accum must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (self.loss_on in ("assistant", "full"), "loss_on must be assistant or full"),
            (self.packing in ("auto", "off"), "packing must be auto or off"),
            (self.cuda_graphs in ("auto", "off"), "cuda_graphs must be auto or off"),
            (self.compile in ("off", "lora", "layers"), "compile must be off, lora or layers"),
            (self.pack_tokens == 0 or self.pack_tokens >= self.max_length,
             "pack_tokens must be 0 (automatic) or at least max_length"),
            (self.max_length >= 2, "max_length must be at least 2"),
            (self.keep_checkpoints >= 0, "keep_checkpoints must be >= 0 (0: keep all)"),
            (self.save_every >= 0 and self.norm_every >= 0 and self.eval_every >= 0, "intervals must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainingError(msg)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    final_loss: float | None
    val_loss: float | None
    trainable_params: int
    peft_model: Any = field(repr=False, default=None)
    cuda_graphs: str = ""  # what the CUDA-graph runner did (the run log's ``cuda_graphs`` line)


# --- atomic file helpers ---------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --- LoRA bookkeeping -------------------------------------------------------------------------------
def attach_lora(model: nn.Module, resolved, dropout: float = 0.05):
    """PEFT model with LoRA on exactly the resolved hosts (``placement.verify.attach``)."""
    from ..placement.verify import attach

    peft_model = attach(model, resolved)
    if dropout != 0.05:  # attach() uses the study's 0.05; change it on the built layers
        from ..placement.verify import lora_hosts

        for mod in lora_hosts(peft_model).values():
            drop = mod.lora_dropout["default"]
            if isinstance(drop, nn.Dropout):
                drop.p = dropout
            elif dropout > 0:
                mod.lora_dropout["default"] = nn.Dropout(dropout)
        peft_model.peft_config["default"].lora_dropout = dropout
    return peft_model


def lora_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@torch.no_grad()
def lora_norms(peft_model: nn.Module, component_of: dict[str, str]) -> dict[str, float]:
    """Σ over hosts of ‖B·A‖_F (no α/r scaling), per component type; computed as sqrt(Σ (BᵀB)∘(AAᵀ))."""
    from ..placement.verify import lora_hosts

    out: dict[str, float] = defaultdict(float)
    for name, mod in lora_hosts(peft_model).items():
        a = mod.lora_A["default"].weight.float()
        b = mod.lora_B["default"].weight.float()
        sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0)
        out[component_of.get(name, "other")] += float(sq.sqrt())
    return dict(out)


# --- the recipe ------------------------------------------------------------------------------------
# train() reads top to bottom as a run goes; the sections below hold its parts in the same order.
def train(model: nn.Module, resolved, train_set: TokenizedSet | list[TokenizedExample], output_dir: str | Path,
          config: TrainConfig | None = None, *, pad_id: int,
          val_set: TokenizedSet | list[TokenizedExample] | None = None,
          data_manifest: dict | None = None, run_info: dict | None = None, resume: bool = False,
          stop_after_steps: int | None = None, component_of: dict[str, str] | None = None,
          final_dir: str = ADAPTER_DIR) -> TrainResult:
    """Fine-tune LoRA on ``resolved``'s hosts of ``model`` (a plain transformers causal LM, not yet wrapped).

    ``resolved=None`` trains every parameter instead (pretraining, :mod:`hybridlora.lab.pretrain`): no PEFT, the
    checkpoints hold all weights, and the model itself is saved under ``final_dir`` at the end.

    ``resume=True`` continues from the newest checkpoint in ``output_dir`` (the model must be the same base
    model, freshly built/loaded). ``stop_after_steps`` stops after that many optimizer steps in total, saving a
    checkpoint but no adapter (used to simulate an interrupted run). ``component_of`` maps host name ->
    component type for the norm dynamics (default: from the resolved hosts).
    """
    config = config or TrainConfig()
    config.validate()
    examples, val_examples = _examples_of(train_set), _examples_of(val_set)
    if not examples:
        raise TrainingError("no training examples left after formatting (all skipped?)")
    output_dir = Path(output_dir)
    resume_from = _prepare_output_dir(output_dir, final_dir, resume)
    fingerprint = run_fingerprint(examples, resolved, config)

    if resume_from is None:
        # LoRA's initial weights (PEFT draws them from torch's global generator) and a fresh run's random draws
        # (dropout) come from the recipe's seed, whatever ran before in this process: a study runner that already
        # ran other cells gives a cell the weights a fresh process would.
        torch.manual_seed(config.seed)
    peft_model = _model_to_train(model, resolved, config)
    engine = _build_engine(peft_model, config, pad_id)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = _build_optimizer(peft_model, config)
    plan = _StepPlan.for_data(len(examples), config)
    scheduler = _cosine_schedule(optimizer, config, plan.total_steps)
    if resume_from is not None:
        step = _restore_checkpoint(resume_from, peft_model, optimizer, scheduler, fingerprint)
    else:
        step = 0

    run = _Run(name=resolved.name if resolved is not None else FULL_PARAMETER, model=peft_model, config=config,
               output_dir=output_dir, pad_id=pad_id, engine=engine, params=params, optimizer=optimizer,
               scheduler=scheduler, fingerprint=fingerprint, val_examples=val_examples,
               norm_components=_norm_components(resolved, component_of), step=step)
    _write_run_files(run, resolved, run_info, data_manifest)
    run.log = _Log(output_dir / LOG_NAME, step if resume_from is not None else None)
    run.log.write(**_start_record(run, plan, data_manifest, resumed=resume_from is not None))
    run.progress = _progress_bar(run, plan.total_steps)
    with _training_session(run):
        _compile_regions(run)
        _run_steps(run, plan, examples, stop_after_steps)
        if run.step < plan.total_steps:  # stopped early on request: keep a checkpoint to resume from
            return _stop_early(run, final_dir, stop_after_steps)
        val_loss = _finish(run, final_dir)
    return _result(run, final_dir, val_loss)


@dataclass
class _Run:
    """One training run under way: what its steps, hooks and checkpoints share."""
    name: str  # the placement's name, or FULL_PARAMETER
    model: nn.Module  # the PEFT model (the model itself when every weight trains)
    config: TrainConfig
    output_dir: Path
    pad_id: int
    engine: _Engine
    params: list[nn.Parameter]  # the trainable ones, in the order their gradients are clipped
    optimizer: torch.optim.Optimizer
    scheduler: Any
    fingerprint: dict[str, str]  # stored in every checkpoint, checked on resume
    val_examples: list[TokenizedExample]
    norm_components: dict[str, str] | None  # host -> component type for the LoRA norms; None: no LoRA
    step: int = 0  # optimizer steps done
    last_loss: float | None = None
    log: _Log | None = None  # opened once the run files are written (a resume first trims the old log)
    progress: Any = None  # tqdm bar when config.progress

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)


# --- setting up: output directory, model, engine, optimizer, step plan -----------------------------
def _examples_of(data: TokenizedSet | list[TokenizedExample] | None) -> list[TokenizedExample]:
    return data.examples if isinstance(data, TokenizedSet) else list(data or [])


def _prepare_output_dir(output_dir: Path, final_dir: str, resume: bool) -> Path | None:
    """Check that ``output_dir`` suits a fresh start (no checkpoints) or a resume (checkpoints), never one that
    finished, and clear what a killed run half-wrote; returns the checkpoint to resume from (None: fresh)."""
    if (output_dir / final_dir).exists():
        raise TrainingError(f"{output_dir} already holds a finished run ({output_dir / final_dir}); "
                            "choose another --output")
    ckpts = checkpoints(output_dir)
    if resume and not ckpts:
        raise TrainingError(f"--resume: no checkpoint under {output_dir / CKPT_DIR}; start the run again without "
                            "--resume")
    if not resume and ckpts:
        raise TrainingError(f"{output_dir} holds checkpoints of an unfinished run (newest {ckpts[-1].name}); pass "
                            "--resume to continue it, or choose another --output")
    output_dir.mkdir(parents=True, exist_ok=True)
    for junk in [*output_dir.glob(".checkpoint-step-*"), *output_dir.glob(f".{final_dir}.*")]:
        shutil.rmtree(junk, ignore_errors=True)  # half-written by a killed run
    return ckpts[-1] if resume else None


def _norm_components(resolved, component_of: dict[str, str] | None) -> dict[str, str] | None:
    """Host name -> component type for the LoRA norms (default: the resolved hosts'); None in a full-parameter
    run, which has no LoRA to measure."""
    if resolved is None:
        return None
    return component_of or {h.name: h.component for h in resolved.hosts}


def _model_to_train(model: nn.Module, resolved, config: TrainConfig) -> nn.Module:
    """``model`` made ready: gradient checkpointing on where asked, then LoRA on the resolved hosts (with no
    placement, the model itself: every weight trains)."""
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing; drop the option")
        # newer transformers (5.24 has it) names it activation checkpointing; the old name goes in v6
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # PEFT: frozen embeddings, so checkpointed blocks need grad inputs
    return attach_lora(model, resolved, config.lora_dropout) if resolved is not None else model


@dataclass
class _Engine:
    """How this run's forwards and backwards compute: where, in what precision, on what batches, and whether
    a CUDA-graph runner replays them. The string fields are the run log's lines about each choice."""
    device: torch.device
    ctx: Any  # the autocast context every forward runs in
    precision: str  # "bf16" | "fp32": what that autocast gives
    kernels: str
    packing: bool
    batching: str
    pack_budget: int | None  # tokens per packed row; None: padded micro-batches
    graphs: Any  # PackedStepGraphs for packed steps, or None: the eager step
    graphs_line: str

    def graphs_account(self) -> str:
        """What the CUDA-graph runner did (it may have fallen back since the start), or why it was off."""
        return self.graphs.describe() if self.graphs is not None else self.graphs_line


def _build_engine(model: nn.Module, config: TrainConfig, pad_id: int) -> _Engine:
    """Bind the mixer kernels, then choose batching, precision and the CUDA-graph runner for ``model``."""
    device = _device_of(model)
    kernels = _bind_kernels(model, device)  # first: whether packing is possible depends on the functions bound
    packing, batching = batching_line(model, config)
    ctx, precision = _autocast(device, config.precision)
    graphs, graphs_line = _step_graphs(model, config, device, packing, precision, pad_id)
    return _Engine(device, ctx, precision, kernels, packing, batching, pack_tokens_for(config) if packing else None,
                   graphs, graphs_line)


def _bind_kernels(model: nn.Module, device: torch.device) -> str:
    """On CUDA, bind the fast mixer kernels (fla / mamba-ssm) and warn loudly about any that are missing;
    returns the one-line account of what runs, for the run log (``kernels: reference (no CUDA)`` on CPU)."""
    from .. import fast

    fast.use("fast")  # fast kernels on CUDA; elsewhere the references, packing-aware
    if device.type == "cuda":
        fast.warn_missing_kernels(model)
    return fast.describe(model)


def bind_kernels(model: nn.Module) -> str:
    """Public form of the binding the trainer does (for CLIs that print the batching line first)."""
    return _bind_kernels(model, _device_of(model))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16), "bf16"
    return torch.autocast(device.type, enabled=False), "fp32"


def _graphs_wanted(device: torch.device) -> bool:
    """CUDA graphs only pay where kernel launches are the cost (and only exist) on CUDA."""
    return device.type == "cuda"


def _step_graphs(model: nn.Module, config: "TrainConfig", device: torch.device, packing: bool, precision: str,
                 pad_id: int):
    """(the CUDA-graph runner for packed steps or None, the run log's line about it)."""
    from ..fast.graphs import PackedStepGraphs
    from ..fast.loss import head_and_scale

    from ..fast.attention import _varlen_kernel
    from ..fast.kernels import host_read_boundaries

    host_loops = host_read_boundaries(model)
    if _varlen_kernel() is None:
        host_loops.append("softmax attention (this torch has no torch.nn.attention.varlen)")
    reasons = [(config.cuda_graphs == "off", "turned off (cuda_graphs: off)"),
               (not _graphs_wanted(device), "no CUDA"),
               (not packing, "packing is off"),
               (config.gradient_checkpointing, "gradient checkpointing is on"),
               (device.type == "cuda" and precision != "bf16",
                "float32 training (the packed attention's flash kernel takes bf16 only; float32 packed rows use "
                "per-example attention, which reads the boundaries on the host)"),
               (device.type == "cuda" and bool(host_loops),
                f"{', '.join(host_loops)} run per example on the host (a fast kernel is missing)"),
               (head_and_scale(model) is None, "the model family's head is not known to the static loss")]
    why = next((reason for hit, reason in reasons if hit), None)
    if why is not None:
        return None, f"off: {why}"
    runner = PackedStepGraphs(model, max_segments=config.effective_batch, pad_id=pad_id,
                              autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    return runner, runner.describe()


def _build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (the LoRA A and B, or every weight matrix), none on vectors (norms, biases)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)


def _cosine_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to zero."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)


@dataclass(frozen=True)
class _StepPlan:
    """Which examples each optimizer step trains on. Epoch ``e`` visits the data in ``randperm(n, seed + e)``
    order, so step ``s``'s examples are a function of ``s`` alone: that is what lets a resume continue exactly."""
    num_examples: int
    micro_batch_size: int
    grad_accum: int
    epochs: int
    seed: int

    @classmethod
    def for_data(cls, num_examples: int, config: TrainConfig) -> "_StepPlan":
        return cls(num_examples, config.micro_batch_size, config.grad_accum, config.epochs, config.seed)

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.micro_batch_size)

    @property
    def steps_per_epoch(self) -> int:  # the last step of an epoch may hold fewer micro-batches
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def micro_batches(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, step ``step``'s micro-batches as indices into the examples)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        first, size = in_epoch * self.grad_accum, self.micro_batch_size
        last = min(first + self.grad_accum, self.micro_per_epoch)
        return epoch, [order[i * size:(i + 1) * size] for i in range(first, last)]


# --- one optimizer step ----------------------------------------------------------------------------
@dataclass
class _StepBatch:
    """One optimizer step's forward units and the token counts its loss and its log line need."""
    epoch: int
    units: list[dict[str, Any]]  # padded micro-batches or packed rows
    loss_tokens: int  # the step's loss is the mean over these
    seen_tokens: int  # real tokens, no padding (throughput)
    computed_tokens: int  # what the forwards compute, padding included


def _step_batch(run: _Run, plan: _StepPlan, examples: list[TokenizedExample]) -> _StepBatch:
    """The examples of the run's next step, as padded micro-batches or packed rows, and their token counts."""
    epoch, micro = plan.micro_batches(run.step)
    units = _step_units(examples, micro, run.pad_id, run.engine.pack_budget)
    if run.engine.graphs is not None:  # graph rows are padded to their bucket length
        computed = sum(run.engine.graphs.row_length(u) for u in units)
    else:
        computed = sum(int(u["input_ids"].numel()) for u in units)  # incl. padding
    return _StepBatch(epoch, units, loss_tokens=sum(int((u["labels"][:, 1:] != -100).sum()) for u in units),
                      seen_tokens=sum(_unit_tokens(u) for u in units), computed_tokens=computed)


def _step_units(examples: list[TokenizedExample], micro: list[list[int]], pad_id: int,
                pack_budget: int | None) -> list[dict[str, Any]]:
    """The forward units of one optimizer step: padded micro-batches, or the same examples packed into rows."""
    if pack_budget is None:
        return [collate([examples[j] for j in idx], pad_id) for idx in micro]
    from ..fast import pack, pack_order

    chosen = [examples[j] for idx in micro for j in idx]
    return [pack([chosen[i] for i in group]) for group in pack_order([len(e.input_ids) for e in chosen], pack_budget)]


def _unit_tokens(unit: dict[str, Any]) -> int:
    return int(unit["attention_mask"].sum()) if "attention_mask" in unit else int(unit["input_ids"].numel())


def _forward_backward(run: _Run, batch: _StepBatch) -> tuple[float, int]:
    """Accumulate the gradients of one step's mean loss; (that loss, CUDA graphs captured on the way)."""
    graphs = run.engine.graphs
    if graphs is None:
        return _eager_forward_backward(run.model, batch.units, run.engine.device, run.engine.ctx,
                                       batch.loss_tokens, run.step, run.output_dir), 0
    before = graphs.captures
    # static-shape rows, replayed as CUDA graphs: one host sync per step
    loss = float(sum(graphs.forward_backward(u, 1.0 / max(batch.loss_tokens, 1)) for u in batch.units))
    if not math.isfinite(loss):
        raise TrainingError(_nan_message(run.step + 1, run.output_dir))
    return loss, graphs.captures - before


def _eager_forward_backward(model, batches, device, ctx, n_tokens: int, step: int, output_dir: Path) -> float:
    """Forward + backward of one optimizer step's units, Python-driven; returns the step's mean loss."""
    total = 0.0
    for batch in batches:
        # packed rows keep the varlen attention through backward too (checkpointed layers recompute)
        with _packed_context(model, batch):
            loss, _ = _sum_loss(model, batch, device, ctx)
            loss = loss / max(n_tokens, 1)
            if not torch.isfinite(loss):
                raise TrainingError(_nan_message(step + 1, output_dir))
            loss.backward()
        total += float(loss.detach())
    return total


def _sum_loss(model, batch, device, ctx) -> tuple[torch.Tensor, int]:
    """(summed next-token loss, loss tokens) of a padded micro-batch or a packed row (``cu_seq_lens_q``)."""
    from ..fast import causal_lm_loss_sum, packed_attention

    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    labels = batch.pop("labels")
    with ctx:
        if "cu_seq_lens_q" in batch:
            with packed_attention(model):
                return causal_lm_loss_sum(model, labels=labels, **batch)
        return causal_lm_loss_sum(model, batch["input_ids"], labels, attention_mask=batch["attention_mask"])


def _packed_context(model: nn.Module, unit: dict[str, Any]):
    from ..fast import packed_attention

    return packed_attention(model) if "cu_seq_lens_q" in unit else contextlib.nullcontext()


def _optimizer_step(run: _Run) -> tuple[float, float]:
    """Clip, update, advance the schedule, clear the gradients; (the learning rate used, the gradient norm)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, run.config.max_grad_norm))
    if not math.isfinite(grad_norm):
        raise TrainingError(_nan_message(run.step + 1, run.output_dir, what="gradient norm"))
    run.optimizer.step()
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    if run.engine.graphs is not None:
        run.engine.graphs.zero_grad()  # in place: the captured graphs accumulate into these tensors
    else:
        run.optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


# --- the steps and what follows each: log, norms, validation, checkpoint, progress -----------------
@dataclass
class _StepOutcome:
    """What one optimizer step reports to its log line and the progress bar."""
    loss: float  # the step's mean loss over its loss tokens
    lr: float  # the learning rate the update used
    grad_norm: float  # before clipping
    graphs_captured: int  # CUDA graphs captured during the step (a row length seen for the first time)
    tokens_per_s: float


def _run_steps(run: _Run, plan: _StepPlan, examples: list[TokenizedExample], stop_after_steps: int | None) -> None:
    """Optimizer steps until the plan ends (or ``stop_after_steps`` in total), each followed by its hooks."""
    end = plan.total_steps if stop_after_steps is None else min(plan.total_steps, stop_after_steps)
    while run.step < end:
        batch = _step_batch(run, plan, examples)
        t0 = time.perf_counter()
        loss, captured = _forward_backward(run, batch)
        lr, grad_norm = _optimizer_step(run)
        run.step += 1
        run.last_loss = loss
        tps = batch.seen_tokens / max(time.perf_counter() - t0, 1e-9)
        _after_step(run, batch, _StepOutcome(loss, lr, grad_norm, captured, tps), plan.total_steps)


def _after_step(run: _Run, batch: _StepBatch, outcome: _StepOutcome, total_steps: int) -> None:
    """Each at its interval: the step's log line, the LoRA norms, the validation loss, a checkpoint; then the
    progress bar."""
    config, step = run.config, run.step
    if config.log_every and step % config.log_every == 0:
        run.log.write(event="step", step=step, epoch=batch.epoch, loss=outcome.loss, lr=outcome.lr,
                      grad_norm=outcome.grad_norm, tokens=batch.seen_tokens, loss_tokens=batch.loss_tokens,
                      forwards=len(batch.units), computed_tokens=batch.computed_tokens,
                      tokens_per_s=round(outcome.tokens_per_s, 1),
                      **({"graphs_captured": outcome.graphs_captured} if outcome.graphs_captured else {}))
    if config.norm_every and run.norm_components is not None and (step % config.norm_every == 0 or step == 1):
        run.log.write(event="lora_norms", step=step, norms=lora_norms(run.model, run.norm_components))
    if config.eval_every and step % config.eval_every == 0 and run.val_examples:
        run.log.write(event="eval", step=step, val_loss=_validation_loss(run))
    if config.save_every and step % config.save_every == 0 and step < total_steps:
        _checkpoint(run)
    if run.progress is not None:
        run.progress.update(1)
        run.progress.set_postfix(loss=f"{outcome.loss:.3f}", tok_s=f"{outcome.tokens_per_s:.0f}")


def _validation_loss(run: _Run) -> float | None:
    """Mean loss per token on the validation examples (None without any)."""
    with _eager_validation(run.config)():
        return evaluate_loss(run.model, run.val_examples, run.pad_id, run.config.micro_batch_size,
                             run.config.precision)


def _eager_validation(config: TrainConfig):
    """Context factory for validation batches: compiled regions run eagerly there (padded batches of any
    length would each compile anew)."""
    if config.compile == "off":
        return contextlib.nullcontext
    from ..fast.compile import eager

    return eager


@torch.no_grad()
def evaluate_loss(model, examples: list[TokenizedExample], pad_id: int, batch_size: int = 8,
                  precision: str = "auto") -> float | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    device = _device_of(model)
    ctx, _ = _autocast(device, precision)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = _sum_loss(model, collate(examples[i:i + batch_size], pad_id), device, ctx)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def _stop_early(run: _Run, final_dir: str, stop_after_steps: int | None) -> TrainResult:
    """A run stopped on request before its last step: a checkpoint to resume from, and no adapter."""
    _checkpoint(run)
    run.log.write(event="stopped", step=run.step, reason=f"stop_after_steps={stop_after_steps}")
    return _result(run, final_dir, val_loss=None)


def _finish(run: _Run, final_dir: str) -> float | None:
    """The end of a complete run: the final validation loss, the adapter (or model) saved, the log's end line;
    returns the validation loss."""
    val_loss = _validation_loss(run)
    if run.val_examples:
        run.log.write(event="eval", step=run.step, val_loss=val_loss)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir}.", dir=run.output_dir))
    run.model.save_pretrained(str(tmp))
    replace_dir(tmp, run.output_dir / final_dir)
    norms = {"lora_norms": lora_norms(run.model, run.norm_components)} if run.norm_components is not None else {}
    run.log.write(event="end", step=run.step, final_loss=run.last_loss, val_loss=val_loss,
                  cuda_graphs=run.engine.graphs_account(), **norms)
    return val_loss


def _result(run: _Run, final_dir: str, val_loss: float | None) -> TrainResult:
    """The run as handed back; ``cuda_graphs`` is the runner's final account (it may have fallen back)."""
    return TrainResult(run.output_dir, run.output_dir / final_dir, run.step, run.last_loss, val_loss,
                       run.trainable_params, run.model, run.engine.graphs_account())


# --- the session around the steps: training mode, compiled regions, errors, cleanup ----------------
@contextlib.contextmanager
def _training_session(run: _Run):
    """Training mode for the steps. On the way out: errors logged (an error from torch.compile becomes one
    line that says what to do), the log and the progress bar closed, and the model handed back as PEFT
    made it (uncompiled, LoRA inputs upcast again)."""
    run.model.train()
    if run.engine.precision == "bf16":
        from ..fast import skip_input_upcast

        skip_input_upcast(run.model)  # PEFT's float32 copy of every LoRA input is undone by autocast anyway
    try:
        yield
    except TrainingError as exc:
        run.log.write(event="error", step=run.step, message=str(exc))
        raise
    except Exception as exc:
        message = _compile_failure(run.config, exc)
        if message is None:
            raise
        run.log.write(event="error", step=run.step, message=message)
        raise TrainingError(message) from exc
    finally:
        _release(run)


def _compile_regions(run: _Run) -> None:
    """torch.compile the regions ``config.compile`` names (none when off); logs what was compiled."""
    if run.config.compile == "off":
        return
    from ..fast.compile import compile_regions

    try:  # graph rows come in a few bucket lengths; eager batches in any: let dynamo go dynamic there
        line = compile_regions(run.model, run.config.compile, dynamic=False if run.engine.graphs is not None else None)
    except ValueError as exc:
        raise TrainingError(f"{exc}; train with compile: off") from exc
    run.log.write(event="compile", compile=line)


def _compile_failure(config: TrainConfig, exc: Exception) -> str | None:
    """The one-line message for an error raised by torch.compile (dynamo / Inductor); None for any other."""
    from ..fast.compile import is_compile_error

    if config.compile == "off" or not is_compile_error(exc):
        return None
    return (f"torch.compile ({config.compile}) failed: {type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:300]}; train again with compile: off")


def _release(run: _Run) -> None:
    """Close the log and the progress bar; undo what the session did to the model."""
    run.log.close()
    if run.progress is not None:
        run.progress.close()
    if run.config.compile != "off":
        from ..fast.compile import uncompile

        uncompile(run.model)
    if run.engine.precision == "bf16":  # hand the model back as PEFT made it: callers may run it without autocast
        from ..fast import skip_input_upcast

        skip_input_upcast(run.model, enabled=False)


# --- checkpoints and resume ------------------------------------------------------------------------
def checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CKPT_DIR
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def run_fingerprint(examples: list[TokenizedExample], resolved, config: "TrainConfig") -> dict[str, str]:
    """What a checkpoint must agree with to be resumed: the exact token data, the recipe, the placement."""
    import hashlib

    data = hashlib.sha256()
    for e in examples:
        data.update(json.dumps([e.id, e.input_ids, e.labels], separators=(",", ":")).encode())
    recipe = {k: v for k, v in asdict(config).items()
              if k not in ("save_every", "keep_checkpoints", "log_every", "norm_every", "eval_every", "progress",
                           "gradient_checkpointing", "precision", "cuda_graphs")}
    hosts = sorted((h.name, h.rank, h.alpha) for h in resolved.hosts) if resolved is not None else FULL_PARAMETER
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = {"data": data.hexdigest()[:16], "placement": digest(hosts)}
    out.update({f"config.{k}": json.dumps(v) for k, v in sorted(recipe.items())})
    return out


def _fingerprint_mismatch(saved: dict | None, current: dict[str, str]) -> list[str]:
    if not saved:  # a checkpoint from before fingerprints: nothing to compare
        return []
    # recipe fields added after a checkpoint was written count as agreeing when they hold their default
    defaults = {f"config.{k}": json.dumps(v) for k, v in asdict(TrainConfig()).items()}
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k)
                  and not (k not in saved and current.get(k) == defaults.get(k)))


def _save_checkpoint(output_dir: Path, step: int, peft_model, optimizer, scheduler, keep: int,
                     fingerprint: dict | None = None) -> Path:
    root = output_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    # written beside checkpoints/ and renamed into it, so checkpoints/ only ever holds complete checkpoints
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-step-{step}.", dir=output_dir))
    torch.save(lora_state(peft_model), tmp / "lora.pt")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "fingerprint": fingerprint}, tmp / "trainer_state.pt")
    final = root / f"step-{step}"
    replace_dir(tmp, final)
    for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint(run: _Run) -> Path:
    """A checkpoint after the run's current step (the oldest beyond ``keep_checkpoints`` removed)."""
    return _save_checkpoint(run.output_dir, run.step, run.model, run.optimizer, run.scheduler,
                            run.config.keep_checkpoints, run.fingerprint)


def _restore_checkpoint(ckpt: Path, model: nn.Module, optimizer, scheduler, fingerprint: dict[str, str]) -> int:
    """Load ``ckpt`` into this run (trainable weights, optimizer, schedule, RNG) once it is known to come from
    the same data, recipe and placement; returns the step it was written after."""
    saved = torch.load(ckpt / "lora.pt")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    differs = _fingerprint_mismatch(state.get("fingerprint"), fingerprint)
    if differs:
        raise TrainingError(f"--resume: checkpoint {ckpt} was written by a different run ({', '.join(differs)} "
                            "differ); resume with the original arguments, or choose another --output")
    named = dict(model.named_parameters())
    missing = set(saved) ^ {k for k, p in named.items() if p.requires_grad}
    if missing:
        raise TrainingError(f"checkpoint {ckpt} does not match this placement ({len(missing)} LoRA tensors differ)")
    with torch.no_grad():
        for k, v in saved.items():
            named[k].copy_(v.to(named[k].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _nan_message(step: int, output_dir: Path, what: str = "loss") -> str:
    ckpts = checkpoints(output_dir)
    keep = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
    return f"non-finite {what} at step {step}; training stopped ({keep}); lower the learning rate or check the data"


# --- the run log and the run's files ---------------------------------------------------------------
class _Log:
    """Append-only JSONL; on resume, lines after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            write_atomic(path, "")
        else:
            kept = []
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a crash
                    if rec.get("step", 0) <= resume_step and rec.get("event") not in ("end", "error"):
                        kept.append(line)
            write_atomic(path, "".join(k + "\n" for k in kept))
        self.fh = path.open("a", encoding="utf-8")

    def write(self, **record) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _start_record(run: _Run, plan: _StepPlan, data_manifest: dict | None, resumed: bool) -> dict[str, Any]:
    """The run log's first line (or first after the kept ones, on resume): the run's shape and every choice
    made about how it computes."""
    config, engine = run.config, run.engine
    return dict(event="resume" if resumed else "start", step=run.step, total_steps=plan.total_steps,
                trainable_params=run.trainable_params, num_train=plan.num_examples, num_val=len(run.val_examples),
                effective_batch=config.effective_batch, precision=engine.precision, packing=engine.packing,
                batching=engine.batching, gradient_checkpointing=config.gradient_checkpointing,
                loss_on=config.loss_on, placement=run.name, kernels=engine.kernels, cuda_graphs=engine.graphs_line,
                **_skip_counts(data_manifest))


def _progress_bar(run: _Run, total_steps: int):
    if not run.config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=run.step, desc=f"train {run.name}", unit="step", leave=False)


def _write_run_files(run: _Run, resolved, run_info: dict | None, data_manifest: dict | None) -> None:
    write_atomic(run.output_dir / "run_config.yaml",
                 _run_yaml(resolved, run.config, run_info, run.engine.precision, run.trainable_params,
                           run.engine.batching))
    if data_manifest is not None:
        write_atomic(run.output_dir / "data_manifest.json", json.dumps(data_manifest, indent=1))


def _skip_counts(manifest: dict | None) -> dict[str, Any]:
    """The run log's record of rows skipped while loading (missing/empty fields, benchmark items) and while
    formatting (over-long, no assistant tokens)."""
    if not manifest:
        return {}
    loading = dict(manifest.get("skipped_rows") or {})
    formatting: dict[str, int] = defaultdict(int)
    for part in (manifest.get("skipped_formatting") or {}).values():
        for why, count in (part or {}).items():
            formatting[why] += count
    return {"skipped_rows": loading, "skipped_formatting": dict(formatting),
            "skipped_total": sum(loading.values()) + sum(formatting.values()), "template": manifest.get("template")}


def _run_yaml(resolved, config: TrainConfig, run_info: dict | None, precision: str, trainable: int,
              batching: str) -> str:
    import yaml

    if resolved is None:
        return yaml.safe_dump({"run": dict(run_info or {}), "placement": {"name": FULL_PARAMETER,
                               "trainable_params": trainable},
                               "training": {**asdict(config), "effective_batch": config.effective_batch,
                                            "precision_used": precision, "batching": batching}}, sort_keys=False)
    doc = {
        "run": dict(run_info or {}),
        "placement": {
            "name": resolved.name,
            "spec": resolved.placement.model_dump(mode="json"),
            "trainable_params": trainable,
            "components": resolved.components(),
            "hosts": [{"name": h.name, "component": h.component, "role": h.role, "layer": h.layer,
                       "rank": h.rank, "alpha": h.alpha} for h in resolved.hosts],
        },
        "training": {**asdict(config), "effective_batch": config.effective_batch, "precision_used": precision,
                     "batching": batching},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def load_adapter(model: nn.Module, adapter_dir: str | Path):
    """Reload a saved adapter onto a fresh base model (PEFT, exact target names kept)."""
    from peft import PeftModel

    from ..placement import exact_targets

    with exact_targets():
        return PeftModel.from_pretrained(model, str(adapter_dir))


def prepare_data(source: str, tokenizer, config: TrainConfig | None = None, *, data_dir: str | Path | None = None,
                 max_examples: int | None = None, val_examples: int | None = None,
                 fields: dict[str, str] | None = None, split: str | None = None,
                 hub_config: str | None = None) -> tuple[TokenizedSet, TokenizedSet, dict]:
    """Load, split (seeded by ``config.seed``) and tokenize; the manifest also counts rows skipped while
    formatting and keeps only the ids that survived. ``source``: a domain (gsm8k, codealpaca, chat), a local
    .jsonl/.json/.csv file or a Hugging Face dataset id (``split``/``hub_config`` select its split and config);
    ``fields`` maps prompt/response or messages (and optional system/id) to the source's columns."""
    from ..data import load_split, tokenize_examples

    config = config or TrainConfig()
    data = load_split(source, data_dir=data_dir, max_examples=max_examples, val_examples=val_examples,
                      seed=config.seed, fields=fields, split=split, config=hub_config)
    tr = tokenize_examples(data.train, tokenizer, max_length=config.max_length, loss_on=config.loss_on)
    va = tokenize_examples(data.val, tokenizer, max_length=config.max_length, loss_on=config.loss_on)
    manifest = dict(data.manifest)
    manifest.update({
        "template": tr.template, "loss_on": config.loss_on, "max_length": config.max_length,
        "skipped_formatting": {"train": dict(tr.skipped), "val": dict(va.skipped)},
        "train_ids": [e.id for e in tr.examples], "val_ids": [e.id for e in va.examples],
        "num_train": len(tr.examples), "num_val": len(va.examples),
    })
    return tr, va, manifest
