"""``hybridlora train``: wire with ``from .train.cli import register; register(sub)`` in ``cli.build_parser``.

See docs/TRAINING.md for the command, its defaults and its outputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..threads import add_option as add_threads_option
from ..threads import current as current_threads


def register(subparsers) -> None:
    from .loop import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("train", help="LoRA fine-tuning of a placement on a domain dataset")
    p.add_argument("model", help="catalog name, hub id, local model directory or config.json")
    p.add_argument("--placement", required=True, metavar="NAME|FILE", help="a preset name or a placement YAML file")
    p.add_argument("--rank", type=int, default=None,
                   help="default LoRA rank of the placement (default: the placement's own, 16 for presets)")
    p.add_argument("--alpha", type=float, default=None,
                   help="default LoRA alpha of the placement (default: the placement's own, 32 for presets)")
    p.add_argument("--data", required=True, metavar="gsm8k|codealpaca|chat|PATH|HF_ID",
                   help="a study domain, a local .jsonl/.json/.csv file, or a Hugging Face dataset id")
    p.add_argument("--data-dir", help="the shared data folder (local copies of the domains; needed offline)")
    p.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN",
                   help="field mapping for a file or hub dataset: prompt=, response=, messages=, system=, id= "
                        "(repeatable; prompt=a+b joins columns); guessed when omitted")
    p.add_argument("--data-split", help="hub dataset split (default: train)")
    p.add_argument("--data-config", help="hub dataset configuration name")
    p.add_argument("--max-examples", type=int, help="seeded training subset size (default: all)")
    p.add_argument("--val-examples", type=int, help="held-out validation slice (default: 5%%, 1..200)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-length", type=int, default=d.max_length, help="longer examples are skipped and counted")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="effective batch = micro-batch × grad-accum")
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--loss-on", choices=["assistant", "full"], default=d.loss_on,
                   help="assistant tokens only (default) or every token (the study's recipe)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision,
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--packing", choices=["auto", "off"], default="auto",
                   help="auto: pack each step's examples into rows when every mixer keeps them apart (default)")
    p.add_argument("--pack-tokens", type=int, default=0,
                   help="tokens per packed row (default: micro-batch size x max length)")
    p.add_argument("--cuda-graphs", choices=["auto", "off"], default="auto",
                   help="auto: on CUDA, replay each packed row's forward + backward as a CUDA graph (default)")
    p.add_argument("--compile", choices=["off", "lora", "layers"], default=d.compile,
                   help="torch.compile regions: layers (every decoder layer, between the fast kernels) or lora (every "
                        "LoRA layer); costs ~25 s per row length on an H100, pays on long runs (docs/PERFORMANCE.md)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N optimizer steps")
    p.add_argument("--norm-every", type=int, default=d.norm_every, help="log per-component LoRA norms every N steps")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validation loss every N steps (0: end)")
    p.add_argument("--output", default="runs/train", help="output directory (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.add_argument("--tiny", action="store_true",
                   help="random-weight tiny same-family model (weights seeded with 0) and the offline byte tokenizer, as in eval --tiny (smoke runs)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..errors import CliError, check_seed
    from ..data import DataError
    from .loop import TrainingError

    check_seed(args.seed)  # before any work: torch refuses seeds beyond 64 bits only once training starts
    try:
        return _run(args)
    except (DataError, TrainingError) as exc:
        raise CliError(str(exc)) from exc


def _fields(items: list[str]) -> dict[str, str] | None:
    from ..errors import CliError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CliError(f"--field {item!r}: expected KEY=COLUMN, e.g. --field prompt=question")
        out[key.strip()] = value.strip()
    return out or None


def load_model_and_tokenizer(spec: str, *, tiny: bool):
    """(model source, model, tokenizer) for fine-tuning commands. ``tiny``: the family's tiny model with random
    weights seeded 0 and the byte tokenizer, left on the CPU; else the real weights, on the GPU when there is one."""
    import torch

    from ..errors import CliError
    from ..families import family_for
    from ..models import build_model, load_pretrained, resolve_model, text_config, tiny_config

    source = resolve_model(spec)
    if tiny:
        family = family_for(text_config(source.config).model_type)
        if family is None:
            raise CliError(f"{spec}: no family entry, so no tiny model; drop --tiny and give real weights")
        # The same tiny base model and byte tokenizer as `hybridlora eval --tiny` and the study (weights seeded
        # with 0, not the training seed), so an adapter trained here is evaluated on the base it was trained on.
        from ..evaluate.tokenizer import byte_tokenizer

        return source, build_model(tiny_config(source.config, family), seed=0), byte_tokenizer()
    if source.path is None and source.kind != "hub":
        raise CliError(f"{spec}: no weights available (catalog config only); pass a local model "
                       "directory, connect to the hub, or use --tiny for a smoke run")
    from transformers import AutoTokenizer

    model = load_pretrained(source, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    return source, model, AutoTokenizer.from_pretrained(str(source.path) if source.path else source.name)


def _run(args) -> int:
    from ..errors import CliError
    from ..components import build_component_map
    from ..data import pad_id_of
    from ..families import family_named
    from ..placement import load_placement_file, looks_like_placement_file, named_preset, resolve
    from .loop import TrainConfig, bind_kernels, prepare_data, train
    from .packing import batching_line

    fields = _fields(args.field)
    source, model, tokenizer = load_model_and_tokenizer(args.model, tiny=args.tiny)
    cmap = build_component_map(model)
    item = args.placement
    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank {args.rank}: give a LoRA rank of at least 1, e.g. --rank 16")
    if args.alpha is not None and not args.alpha > 0:
        raise CliError(f"--alpha {args.alpha:g}: give a positive LoRA alpha, e.g. --alpha 32")
    if looks_like_placement_file(item):
        if not Path(item).is_file():
            raise CliError(f"placement file {item} not found")
        placement = load_placement_file(item)
    else:
        placement = named_preset(item, family_named(cmap.family) if cmap.family else None)
    resolved = resolve(placement.with_defaults(args.rank, args.alpha), cmap)
    config = TrainConfig(epochs=args.epochs, seed=args.seed, max_length=args.max_length,
                         micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum,
                         learning_rate=args.lr, lora_dropout=args.lora_dropout, weight_decay=args.weight_decay,
                         warmup_ratio=args.warmup_ratio, loss_on=args.loss_on, precision=args.precision,
                         gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
                         packing=args.packing, pack_tokens=args.pack_tokens,
                         cuda_graphs=args.cuda_graphs, compile=args.compile,
                         norm_every=args.norm_every, eval_every=args.eval_every, progress=not args.no_progress)
    config.validate()
    tr, va, manifest = prepare_data(args.data, tokenizer, config, data_dir=args.data_dir,
                                    max_examples=args.max_examples, val_examples=args.val_examples, fields=fields,
                                    split=args.data_split, hub_config=args.data_config)
    skipped = dict(manifest["skipped_rows"])
    for part in manifest["skipped_formatting"].values():
        for why, count in part.items():
            skipped[why] = skipped.get(why, 0) + count
    print(f"data: {args.data} from {manifest['origin']}: {manifest['num_train']} train / {manifest['num_val']} "
          f"validation examples, template {manifest['template']}, loss on {config.loss_on} tokens; skipped "
          f"{sum(skipped.values())}" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})"
                                        if skipped else ""))
    bind_kernels(model)
    print(batching_line(model, config)[1])
    print(current_threads() or "threads: torch's default")
    sys.stdout.flush()
    result = train(model, resolved, tr, args.output, config, pad_id=pad_id_of(tokenizer), val_set=va,
                   data_manifest=manifest, resume=args.resume,
                   run_info={"model": source.name, "tiny": bool(args.tiny), "data": args.data,
                             "data_dir": str(args.data_dir) if args.data_dir else None, "threads": current_threads()})
    val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    print(f"{resolved.name}: {result.steps} steps, {result.trainable_params:,} trainable parameters, final loss "
          f"{result.final_loss:.4f}, validation loss {val}; adapter in {result.adapter_dir}")
    print(f"cuda graphs: {result.cuda_graphs}")
    return 0
