"""``hybridlora train``: wire with ``from .train.cli import register; register(sub)`` in ``cli.build_parser``."""
from __future__ import annotations

import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="LoRA fine-tuning of a placement on a domain dataset")
    p.add_argument("model", help="catalog name, hub id, local model directory or config.json")
    p.add_argument("--placement", required=True, metavar="NAME|FILE", help="a preset name or a placement YAML file")
    p.add_argument("--data", required=True, metavar="gsm8k|codealpaca|chat|PATH")
    p.add_argument("--data-dir", help="the shared data folder (needed offline)")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--output", default="runs/train", help="output directory (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--tiny", action="store_true",
                   help="random-weight tiny same-family model and an offline tiny tokenizer (smoke runs)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..cli import CliError
    from ..data import DataError
    from .loop import TrainingError

    try:
        return _run(args)
    except (DataError, TrainingError) as exc:
        raise CliError(str(exc)) from exc


def _run(args) -> int:
    import torch

    from ..cli import CliError
    from ..components import build_component_map
    from ..families import family_for, family_named
    from ..models import build_model, load_pretrained, resolve_model, text_config, tiny_config
    from ..placement import load_placement_file, named_preset, resolve
    from .loop import TrainConfig, prepare_data, train

    source = resolve_model(args.model)
    if args.tiny:
        family = family_for(text_config(source.config).model_type)
        if family is None:
            raise CliError(f"{args.model}: no family entry, so no tiny model; drop --tiny and give real weights")
        model = build_model(tiny_config(source.config, family), seed=args.seed)
        if args.data_dir is None:
            raise CliError("--tiny builds its tokenizer from the shared data folder: pass --data-dir")
        from ..data import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(data_dir=args.data_dir, vocab_size=model.config.vocab_size)
    else:
        if source.path is None and source.kind != "hub":
            raise CliError(f"{args.model}: no weights available (catalog config only); pass a local model "
                           "directory, connect to the hub, or use --tiny for a smoke run")
        from transformers import AutoTokenizer

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = load_pretrained(source, dtype=dtype)
        if torch.cuda.is_available():
            model = model.cuda()
        tokenizer = AutoTokenizer.from_pretrained(str(source.path) if source.path else source.name)
    cmap = build_component_map(model)
    item = args.placement
    if item.endswith((".yaml", ".yml")) or os.sep in item:
        if not Path(item).is_file():
            raise CliError(f"placement file {item} not found")
        placement = load_placement_file(item)
    else:
        placement = named_preset(item, family_named(cmap.family) if cmap.family else None)
    resolved = resolve(placement, cmap)
    config = TrainConfig(epochs=args.epochs, seed=args.seed, max_length=args.max_length,
                         micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum,
                         learning_rate=args.lr, save_every=args.save_every)
    tr, va, manifest = prepare_data(args.data, tokenizer, config, data_dir=args.data_dir,
                                    max_examples=args.max_examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = train(model, resolved, tr, args.output, config, pad_id=pad_id, val_set=va, data_manifest=manifest,
                   resume=args.resume, run_info={"model": source.name, "tiny": bool(args.tiny), "data": args.data})
    print(f"{resolved.name}: {result.steps} steps, final loss {result.final_loss:.4f}, val loss "
          f"{result.val_loss if result.val_loss is None else round(result.val_loss, 4)}; adapter in {result.adapter_dir}")
    return 0
