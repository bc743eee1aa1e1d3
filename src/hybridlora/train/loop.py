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


# --- the loop ----------------------------------------------------------------------------------------
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


def _step_units(examples: list[TokenizedExample], micro: list[list[int]], pad_id: int,
                pack_budget: int | None) -> list[dict[str, Any]]:
    """The forward units of one optimizer step: padded micro-batches, or the same examples packed into rows."""
    if pack_budget is None:
        return [collate([examples[j] for j in idx], pad_id) for idx in micro]
    from ..fast import pack, pack_order

    chosen = [examples[j] for idx in micro for j in idx]
    return [pack([chosen[i] for i in group]) for group in pack_order([len(e.input_ids) for e in chosen], pack_budget)]


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


def _packed_context(model: nn.Module, unit: dict[str, Any]):
    import contextlib

    from ..fast import packed_attention

    return packed_attention(model) if "cu_seq_lens_q" in unit else contextlib.nullcontext()


def _unit_tokens(unit: dict[str, Any]) -> int:
    return int(unit["attention_mask"].sum()) if "attention_mask" in unit else int(unit["input_ids"].numel())


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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    from transformers import get_cosine_schedule_with_warmup

    config = config or TrainConfig()
    config.validate()
    examples = train_set.examples if isinstance(train_set, TokenizedSet) else list(train_set)
    val_examples = (val_set.examples if isinstance(val_set, TokenizedSet) else list(val_set or []))
    if not examples:
        raise TrainingError("no training examples left after formatting (all skipped?)")
    output_dir = Path(output_dir)
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
    if not resume:
        ckpts = []
    output_dir.mkdir(parents=True, exist_ok=True)
    for junk in [*output_dir.glob(".checkpoint-step-*"), *output_dir.glob(f".{final_dir}.*")]:
        shutil.rmtree(junk, ignore_errors=True)  # half-written by a killed run
    component_of = component_of or {h.name: h.component for h in (resolved.hosts if resolved is not None else [])}
    run_name = resolved.name if resolved is not None else FULL_PARAMETER

    fingerprint = run_fingerprint(examples, resolved, config)

    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing; drop the option")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # PEFT: frozen embeddings, so checkpointed blocks need grad inputs
    peft_model = attach_lora(model, resolved, config.lora_dropout) if resolved is not None else model
    device = _device_of(peft_model)
    kernels = _bind_kernels(peft_model, device)
    packing, batching = batching_line(peft_model, config)
    pack_budget = pack_tokens_for(config) if packing else None
    ctx, precision = _autocast(device, config.precision)
    graphs, graphs_line = _step_graphs(peft_model, config, device, packing, precision, pad_id)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    decay = [p for n, p in peft_model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in peft_model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    n = len(examples)
    micro_per_epoch = math.ceil(n / config.micro_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    step = 0
    if ckpts:
        ckpt = ckpts[-1]
        saved = torch.load(ckpt / "lora.pt")
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        differs = _fingerprint_mismatch(state.get("fingerprint"), fingerprint)
        if differs:
            raise TrainingError(f"--resume: checkpoint {ckpt} was written by a different run ({', '.join(differs)} "
                                "differ); resume with the original arguments, or choose another --output")
        named = dict(peft_model.named_parameters())
        missing = set(saved) ^ {k for k, p in named.items() if p.requires_grad}
        if missing:
            raise TrainingError(f"checkpoint {ckpt} does not match this placement ({len(missing)} LoRA tensors differ)")
        with torch.no_grad():
            for k, v in saved.items():
                named[k].copy_(v.to(named[k].device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step = state["step"]
    else:
        torch.manual_seed(config.seed)

    write_atomic(output_dir / "run_config.yaml", _run_yaml(resolved, config, run_info, precision, trainable, batching))
    if data_manifest is not None:
        write_atomic(output_dir / "data_manifest.json", json.dumps(data_manifest, indent=1))
    log = _Log(output_dir / LOG_NAME, step if ckpts else None)
    log.write(event="start" if not ckpts else "resume", step=step, total_steps=total_steps,
              trainable_params=trainable, num_train=n, num_val=len(val_examples),
              effective_batch=config.effective_batch, precision=precision, packing=packing, batching=batching,
              gradient_checkpointing=config.gradient_checkpointing, loss_on=config.loss_on, placement=run_name,
              kernels=kernels, cuda_graphs=graphs_line,
              **_skip_counts(data_manifest))

    progress = None
    if config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=f"train {run_name}", unit="step", leave=False)
    peft_model.train()
    last_loss = None
    if precision == "bf16":
        from ..fast import skip_input_upcast

        skip_input_upcast(peft_model)  # PEFT's float32 copy of every LoRA input is undone by autocast anyway
    validation = _eager_validation(config)
    try:
        if config.compile != "off":
            from ..fast.compile import compile_regions

            try:  # graph rows come in a few bucket lengths; eager batches in any: let dynamo go dynamic there
                line = compile_regions(peft_model, config.compile, dynamic=False if graphs is not None else None)
            except ValueError as exc:
                raise TrainingError(f"{exc}; train with compile: off") from exc
            log.write(event="compile", compile=line)
        end = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
        while step < end:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
            first = in_epoch * config.grad_accum
            micro = [order[i * config.micro_batch_size:(i + 1) * config.micro_batch_size]
                     for i in range(first, min(first + config.grad_accum, micro_per_epoch))]
            batches = _step_units(examples, micro, pad_id, pack_budget)
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            seen_tokens = sum(_unit_tokens(b) for b in batches)
            computed = sum(int(b["input_ids"].numel()) for b in batches)  # incl. padding
            if graphs is not None:  # graph rows are padded to their bucket length
                computed = sum(graphs.row_length(b) for b in batches)
            t0 = time.perf_counter()
            captured = graphs.captures if graphs is not None else 0
            if graphs is not None:  # static-shape rows, replayed as CUDA graphs: one host sync per step
                total = float(sum(graphs.forward_backward(b, 1.0 / max(n_tokens, 1)) for b in batches))
                captured = graphs.captures - captured
                if not math.isfinite(total):
                    raise TrainingError(_nan_message(step + 1, output_dir))
            else:
                total = _eager_forward_backward(peft_model, batches, device, ctx, n_tokens, step, output_dir)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise TrainingError(_nan_message(step + 1, output_dir, what="gradient norm"))
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            if graphs is not None:
                graphs.zero_grad()  # in place: the captured graphs accumulate into these tensors
            else:
                optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = total
            tps = seen_tokens / max(time.perf_counter() - t0, 1e-9)
            if config.log_every and step % config.log_every == 0:
                log.write(event="step", step=step, epoch=epoch, loss=total, lr=lr, grad_norm=grad_norm,
                          tokens=seen_tokens, loss_tokens=n_tokens, forwards=len(batches), computed_tokens=computed,
                          tokens_per_s=round(tps, 1), **({"graphs_captured": captured} if captured else {}))
            if config.norm_every and resolved is not None and (step % config.norm_every == 0 or step == 1):
                log.write(event="lora_norms", step=step, norms=lora_norms(peft_model, component_of))
            if config.eval_every and step % config.eval_every == 0 and val_examples:
                with validation():
                    val = evaluate_loss(peft_model, val_examples, pad_id, config.micro_batch_size, config.precision)
                log.write(event="eval", step=step, val_loss=val)
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                _save_checkpoint(output_dir, step, peft_model, optimizer, scheduler, config.keep_checkpoints,
                                 fingerprint)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{total:.3f}", tok_s=f"{tps:.0f}")
        if step < total_steps:  # stopped early on request: keep a checkpoint to resume from
            _save_checkpoint(output_dir, step, peft_model, optimizer, scheduler, config.keep_checkpoints,
                             fingerprint)
            log.write(event="stopped", step=step, reason=f"stop_after_steps={stop_after_steps}")
            return TrainResult(output_dir, output_dir / final_dir, step, last_loss, None, trainable, peft_model,
                               graphs.describe() if graphs is not None else graphs_line)
        with validation():
            val_loss = evaluate_loss(peft_model, val_examples, pad_id, config.micro_batch_size, config.precision)
        if val_examples:
            log.write(event="eval", step=step, val_loss=val_loss)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir}.", dir=output_dir))
        peft_model.save_pretrained(str(tmp))
        replace_dir(tmp, output_dir / final_dir)
        log.write(event="end", step=step, final_loss=last_loss, val_loss=val_loss,
                  cuda_graphs=graphs.describe() if graphs is not None else graphs_line,
                  **({"lora_norms": lora_norms(peft_model, component_of)} if resolved is not None else {}))
    except TrainingError as exc:
        log.write(event="error", step=step, message=str(exc))
        raise
    except Exception as exc:
        from ..fast.compile import is_compile_error

        if config.compile == "off" or not is_compile_error(exc):
            raise
        message = (f"torch.compile ({config.compile}) failed: {type(exc).__name__}: "
                   f"{(str(exc).splitlines() or [''])[0][:300]}; train again with compile: off")
        log.write(event="error", step=step, message=message)
        raise TrainingError(message) from exc
    finally:
        log.close()
        if progress is not None:
            progress.close()
        if config.compile != "off":
            from ..fast.compile import uncompile

            uncompile(peft_model)
        if precision == "bf16":  # hand the model back as PEFT made it: callers may run it without autocast
            from ..fast import skip_input_upcast

            skip_input_upcast(peft_model, enabled=False)
    return TrainResult(output_dir, output_dir / final_dir, step, last_loss, val_loss, trainable, peft_model,
                       graphs.describe() if graphs is not None else graphs_line)


def _eager_validation(config: TrainConfig):
    """Context factory for validation batches: compiled regions run eagerly there (padded batches of any
    length would each compile anew)."""
    import contextlib

    if config.compile == "off":
        return contextlib.nullcontext
    from ..fast.compile import eager

    return eager


def _nan_message(step: int, output_dir: Path, what: str = "loss") -> str:
    ckpts = checkpoints(output_dir)
    keep = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
    return f"non-finite {what} at step {step}; training stopped ({keep}); lower the learning rate or check the data"


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
