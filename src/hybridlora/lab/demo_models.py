"""``hybridlora lab demo-models``: the embedded demo's base models, pretrained on the synthetic mixture.

Two matched lab models of the ``demo-gdn`` spec — ``demo-sequential`` (G G G A) and ``demo-parallel`` (attention
beside Gated DeltaNet in every layer), same parameter count — pretrained from scratch with ``lab pretrain``'s
library entry (:func:`.pretrain.pretrain`: the project's trainer, packing, every weight trained) on examples of
the pretraining mixture (:func:`.mixture.mixture_examples`: the three pretraining tasks of :mod:`hybridlora.synthetic`
in turn, loss on the answers) with :func:`.mixture.mixture_tokenizer`. The recipe below is fixed; this command rebuilds the
shipped models (``src/hybridlora/lab/pretrained/``) from it (about 16 and 19 minutes on one shared CPU core).
Training is deterministic on CPU for a given torch build.

A study names them as ``model: builtin:demo-sequential`` / ``builtin:demo-parallel``
(:func:`hybridlora.builtin_models.builtin_model_dir`). Each shipped directory holds the model (config, weights, tokenizer) and
``demo_model.json``: the recipe, its fingerprint and the pretraining result. A test checks the fingerprint against
this module's recipe, so a change of the recipe or of the task generators cannot leave stale models unnoticed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from ..builtin_models import MODELS, PACKAGED

SPEC = "demo-gdn"
RECIPE = {"documents": 80000, "mixture_seed": 0, "seq_len": 128, "micro_batch_size": 16, "lr": 5e-3,
          "weight_decay": 0.0, "warmup_ratio": 0.05, "seed": 0}
INFO_FILE = "demo_model.json"


def fingerprint(variant: str) -> str:
    """Hash of everything the model is a function of: spec file, recipe, variant and the task generators."""
    from .. import synthetic
    from .spec import SPECS_DIR

    parts = [(SPECS_DIR / f"{SPEC}.yaml").read_text(encoding="utf-8"), json.dumps(RECIPE, sort_keys=True), variant,
             f"synthetic v{synthetic.VERSION}", *synthetic.PRETRAINING, synthetic.USER_HEADER,
             synthetic.ASSISTANT_HEADER]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def register_cli(sub) -> None:
    p = sub.add_parser("demo-models", help="rebuild the embedded demo's pretrained lab models (synthetic mixture)")
    p.add_argument("--output", default=str(PACKAGED),
                   help="where to write demo-sequential/ and demo-parallel/ (default: the shipped location)")
    p.add_argument("--only", choices=sorted(MODELS), help="rebuild one of the two")
    p.add_argument("--documents", type=int, default=RECIPE["documents"],
                   help="pretraining documents (default: the recipe's; other values are for quick checks and "
                        "are recorded, the fingerprint then differs)")
    p.set_defaults(func=cmd_demo_models)


def cmd_demo_models(args) -> int:
    from ..errors import CliError

    if args.documents < 1:
        raise CliError("--documents must be at least 1")
    out = Path(args.output)
    for name in [args.only] if args.only else list(MODELS):
        info = build_one(name, out, documents=args.documents)
        print(f"{name}: {info['parameters']:,} parameters, {info['steps']} steps, final loss {info['final_loss']:.4f}, "
              f"{info['seconds']:.0f} s; {out / name}")
    return 0


def build_one(name: str, output: Path, *, documents: int | None = None) -> dict:
    """Pretrain one demo model into ``output/name`` (built aside, then renamed into place); returns its info."""
    import time

    from ..atomic import replace_dir
    from .cli import load_spec_or_fail, solve_or_fail
    from .mixture import mixture_examples, mixture_tokenizer
    from .pretrain import MODEL_DIR, PretrainOptions, pretrain
    from .spec import variants

    recipe = dict(RECIPE, documents=documents or RECIPE["documents"])
    spec = variants(load_spec_or_fail(SPEC))[MODELS[name]]
    tokenizer = mixture_tokenizer()
    config, match = solve_or_fail(spec.with_(vocab_size=len(tokenizer)))
    config.pad_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    examples = mixture_examples(recipe["documents"], recipe["mixture_seed"], tokenizer, recipe["seq_len"])
    options = PretrainOptions(seq_len=recipe["seq_len"], micro_batch_size=recipe["micro_batch_size"], lr=recipe["lr"],
                              weight_decay=recipe["weight_decay"], warmup_ratio=recipe["warmup_ratio"],
                              seed=recipe["seed"], save_every=0, progress=False)
    output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=output))
    start = time.perf_counter()
    try:
        result = pretrain(config, examples, examples[:64], work / "run", options, tokenizer, epochs=1,
                          info={"spec": SPEC, "variant": MODELS[name], "recipe": recipe})
        info = {"name": name, "spec": SPEC, "variant": MODELS[name], "recipe": recipe,
                "fingerprint": fingerprint(MODELS[name]) if recipe == RECIPE else None,
                "parameters": match.achieved, "layer_mixers": config.layer_mixers, "steps": result.steps,
                "final_loss": result.final_loss, "seconds": round(time.perf_counter() - start, 1),
                "tokens": sum(len(e.input_ids) for e in examples),
                "rebuild": f"hybridlora lab demo-models --only {name}"}
        model_dir = work / "run" / MODEL_DIR
        (model_dir / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        replace_dir(model_dir, output / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info
