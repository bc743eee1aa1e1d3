"""Per-layer representation diagnostics of one condition, on a few windows of the perplexity text.

For each decoder layer ``l`` with input ``h_in`` and output ``h_out`` (captured by hooks on the layer, so they
include the ablation), over every token of the diagnostic windows:

* ``rel_update`` — ‖h_out − h_in‖ / ‖h_in‖ (Frobenius over tokens), and ``cosine`` — the mean over tokens of
  cos(h_in, h_out): how much the layer still changes the residual stream;
* ``unit_ratio`` — per component of the layer, ‖component output‖ / ‖h_in‖ (0 for a zeroed unit);
* ``kl`` — logit lens: KL(intact ‖ ablated) between the next-token distributions read from ``h_out`` through the
  model's final norm, LM head and logit scale, averaged over tokens (nats);
* ``cka`` — linear CKA between the intact and the ablated ``h_out`` (token × hidden matrices, centred).

The intact model's states come from a second forward of the same model with the hooks detached (once per
model and rows when the caller keeps them: ``intact``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..families import family_named
from .methods import ModelUnits, _primary


def final_norm_and_scale(model, cmap) -> tuple[torch.nn.Module, float]:
    norms = [m.name for m in cmap.modules if m.component == "norm" and m.layer is None]
    if not norms:
        raise ValueError("no final norm found in the component map; the logit lens needs it")
    scale: Any = 1.0
    if cmap.family:
        declared = family_named(cmap.family).logit_multiplier
        if isinstance(declared, str):
            scale = getattr(model.config, declared, 1.0)
        elif declared is not None:
            scale = declared
    return model.get_submodule(norms[-1]), float(scale)


def _capture(model, mu: ModelUnits, rows: Sequence[Sequence[int]]) -> dict[str, Any]:
    layers = model.get_submodule(mu.layers_path)
    inputs: dict[int, list[torch.Tensor]] = {}
    outputs: dict[int, list[torch.Tensor]] = {}
    unit_out: dict[tuple, list[torch.Tensor]] = {}
    current = {"layer": None}
    handles = []
    for index, layer in enumerate(layers):
        def pre(module, args, kwargs, index=index):
            current["layer"] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            inputs.setdefault(index, []).append(hidden.detach().float()[0])

        def post(module, args, output, index=index):
            outputs.setdefault(index, []).append(_primary(output).detach().float()[0])
            current["layer"] = None
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    for unit in mu.units:
        for name in unit.modules:
            def grab(module, args, output, unit=unit, name=name):
                if current["layer"] == unit.layer:
                    key = (unit.layer, unit.component, name)
                    unit_out.setdefault(key, []).append(_primary(output).detach().float()[0])
            # registered last: it sees the output after any ablation hook replaced it
            handles.append(model.get_submodule(name).register_forward_hook(grab))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for row in rows:
                model(input_ids=torch.tensor([list(row)], device=device))
    finally:
        for h in handles:
            h.remove()
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return {"in": cat(inputs), "out": cat(outputs), "units": _sum_units(unit_out)}


def _sum_units(unit_out: dict[tuple, list[torch.Tensor]]) -> dict[tuple[int, str], torch.Tensor]:
    # a unit hooked on two modules (Granite's experts + shared MLP) outputs their sum
    out: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, component, _), parts in unit_out.items():
        whole = torch.cat(parts)
        out[(layer, component)] = out[(layer, component)] + whole if (layer, component) in out else whole
    return out


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if float(denom) > 0 else math.nan


def _lens_kl(h_a: torch.Tensor, h_b: torch.Tensor, norm, head, scale: float, chunk: int = 256) -> float:
    total, n = 0.0, h_a.shape[0]
    dtype = next(head.parameters()).dtype
    for s in range(0, n, chunk):
        la = head(norm(h_a[s:s + chunk].to(dtype))).float() * scale
        lb = head(norm(h_b[s:s + chunk].to(dtype))).float() * scale
        pa = torch.log_softmax(la, -1)
        pb = torch.log_softmax(lb, -1)
        total += float((pa.exp() * (pa - pb)).sum())
    return total / n


def layer_diagnostics(model, cmap, mu: ModelUnits, rows: Sequence[Sequence[int]], ablation,
                      intact: dict[int, torch.Tensor] | None = None) -> dict[str, Any]:
    """Diagnostics of ``model`` with ``ablation`` attached (``ablation.remove()`` is called here; the caller
    must not rely on the hooks afterwards). ``ablation`` None: the intact model against itself.

    ``intact``: a dict the caller keeps for these rows of this model — the intact model's layer outputs; when
    empty it is filled here, when filled it is used instead of a second forward of the intact model."""
    ablated = _capture(model, mu, rows)
    if ablation is not None:
        ablation.remove()
    if not intact:
        outputs = ablated["out"] if ablation is None else _capture(model, mu, rows)["out"]
        if intact is None:
            intact = outputs
        else:
            intact.update(outputs)
    norm, scale = final_norm_and_scale(model, cmap)
    head = model.get_output_embeddings()
    layers = []
    with torch.inference_mode():
        for index in sorted(ablated["out"]):
            h_in, h_out = ablated["in"][index], ablated["out"][index]
            in_norm = float(h_in.norm())
            ratio = {c: float(t.norm()) / in_norm if in_norm else math.nan
                     for (layer, c), t in ablated["units"].items() if layer == index}
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean()
            layers.append({
                "layer": index,
                "rel_update": float((h_out - h_in).norm()) / in_norm if in_norm else math.nan,
                "cosine": float(cos),
                "unit_ratio": ratio,
                "kl": max(0.0, _lens_kl(intact[index], h_out, norm, head, scale)),
                "cka": linear_cka(intact[index], h_out),
            })
    tokens = sum(len(r) for r in rows)
    final = layers[-1] if layers else {}
    return {"tokens": tokens, "layers": layers, "final_kl": final.get("kl"),
            "mean_cka": sum(l["cka"] for l in layers) / len(layers) if layers else None}
