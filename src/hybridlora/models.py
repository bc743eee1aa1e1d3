"""Turning a MODEL argument into a transformers config and model.

MODEL may be a catalog name (``qwen3.5-0.8b``), a hub id (loaded when the hub is reachable, else the catalog
entry of the same id), a local model directory, or a path to a config.json. Inspecting and planning build the
model on the ``meta`` device: exact shapes and counts, no weights, no memory.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .families import Family, ensure_registered, family_for


class ModelError(ValueError):
    """A MODEL argument that cannot be resolved; the message says what to do."""


@dataclass
class ModelSource:
    spec: str  # what the user typed
    kind: str  # "catalog" | "hub" | "local" | "config"
    name: str  # display name: hub id where known
    config: Any  # transformers PretrainedConfig
    path: Path | None = None  # local directory holding weights, if any


@lru_cache(maxsize=1)
def catalog() -> dict[str, dict[str, Any]]:
    """All shipped catalog entries, keyed by their short name."""
    entries = {}
    for item in resources.files("hybridlora.catalog").iterdir():
        if item.name.endswith(".json"):
            entry = json.loads(item.read_text())
            entries[entry["name"]] = entry
    return entries


def _catalog_lookup(spec: str) -> dict[str, Any] | None:
    key = spec.lower()
    for entry in catalog().values():
        names = [entry["name"], entry.get("hub_id", ""), *entry.get("aliases", [])]
        if key in (n.lower() for n in names if n):
            return entry
    return None


def config_from_dict(data: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = copy.deepcopy(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ModelError("config has no model_type; pass a transformers config.json")
    ensure_registered(model_type)
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise ModelError(f"transformers does not know model_type {model_type!r} ({exc}); upgrade transformers") from exc


def text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) config."""
    sub = getattr(config, "text_config", None)
    return sub if sub is not None and getattr(sub, "model_type", None) else config


def resolve_model(spec: str) -> ModelSource:
    path = _builtin_dir(spec) or Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return ModelSource(spec, "config", spec, _config_from_file(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                _refuse_adapter_config(path / "adapter_config.json", _read_json(path / "adapter_config.json"))
            raise ModelError(f"{spec}: directory has no config.json; point MODEL at a transformers model directory")
        return ModelSource(spec, "local", spec, _config_from_file(path / "config.json"), path=path)
    entry = _catalog_lookup(spec)
    if "/" in spec:
        hub = _try_hub_config(spec)
        if hub is not None:
            return ModelSource(spec, "hub", spec, hub)
        if entry is not None:
            return _from_catalog(spec, entry)
        raise ModelError(f"{spec}: hub not reachable and no catalog entry with that id; {_suggest(spec)}")
    if entry is not None:
        return _from_catalog(spec, entry)
    raise ModelError(f"unknown model {spec!r}; {_suggest(spec)}")


def _builtin_dir(spec: str) -> Path | None:
    """``builtin:demo-sequential`` / ``builtin:demo-parallel``: the demo's shipped pretrained lab models."""
    from .builtin_models import builtin_model_dir

    try:
        path = builtin_model_dir(spec)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    if path is not None and not (path / "config.json").is_file():
        raise ModelError(f"{spec}: the shipped model is missing ({path}); rebuild it with "
                         f"`hybridlora lab demo-models --only {path.name}`")
    return path


def _from_catalog(spec: str, entry: dict[str, Any]) -> ModelSource:
    return ModelSource(spec, "catalog", entry.get("hub_id", entry["name"]), config_from_dict(entry["config"]))


def _config_from_file(path: Path) -> Any:
    """Read a config.json through its config class, which decodes what transformers encodes (e.g. infinities)."""
    from transformers import CONFIG_MAPPING

    data = _read_json(path)
    if "peft_type" in data:
        _refuse_adapter_config(path, data)
    model_type = data.get("model_type")
    ensure_registered(model_type)
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"{path}: model_type {model_type!r} unknown to this transformers; upgrade transformers")
    return CONFIG_MAPPING[model_type].from_json_file(str(path))


def _refuse_adapter_config(path: Path, data: dict[str, Any]) -> None:
    """A PEFT adapter is not a model: say so, and what to pass instead (not "upgrade transformers")."""
    base = data.get("base_model_name_or_path")
    instead = f"pass its base model ({base})" if base else "pass its base model"
    raise ModelError(f"{path} is a PEFT adapter config ({data.get('peft_type')}), not a model config; {instead} as "
                     "MODEL, and the adapter's directory to `hybridlora eval --adapter`")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 2.0) -> bool:
    """A quick probe, so that an offline machine falls back to the catalog at once instead of after
    transformers' long network retries. HF_HUB_OFFLINE=1 skips the probe."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _try_hub_config(hub_id: str) -> Any | None:
    from transformers import AutoConfig

    if not hub_reachable():
        return None
    try:
        return AutoConfig.from_pretrained(hub_id)
    except Exception:  # offline, gated, or no such repo: the caller falls back to the catalog
        return None


def _suggest(spec: str) -> str:
    names = sorted(catalog())
    close = difflib.get_close_matches(spec.lower(), names, n=3, cutoff=0.3)
    if close:
        return f"did you mean {', '.join(close)}? (`hybridlora catalog` lists all)"
    return "run `hybridlora catalog` for the offline names, or pass a local model directory"


def build_meta_model(config: Any) -> torch.nn.Module:
    """The exact full-size causal LM on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(text_config(config))


def tiny_config(config: Any, family: Family) -> Any:
    """A small same-family config: the real config with the family's size overrides applied."""
    if not family.tiny:
        raise ModelError(f"family {family.name} has no tiny config; liveness needs real weights (--load-weights)")
    data = text_config(config).to_dict()
    data.update(copy.deepcopy(family.tiny))
    for key in ("quantization_config", "auto_map", "_name_or_path", "architectures"):
        data.pop(key, None)
    return config_from_dict(_consistent(data))


def tiny_config_for(model_type: str, **overrides: Any) -> Any:
    """A small config of the family covering ``model_type``, from transformers' defaults (for tests/demos).

    A multimodal type (``qwen3_5``) yields the tiny config of its language model (``qwen3_5_text``): the size
    overrides are the text model's, and only the text model is ever built from it."""
    from transformers import AutoConfig

    family = family_for(model_type)
    if family is None:
        raise ModelError(f"no family entry for model_type {model_type!r}")
    ensure_registered(model_type)
    base = text_config(AutoConfig.for_model(model_type))
    data = base.to_dict()
    data.update(copy.deepcopy(family.tiny))
    data.update(overrides)
    return config_from_dict(_consistent(data))


_PER_LAYER_LISTS = ("layer_types", "layers_block_type", "mlp_layer_types")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _consistent(data: dict[str, Any]) -> dict[str, Any]:
    """Shrinking a config can leave per-layer lists or special-token ids out of range: cut them to fit."""
    n_layers, vocab = data.get("num_hidden_layers"), data.get("vocab_size")
    for key in _PER_LAYER_LISTS:
        value = data.get(key)
        if isinstance(value, list) and n_layers and len(value) != n_layers:
            data[key] = [value[i % len(value)] for i in range(n_layers)]
    for key in _TOKEN_IDS:
        value = data.get(key)
        if isinstance(value, int) and vocab and value >= vocab:
            data[key] = vocab - 1
    return data


def build_model(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised causal LM on the CPU (tiny configs only: this allocates real memory)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(text_config(config), dtype=dtype)
    return _cpu_safe(model).eval()


def _cpu_safe(model: torch.nn.Module) -> torch.nn.Module:
    """Calls on CPU tensors take the torch path even where fla / mamba-ssm import (a GPU machine): transformers
    binds their Triton kernels for every model of the process at import time (see fast.kernels.guard_cpu_path)."""
    from .fast.kernels import guard_cpu_path

    guard_cpu_path(model)
    return model


def load_pretrained(source: ModelSource, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    where = str(source.path) if source.path else source.name
    if not source.path:  # a hub download: its progress is worth showing
        return _cpu_safe(AutoModelForCausalLM.from_pretrained(where, dtype=dtype)).eval()
    with _no_loading_bar():  # a local folder loads in a blink; a study loads it once per cell
        return _cpu_safe(AutoModelForCausalLM.from_pretrained(where, dtype=dtype)).eval()


@contextlib.contextmanager
def _no_loading_bar():
    """transformers' "Loading weights" bar off for one local load (put back as it was): in a study or ablation
    it would print one bar per job between hybridlora's own progress lines."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
