"""Which fast kernels exist here, binding them into transformers' hybrid models, and loud warnings.

transformers' modeling code for Qwen3.5 and Falcon-H1 calls module-level kernel functions (for example
``torch_chunk_gated_delta_rule`` or ``mamba2_chunk_scan``). When fla / mamba-ssm were importable at the time the
modeling module was imported, transformers itself binds them; otherwise it keeps the pure-PyTorch references.
That decision is silent and order-dependent (mamba-ssm without its CUDA extension is never importable).
:func:`use` makes it explicit: it rebinds those module attributes either to the adapters in
:mod:`hybridlora.fast.ops` (mode ``"fast"``) or to the unwrapped PyTorch references (mode ``"reference"``, the
path the published study ran), and remembers what it bound. The models need not be rebuilt: their forward
looks the functions up at call time.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import warnings
from functools import lru_cache
from typing import Any, Callable

import torch

from . import ops
from .state import STATE, causal_lm, use_ce_kernel

logger = logging.getLogger("hybridlora.fast")

KERNEL_PURPOSE = {
    "fla.chunk_gated_delta_rule": "Gated DeltaNet training / prefill (chunked)",
    "fla.fused_recurrent_gated_delta_rule": "Gated DeltaNet one-token decode",
    "mamba_ssm.mamba_chunk_scan_combined": "Mamba-2 SSD training / prefill (chunked)",
    "mamba_ssm.selective_state_update": "Mamba-2 one-token decode",
    "fla.causal_conv1d": "short convolution, training / prefill (channel-last Triton)",
    "fla.causal_conv1d_update": "short convolution, one-token decode (opt-in: $HYBRIDLORA_FLA_CONV_UPDATE=1)",
    "fla.rms_norm": "RMSNorm, fused (Qwen3.5's 1 + w form)",
    "fla.rms_norm_gated": "gated RMSNorm of the Gated DeltaNet output, fused",
}
_GDN_BINDINGS = {
    "torch_chunk_gated_delta_rule": "fla.chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule": "fla.fused_recurrent_gated_delta_rule",
    "causal_conv1d_fn": "conv",
    "causal_conv1d_update": "fla.causal_conv1d_update",
}
# Bound only when asked for ($HYBRIDLORA_FLA_CONV_UPDATE=1) until the GPU has measured it against transformers'
# PyTorch fallback; otherwise transformers keeps its own choice (causal-conv1d where installed)
CONV_UPDATE_ENV = "HYBRIDLORA_FLA_CONV_UPDATE"
OPT_IN = {"fla.causal_conv1d_update": CONV_UPDATE_ENV}
# modeling module -> {attribute: kernel key}; "Class.method" binds a method of a modeling class
BINDINGS = {
    "transformers.models.qwen3_5.modeling_qwen3_5": {
        **_GDN_BINDINGS,
        "Qwen3_5RMSNorm.forward": "fla.rms_norm",
        "Qwen3_5RMSNormGated.forward": "fla.rms_norm_gated",
    },
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe": {
        **_GDN_BINDINGS,
        "Qwen3_5MoeRMSNorm.forward": "fla.rms_norm",
        "Qwen3_5MoeRMSNormGated.forward": "fla.rms_norm_gated",
    },
    "transformers.models.falcon_h1.modeling_falcon_h1": {
        "mamba2_chunk_scan": "mamba_ssm.mamba_chunk_scan_combined",
        "mamba2_selective_state_update": "mamba_ssm.selective_state_update",
        "mamba2_split_conv1d_scan_combined": "unfused",
        "causal_conv1d_fn": "conv",
        "causal_conv1d_update": "fla.causal_conv1d_update",
    },
}
REFERENCE = "reference (no CUDA)"
# The newest transformers whose modeling code the GPU tests ran these bindings against. A newer one may call the
# bound functions differently (5.25 moved the short convolution behind causal_conv1d_forward and routes CPU
# tensors itself), so binding on it is said out loud until the GPU tests have run there.
GPU_VERIFIED_TRANSFORMERS = "5.24"

_state = STATE  # one dict shared with .loss through .state (tests and benches read kernels._state)


def _cuda() -> bool:
    return torch.cuda.is_available()


@lru_cache(maxsize=1)
def _probe() -> dict[str, dict[str, Any]]:
    """Import every fast kernel once; {key: {"fn": callable|None, "reason": str}}."""
    found: dict[str, dict[str, Any]] = {}
    try:
        importlib.import_module("triton")
        triton_error = None
    except Exception as exc:
        triton_error = f"triton not importable ({exc})"
    for key, (module, name) in {
        "fla.chunk_gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
        "fla.fused_recurrent_gated_delta_rule": ("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule"),
        "fla.causal_conv1d": ("fla.modules.causal_conv1d", "causal_conv1d"),
        "fla.causal_conv1d_update": ("fla.modules.causal_conv1d", "causal_conv1d_update"),
        "fla.rms_norm": ("fla.modules.norm.layernorm", "rms_norm"),
        "fla.rms_norm_gated": ("fla.modules.norm.fused_norm_gate", "rms_norm_gated"),
    }.items():
        try:
            fn = getattr(importlib.import_module(module), name)
            found[key] = {"fn": fn, "reason": f"{module}.{name}"}
        except Exception as exc:
            found[key] = {"fn": None, "reason": triton_error or
                          f"flash-linear-attention not importable ({type(exc).__name__}: {exc})"}
    try:
        from .shim import import_mamba_triton_ops

        fns, how = import_mamba_triton_ops()
        for name, fn in fns.items():
            found[f"mamba_ssm.{name}"] = {"fn": fn, "reason": f"mamba_ssm Triton op (import: {how})"}
    except Exception as exc:
        for name in ("mamba_chunk_scan_combined", "selective_state_update"):
            found[f"mamba_ssm.{name}"] = {"fn": None, "reason": triton_error or str(exc)}
    return found


def _gdn_backward_blocked(key_head_dim: int | None = None) -> str | None:
    """Why fla's GDN backward would refuse on this GPU (fla #640), or None when it runs."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception:
        return None
    if not (getattr(chunk_o, "IS_NVIDIA_HOPPER", False) and getattr(chunk_o, "TRITON_ABOVE_3_4_0", False)
            and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True)):
        return None
    try:
        importlib.import_module("fla.backends").TileLangBackend
        importlib.import_module("tilelang")
        return None  # fla dispatches the affected kernel to tilelang
    except Exception:
        pass
    narrowed = getattr(importlib.import_module("fla.ops.gated_delta_rule.chunk").chunk_bwd_dqkwg,
                       "__hybridlora_narrowed__", False)
    if narrowed and (key_head_dim is None or key_head_dim > 64):
        return None
    return ("fla refuses the gated backward on Hopper with Triton in [3.4, 3.7.1) (fla #640)"
            + ("" if narrowed else "; call hybridlora.fast.use('fast', lift_fla_hopper_guard=True) to lift it for key head dim > 64")
            + "; or install triton>=3.7.1 or tilelang")


def active_kernels() -> dict[str, Any]:
    """What runs here: ``{"device", "mode", "bound", "kernels": {key: {"usable", "reason", "purpose"}}, "notes"}``.

    ``mode`` is ``"reference (no CUDA)"`` without a GPU (nothing is imported then), else the mode last set
    by :func:`use` (``None``: transformers' own import-time choice, not managed by hybridlora)."""
    if not _cuda():
        return {"device": "cpu", "mode": REFERENCE, "bound": {},
                "kernels": {k: {"usable": False, "reason": "no CUDA", "purpose": p} for k, p in KERNEL_PURPOSE.items()},
                "notes": []}
    probe = _probe()
    kernels = {}
    for key, purpose in KERNEL_PURPOSE.items():
        entry = probe.get(key, {"fn": None, "reason": "unknown kernel"})
        usable, reason = entry["fn"] is not None, entry["reason"]
        if usable and key == "fla.chunk_gated_delta_rule":
            blocked = _gdn_backward_blocked()
            if blocked:
                reason += f" (forward only: {blocked})"
        kernels[key] = {"usable": usable, "reason": reason, "purpose": purpose}
    return {"device": torch.cuda.get_device_name(), "mode": _state["mode"], "bound": dict(_state["bound"]),
            "kernels": kernels, "notes": list(_state["notes"])}


def _fla_conv_kernels() -> tuple[Callable, Callable] | None:
    """fla's conv forward and backward functions (below its autograd wrapper), for the in-place packed-row
    correction; None where this fla lays them out differently (the bound kernel's name then says so), or with
    $HYBRIDLORA_CONV_AUTOGRAD_CORRECTION=1 (side-by-side timing: the correction as autograd ops)."""
    if os.environ.get("HYBRIDLORA_CONV_AUTOGRAD_CORRECTION") == "1":
        return None
    try:
        from fla.modules.causal_conv1d import ops as conv_ops

        return conv_ops.causal_conv1d_fwd, conv_ops.causal_conv1d_bwd
    except Exception:
        return None


# On by default since its GPU tests passed on the H200 (2026-12-05: bitwise against fla's own call at 16/16 and
# 16/32 heads; Qwen3.5's decode step 10.97 -> 8.69 ms at 256 rows, identical tokens); =0 keeps fla's own call
STATE_IN_PLACE_ENV = "HYBRIDLORA_GDN_STATE_IN_PLACE"
_STEP_KERNEL_ARGS = {"q", "k", "v", "g", "gk", "gv", "beta", "A_log", "dt_bias", "o", "h0", "ht", "cu_seqlens",
                     "scale", "T", "H", "HV", "K", "V", "BK", "BV", "IS_BETA_HEADWISE", "USE_QK_L2NORM_IN_KERNEL",
                     "APPLY_BETA_SIGMOID", "ALLOW_NEG_EIGVAL", "STATE_V_FIRST"}


def _fla_recurrent_kernel() -> Any:
    from fla.ops.gated_delta_rule import fused_recurrent

    return fused_recurrent.fused_recurrent_gated_delta_rule_fwd_kernel


def _gdn_step_in_place() -> Callable | None:
    """The in-place decode step on fla's fused recurrent kernel (:func:`ops.make_gdn_step_in_place`); None where
    this fla's kernel takes other arguments than the launch passes (an fla whose kernel changed keeps fla's own
    call, and the cache's copy of the state, rather than launching it wrongly)."""
    try:
        kernel = _fla_recurrent_kernel()
        names = set(getattr(getattr(kernel, "fn", kernel), "arg_names", ()))
    except Exception:
        return None
    if not names or not _STEP_KERNEL_ARGS <= names:
        return None
    return ops.make_gdn_step_in_place(kernel)


def _implementation(key: str, original: Callable | None = None) -> Callable | None:
    if key == "conv":  # fla's Triton kernel where it imports, else PyTorch's conv1d; both packing-aware
        # $HYBRIDLORA_TORCH_CONV=1 keeps PyTorch's conv1d (side-by-side timing and checks)
        fn = None if os.environ.get("HYBRIDLORA_TORCH_CONV") == "1" else _probe().get("fla.causal_conv1d", {}).get("fn")
        return ops.make_conv(fn, fwd_bwd=_fla_conv_kernels()) if fn is not None else ops.causal_conv1d
    if key == "unfused":
        return ops.unfused_split_conv1d_scan
    fn = _probe().get(key, {}).get("fn")
    if fn is None:
        return None
    if key in ("fla.rms_norm", "fla.rms_norm_gated"):  # methods: the original still serves CPU tensors
        if os.environ.get("HYBRIDLORA_TORCH_NORM") == "1":  # side-by-side timing and checks
            return None
        return (ops.make_rms_norm if key == "fla.rms_norm" else ops.make_rms_norm_gated)(fn, inspect.unwrap(original))
    if key == "fla.causal_conv1d_update":
        return ops.make_conv_update(fn, inspect.unwrap(original))
    if key == "fla.fused_recurrent_gated_delta_rule":
        in_place = _gdn_step_in_place() if os.environ.get(STATE_IN_PLACE_ENV, "1") != "0" else None
        return ops.make_gdn_recurrent(fn, in_place)
    makers = {"fla.chunk_gated_delta_rule": ops.make_gdn_chunk,
              "mamba_ssm.mamba_chunk_scan_combined": ops.make_ssd_chunk,
              "mamba_ssm.selective_state_update": ops.make_ssd_step}
    return makers[key](fn)


def _opaque_to_dynamo(fn: Callable) -> Callable:
    """``fn`` as a call torch.compile does not trace into (a graph break): Triton kernels with autotuning and
    the references' host loops stay as they are inside compiled layers (:mod:`.compile`)."""
    if getattr(fn, "_hybridlora_opaque", False):
        return fn
    wrapped = torch.compiler.disable(fn)
    wrapped._hybridlora_opaque = True
    return wrapped


def _boundary_aware_reference(key: str, original: Callable) -> Callable | None:
    """transformers' pure-PyTorch function wrapped so that packed rows keep their examples apart (used where no
    fast kernel runs); None where the plain reference is used as is (decode steps take no packed rows)."""
    reference = inspect.unwrap(original)
    if key == "fla.chunk_gated_delta_rule":
        return ops.make_gdn_chunk(reference, name="torch reference (packing-aware)")
    if key == "mamba_ssm.mamba_chunk_scan_combined":
        return ops.make_segmented_ssd(reference)
    if key == "conv":
        return ops.causal_conv1d
    return None


LIFT_GUARD_ENV = "HYBRIDLORA_LIFT_FLA_HOPPER_GUARD"


def _route_refused_backward_to_reference(kernel: Callable, reference: Callable, narrowed: bool) -> Callable:
    """``kernel`` for every call whose backward fla accepts -- every forward-only call (evaluation, ablation,
    decoding) included, since fla #640 concerns the backward alone; the packing-aware torch reference for calls
    that need a gradient through key heads whose backward fla refuses on Hopper (all of them, or with the guard
    narrowed only dims <= 64): a kernel that refuses mid-training is worse than a slow one. Said once per
    process per head dim, loudly: such a model trains on the slow path."""
    refusal_by_head_dim: dict[int, str | None] = {}  # the check imports modules: once per binding, not per call

    @functools.wraps(kernel)
    def gdn_chunk(query, key, value, g, beta, *args, **kwargs):
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, g, beta))
        if needs_grad and key.shape[-1] not in refusal_by_head_dim:
            refusal_by_head_dim[key.shape[-1]] = _gdn_backward_blocked(key.shape[-1])
        refused = refusal_by_head_dim[key.shape[-1]] if needs_grad else None
        if refused:
            msg = (f"hybridlora.fast: Gated DeltaNet with key head dim {key.shape[-1]} trains on the slow torch "
                   f"reference here: {refused}"
                   + ("" if narrowed else f"; or set {LIFT_GUARD_ENV}=1 to narrow the guard (docs/PERFORMANCE.md)"))
            if msg not in _state.setdefault("warned", set()):
                _state["warned"].add(msg)
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return reference(query, key, value, g, beta, *args, **kwargs)
        return kernel(query, key, value, g, beta, *args, **kwargs)
    what = ("torch reference for trained key heads <= 64, fla #640" if narrowed
            else "forward only; trained calls take the torch reference, fla #640")
    gdn_chunk.__hybridlora_kernel__ = (getattr(kernel, "__hybridlora_kernel__", "fla.chunk_gated_delta_rule")
                                       + f" ({what})")
    gdn_chunk.__hybridlora_boundaries__ = True
    return gdn_chunk


def use(mode: str = "fast", *, lift_fla_hopper_guard: bool | None = None) -> dict[str, str]:
    """Bind mode ``"fast"`` (kernels where usable, references elsewhere) or ``"reference"`` (transformers'
    pure-PyTorch functions everywhere) into every importable studied modeling module. Returns
    ``{"module.attribute": what is bound}``. On a machine without CUDA ``"fast"`` binds the references.

    fla's Hopper guard (fla #640) stays in force unless ``lift_fla_hopper_guard`` (or $HYBRIDLORA_LIFT_FLA_HOPPER_GUARD=1)
    asks to keep it only for key head dims <= 64 — an opt-in based on the public diagnosis and our own gradient checks
    (docs/PERFORMANCE.md), not on fla's word. While the guard blocks the GDN backward, forward-only calls still run
    fla's chunked kernel and calls that need its gradient take the torch reference, loudly (a kernel that refuses
    mid-training is worse than a slow one)."""
    if mode not in ("fast", "reference"):
        raise ValueError("mode must be 'fast' or 'reference'")
    fast = mode == "fast" and _cuda()
    if lift_fla_hopper_guard is None:
        lift_fla_hopper_guard = os.environ.get(LIFT_GUARD_ENV) == "1"
    if fast and lift_fla_hopper_guard:
        note = ops.narrow_fla_hopper_guard()
        if note and note not in _state["notes"]:
            _state["notes"].append(note)
    if fast:
        _note_unverified_transformers()
    bound: dict[str, str] = {}
    for module_name, attrs in BINDINGS.items():
        try:
            module = importlib.import_module(module_name)
        except Exception:
            continue  # this transformers has no such model
        for attr, key in attrs.items():
            owner, name = _owner(module, attr)
            if owner is None or not hasattr(owner, name):
                continue
            original = _state["originals"].setdefault((module_name, attr), getattr(owner, name))
            asked = key not in OPT_IN or os.environ.get(OPT_IN[key]) == "1"
            impl = _implementation(key, original) if fast and asked else None
            if key in OPT_IN and impl is None:  # not asked for, or no kernel here: transformers' own choice
                setattr(owner, name, original)  # (undoes an earlier use() that bound it)
                continue
            if impl is not None and key == "fla.chunk_gated_delta_rule" and _gdn_backward_blocked(64):
                # fla #640 refuses the backward for some head dims (all, unless the guard is narrowed): forward-only
                # calls keep fla's kernel, calls that need a gradient there take the reference
                impl = _route_refused_backward_to_reference(impl, _boundary_aware_reference(key, original),
                                                            narrowed=_gdn_backward_blocked() is None)
            if impl is None and mode == "fast":
                impl = _boundary_aware_reference(key, original)
                what = getattr(impl, "__hybridlora_kernel__", "")
            if impl is None:
                impl = inspect.unwrap(original)  # transformers' pure-PyTorch function
                what = "torch reference"
            else:
                what = getattr(impl, "__hybridlora_kernel__", key)
                if fast and "." not in attr:  # a CUDA kernel: models on the CPU keep the path they get without CUDA
                    impl = _device_dispatch(impl, _boundary_aware_reference(key, original) or _torch_path(original))
            # in fast mode kernels and host-looping references are opaque to torch.compile, while torch modules'
            # own methods stay traceable (inductor fuses a torch RMSNorm); reference mode binds functions as is
            traceable = mode != "fast" or ("." in attr and what == "torch reference")
            setattr(owner, name, impl if traceable else _opaque_to_dynamo(impl))
            bound[f"{module_name.rsplit('.', 1)[-1]}.{attr}"] = what
    for module_name in BINDINGS:  # the kernel functions use() leaves alone (e.g. causal_conv1d_update)
        guard_cpu_path(module_name)
    _state["mode"], _state["bound"] = mode if _cuda() else REFERENCE, bound
    return bound


def _note_unverified_transformers() -> None:
    """Warn once (and keep a note for :func:`describe`) when transformers is newer than the GPU tests ran."""
    import transformers
    from packaging.version import Version

    found = Version(transformers.__version__)
    if (found.major, found.minor) <= Version(GPU_VERIFIED_TRANSFORMERS).release[:2]:
        return
    note = (f"transformers {transformers.__version__} is newer than the {GPU_VERIFIED_TRANSFORMERS} the GPU tests "
            f"ran the fast kernels on; pip install 'transformers>={GPU_VERIFIED_TRANSFORMERS},"
            f"<{_next_minor(GPU_VERIFIED_TRANSFORMERS)}' for the verified path")
    if note not in _state["notes"]:
        _state["notes"].append(note)
        logger.warning(note)


def _next_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}"


def _module_boundary_aware(module_name: str, attrs: dict[str, str]) -> bool:
    """Whether every training-path function bound in ``module_name`` keeps packed examples apart."""
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return False
    needed = [a for a, key in attrs.items() if key in ("conv", "fla.chunk_gated_delta_rule",
                                                         "mamba_ssm.mamba_chunk_scan_combined")]
    return bool(needed) and all(getattr(getattr(module, a, None), "__hybridlora_boundaries__", False)
                                for a in needed if hasattr(module, a))


def _model_modules(model: Any) -> list[str]:
    """The modeling modules (keys of :data:`BINDINGS`) whose functions ``model``'s mixers call, PEFT wrapper or
    not: the model's own module, or, for a model built from several transformers models' mixers (the lab), the
    modules its ``mixer_modules()`` names."""
    lm = causal_lm(model)
    own = getattr(lm, "mixer_modules", None)
    return sorted(own()) if callable(own) else [type(lm).__module__]


def host_read_boundaries(model: Any) -> list[str]:
    """Functions bound now for ``model``'s mixers that read packed-row boundaries on the host (a per-example loop:
    correct, but no CUDA graph can hold it), as ``module.attribute`` names."""
    found = []
    for module_name in _model_modules(model):
        if module_name not in BINDINGS:
            continue
        module = importlib.import_module(module_name)
        found += [f"{module_name.rsplit('.', 1)[-1]}.{attr}" for attr in BINDINGS[module_name]
                  if getattr(getattr(module, attr, None), "__hybridlora_host_boundaries__", False)]
    return found


def boundary_aware(model: Any) -> bool:
    """Whether the functions bound now keep the examples of a packed row apart in ``model``'s mixers."""
    names = _model_modules(model)
    return bool(names) and all(n in BINDINGS and _module_boundary_aware(n, BINDINGS[n]) for n in names)


def _owner(module: Any, attr: str) -> tuple[Any, str]:
    """Where ``attr`` lives: the module itself, or for ``"Class.method"`` the class (None if absent)."""
    if "." in attr:
        cls, name = attr.split(".", 1)
        return getattr(module, cls, None), name
    return module, attr


def restore() -> None:
    """Put back whatever transformers had bound before the first :func:`use` (CPU tensors still take the torch
    path: see :func:`guard_cpu_path`)."""
    for (module_name, attr), original in _state["originals"].items():
        owner, name = _owner(importlib.import_module(module_name), attr)
        setattr(owner, name, original)
    _state["mode"], _state["bound"] = None, {}
    for module_name in BINDINGS:
        guard_cpu_path(module_name)


# --- models on the CPU of a GPU machine --------------------------------------------------------------
# transformers decides at import time of a modeling module which function each of these names calls: the
# package's kernel (fla, mamba-ssm, causal-conv1d) when it imports, else the torch reference — one choice for
# every model in the process, whatever device the model is on. A Triton kernel handed CPU tensors crashes
# ("Pointer argument cannot be accessed from Triton (cpu tensor?)"), so CPU tensors must take the torch path.
# transformers >= 5.25 routes CPU tensors to its torch path itself; the guard keeps older versions safe and
# keeps the packed-row refusal the same on every version.
KERNEL_FUNCTIONS = (
    "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",            # Gated DeltaNet (fla)
    "chunk_kimi_delta_attention", "recurrent_kimi_delta_attention",                # KDA (fla)
    "mamba2_chunk_scan", "mamba2_selective_state_update", "mamba2_split_conv1d_scan_combined",  # mamba-ssm
    "mamba_inner_fn", "mamba_selective_scan", "mamba_selective_state_update",
    "causal_conv1d_fn", "causal_conv1d_update",                                    # causal-conv1d
)
_PACKING_KWARGS = ("cu_seqlens", "seq_idx")


def _on_cuda(args: tuple, kwargs: dict) -> bool:
    """Whether a call's first tensor argument lives on CUDA (no tensor: the kernel decides)."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return first is None or first.is_cuda


def _device_dispatch(cuda_impl: Callable, other_impl: Callable) -> Callable:
    """``cuda_impl`` for calls on CUDA tensors, ``other_impl`` for any other device."""
    @functools.wraps(cuda_impl)  # keeps the __hybridlora_* facts of the CUDA binding (the CUDA-graph decisions)
    def dispatch(*args, **kwargs):
        return (cuda_impl if _on_cuda(args, kwargs) else other_impl)(*args, **kwargs)

    dispatch.__hybridlora_cpu_path__ = other_impl
    return dispatch


def _torch_path(bound: Callable) -> Callable:
    """transformers' pure-PyTorch function under ``bound``, called as transformers calls it when the package is
    missing: refusing packed rows (the reference would silently mix their examples) instead of ignoring them."""
    reference = inspect.unwrap(bound)
    name = getattr(reference, "__name__", "kernel function")

    @functools.wraps(reference)
    def torch_path(*args, **kwargs):
        if any(kwargs.get(k) is not None for k in _PACKING_KWARGS):
            raise ValueError(f"{name}: the torch reference cannot keep packed sequences apart; call "
                             "hybridlora.fast.use('fast') first (it binds packing-aware references)")
        kwargs = {k: v for k, v in kwargs.items() if k not in _PACKING_KWARGS}
        return reference(*args, **kwargs)

    return torch_path


def guard_cpu_path(module_or_model: Any) -> list[str]:
    """Make calls on CPU tensors take the torch path in a modeling module (given by name, or a model of it,
    PEFT-wrapped or not), whatever transformers bound there at import time. Idempotent; the CUDA path is
    unchanged. Returns the ``module.function`` names guarded now."""
    if not isinstance(module_or_model, str):  # every modeling module the model's mixers call (the lab borrows several)
        return [g for name in _model_modules(module_or_model) for g in guard_cpu_path(name)]
    module_name = module_or_model
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return []  # this transformers has no such model
    guarded = []
    for name in KERNEL_FUNCTIONS:
        bound = getattr(module, name, None)
        if not callable(bound) or hasattr(bound, "__hybridlora_cpu_path__") or hasattr(bound, "__hybridlora_kernel__"):
            continue  # absent, guarded already, or bound by use() (which keeps CPU tensors on the torch path)
        if inspect.unwrap(bound) is bound:
            continue  # a plain function: no package kernel behind it
        guards = _state.setdefault("cpu_guards", {})  # one guard per function: restore() then use() keeps identity
        if bound not in guards:
            guards[bound] = _device_dispatch(bound, _torch_path(bound))
        setattr(module, name, guards[bound])
        guarded.append(f"{module_name.rsplit('.', 1)[-1]}.{name}")
    return guarded


def _model_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config


def required_kernels(model: Any) -> tuple[str, ...]:
    config = _model_config(model)
    from ..families import family_for  # the kernels a family needs are declared in its family file

    family = family_for(getattr(config, "model_type", None) or "")
    if family is None:
        return ()
    # a family whose models differ in their mixers (the lab) declares the kernels per config
    return family.fast_kernels(config) if callable(family.fast_kernels) else family.fast_kernels


def _device_type(model: Any) -> str | None:
    try:
        return next(model.parameters()).device.type
    except (StopIteration, AttributeError):
        return None


def missing_kernels(model: Any, *, training: bool = True) -> dict[str, str]:
    """{kernel: why} for the kernels this model needs that will not run (empty off CUDA: nothing is expected).
    ``training=False`` (evaluation, ablation: forward only) leaves out what only a backward pass needs."""
    if not _cuda() or _device_type(model) not in (None, "cuda"):
        return {}
    info = active_kernels()["kernels"]
    config = _model_config(model)
    missing = {}
    for key in required_kernels(model):
        entry = info[key]
        if not entry["usable"]:
            missing[key] = entry["reason"]
        elif key == "fla.chunk_gated_delta_rule" and training:
            blocked = _gdn_backward_blocked(getattr(config, "linear_key_head_dim", None))
            if blocked:
                missing[key + " (backward)"] = blocked
    if _state["mode"] == "reference":
        missing.update({k: "hybridlora.fast.use('reference') is in force" for k in required_kernels(model)
                        if k not in missing})
    elif _state["mode"] is None:
        missing.update({k: "not bound: call hybridlora.fast.use('fast') before running" for k in required_kernels(model)
                        if k not in missing})
    return missing


def warn_missing_kernels(model: Any, *, training: bool = True) -> dict[str, str]:
    """Loud warning (``RuntimeWarning`` and the ``hybridlora.fast`` logger) for every fast kernel ``model`` needs
    that will not run on this CUDA device (``training=False``: for a forward-only use). Silent on CPU. Returns
    {kernel: why}."""
    missing = missing_kernels(model, training=training)
    if missing:
        model_type = getattr(_model_config(model), "model_type", "?")
        lines = "\n".join(f"  - {k} ({KERNEL_PURPOSE.get(k.split(' ')[0], '')}): {why}" for k, why in missing.items())
        message = (f"\n{'!' * 78}\nhybridlora: {model_type} will run these parts of its mixers on slower PyTorch "
                   f"paths (correct; a missing scan kernel makes training 10-100x slower, a missing convolution "
                   f"kernel ~10 %):\n{lines}\nInstall the GPU extra (pip install 'hybridlora[gpu]') or "
                   f"see docs/PERFORMANCE.md.\n{'!' * 78}")
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return missing


def describe(model: Any = None, *, training: bool = True) -> str:
    """One line for run logs: the mode and, per needed kernel, on/off (``training=False``: for a forward-only
    use, where a kernel whose backward is refused still runs)."""
    info = active_kernels()
    if info["mode"] == REFERENCE:
        return f"kernels: {REFERENCE}"
    device = _device_type(model)
    if device not in (None, "cuda"):  # a CPU model on a GPU machine runs the torch path (guard_cpu_path)
        return f"kernels: reference (model on {device}, not CUDA)"
    keys = required_kernels(model) if model is not None else tuple(KERNEL_PURPOSE)
    missing = missing_kernels(model, training=training) if model is not None else {}
    switched_off = {k for k, var in (("fla.causal_conv1d", "HYBRIDLORA_TORCH_CONV"), ("fla.rms_norm", "HYBRIDLORA_TORCH_NORM"),
                                     ("fla.rms_norm_gated", "HYBRIDLORA_TORCH_NORM")) if os.environ.get(var) == "1"}
    parts = [f"{k}={'off' if any(m.startswith(k) for m in missing) or not info['kernels'][k]['usable'] or k in switched_off else 'on'}"
             for k in keys]
    conv_bound = next((v for v in info["bound"].values()
                       if v.startswith("fla.causal_conv1d") and not v.startswith("fla.causal_conv1d_update")), "")
    if conv_bound and "in place" not in conv_bound and "fla.causal_conv1d=on" in parts:
        parts.append("packed-row conv correction=autograd ops (slower: fla's conv internals not found or "
                     "HYBRIDLORA_CONV_AUTOGRAD_CORRECTION=1)")
    if "fla.causal_conv1d_update" in info["bound"].values():
        parts.append(f"fla.causal_conv1d_update=on (opt-in {CONV_UPDATE_ENV}=1)")
    if any(v.endswith("(decode state updated in place)") for v in info["bound"].values()):
        parts.append(f"Gated DeltaNet decode state in place=on ({STATE_IN_PLACE_ENV}=0 turns it off)")
    parts.append(f"triton cross-entropy={'on' if use_ce_kernel() else 'off'}")
    return f"kernels ({info['device']}, mode={info['mode']}): " + ", ".join(parts) + \
        (f"; notes: {'; '.join(info['notes'])}" if info["notes"] else "")
