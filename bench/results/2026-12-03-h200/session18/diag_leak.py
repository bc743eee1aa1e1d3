# Where does the parallel gpu-30m-gdn model's packed second example pick up the first example's values on CUDA?
# Per-layer / per-mixer max |diff| over the second example between two packed rows whose first examples differ,
# under several bindings; plus the signal scale (an own-example change) and the unpacked reference.
import importlib, inspect, json, os, sys, time
import torch

from hybridlora import fast
from hybridlora.fast import kernels, ops
from hybridlora.lab.model import LabForCausalLM
from hybridlora.lab.solve import solve
from hybridlora.lab.spec import load_spec, variants

MOD = "transformers.models.qwen3_5.modeling_qwen3_5"
dev = os.environ.get("DEV", "cuda")


def build(variant):
    config, _ = solve(variants(load_spec("gpu-30m-gdn"))[variant])
    torch.manual_seed(0)
    return LabForCausalLM(config).eval().to(dev), config


def traced(model, rows, autocast=False):
    """logits and per-(layer, part) outputs for each packed row"""
    outs = []
    for r in rows:
        rec = {}
        hooks = []
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(f"L{i}", o.detach().float())))
            for name in ("self_attn", "linear_attn"):
                sub = getattr(layer, name, None)
                if sub is not None:
                    hooks.append(sub.register_forward_hook(
                        lambda m, a, o, i=i, n=name: rec.__setitem__(f"L{i}.{n}", (o[0] if isinstance(o, tuple) else o).detach().float())))
        with torch.no_grad(), fast.packed_attention(model), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            logits = model(**{k: torch.as_tensor(v).to(dev) for k, v in r.items() if k != "labels"}, use_cache=False).logits
        for h in hooks:
            h.remove()
        rec["logits"] = logits.float()
        outs.append(rec)
    return outs


def check(variant, label, autocast=False):
    model, config = build(variant)
    length, cut = 160, 100
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, length), generator=g)
    changed = ids.clone(); changed[:, cut:] = (changed[:, cut:] + 1) % config.vocab_size
    other = torch.randint(0, config.vocab_size, (1, length), generator=g)  # a wholly different first example
    second = ids[1, :70].tolist()
    second_changed = list(second); second_changed[0] = (second_changed[0] + 1) % config.vocab_size
    rows = [fast.pack([{"input_ids": a, "labels": [0] * len(a)}, {"input_ids": b, "labels": [0] * 70}])
            for a, b in ((ids[0].tolist(), second), (changed[0].tolist(), second), (other[0].tolist(), second),
                         (ids[0].tolist(), second_changed))]
    base, chg, oth, own = traced(model, rows, autocast)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        alone = model(input_ids=torch.tensor([second], device=dev), use_cache=False).logits.float()
    res = {"variant": variant, "label": label, "autocast": autocast}
    s = slice(length, None)
    res["leak_changed"] = (chg["logits"][:, s] - base["logits"][:, s]).abs().max().item()
    res["leak_other"] = (oth["logits"][:, s] - base["logits"][:, s]).abs().max().item()
    res["vs_alone"] = (alone - base["logits"][:, s]).abs().max().item()
    res["own_first_token_change_last10"] = (own["logits"][:, -10:] - base["logits"][:, -10:]).abs().max().item()
    res["logit_scale"] = base["logits"][:, s].abs().max().item()
    first = None
    parts = {}
    for k in base:
        if k == "logits":
            continue
        d = (oth[k][:, s] - base[k][:, s]).abs().max().item()
        sc = base[k][:, s].abs().max().item()
        parts[k] = (d, sc)
        if first is None and d > 0:
            first = k
    res["first_differing"] = first
    res["parts"] = {k: f"{d:.2e}/{sc:.1e}" for k, (d, sc) in parts.items()}
    # position profile of the leak in the first differing part (which positions of the second example)
    if first:
        d = (oth[first][0, s] - base[first][0, s]).abs().amax(-1)
        res["first_part_leak_by_pos"] = [f"{x:.1e}" for x in d[:12].tolist()] + ["..."] + [f"{x:.1e}" for x in d[-4:].tolist()]
    print(json.dumps(res), flush=True)
    return res


def rebind(gdn_reference=False, torch_conv=False, torch_norm=False):
    kernels.restore()
    os.environ.pop("HYBRIDLORA_TORCH_CONV", None); os.environ.pop("HYBRIDLORA_TORCH_NORM", None)
    if torch_conv:
        os.environ["HYBRIDLORA_TORCH_CONV"] = "1"
    if torch_norm:
        os.environ["HYBRIDLORA_TORCH_NORM"] = "1"
    bound = fast.use("fast")
    if gdn_reference:
        m = importlib.import_module(MOD)
        orig = kernels._state["originals"][(MOD, "torch_chunk_gated_delta_rule")]
        m.torch_chunk_gated_delta_rule = kernels._boundary_aware_reference("fla.chunk_gated_delta_rule", orig)
    m = importlib.import_module(MOD)
    print("bound:", {k: getattr(getattr(m, k), "__hybridlora_kernel__", getattr(m, k).__name__) for k in
                     ("torch_chunk_gated_delta_rule", "causal_conv1d_fn")}, flush=True)


t0 = time.time()
print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(), flush=True)
rebind()
for v in ("sequential", "parallel"):
    check(v, "default")
check("parallel", "default", autocast=True)
check("sequential", "default", autocast=True)
rebind(gdn_reference=True)
check("parallel", "gdn torch reference")
rebind(torch_conv=True)
check("parallel", "torch conv")
rebind(torch_norm=True)
check("parallel", "torch norms")
rebind(gdn_reference=True, torch_conv=True, torch_norm=True)
check("parallel", "all torch")
print(f"diag done in {time.time() - t0:.0f} s", flush=True)
