"""Importing mamba-ssm's Triton SSD ops when its CUDA extensions were not built.

``pip install mamba-ssm`` with ``MAMBA_SKIP_CUDA_BUILD=TRUE`` (no compiler, or no time to compile) installs the
Python and Triton sources but not ``selective_scan_cuda``, the compiled Mamba-1 selective scan. The package's
``__init__`` imports that extension unconditionally (through ``ops.selective_scan_interface``), so ``import
mamba_ssm`` fails and with it every ``mamba_ssm.ops.triton.*`` module, although the Mamba-2 (SSD) Triton ops
never touch the extension.

:func:`import_mamba_triton_ops` imports the two Triton ops hybridlora needs and says how it managed:

1. ``"plain"``: ``import mamba_ssm`` works as installed (a full CUDA build);
2. ``"extension stand-in"``: a placeholder module named ``selective_scan_cuda`` is registered in
   ``sys.modules`` first. Importing it succeeds; *using* any of its functions raises
   :class:`MissingExtensionError`, so Mamba-1 code fails loudly at the call, never silently;
3. ``"package without __init__"``: if ``mamba_ssm/__init__`` still fails (another optional import), a bare
   package object with the installed ``__path__`` is registered and only the Triton submodules are imported.

Nothing is patched inside mamba-ssm; the stand-in is only installed when the real extension is not importable.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

EXTENSION = "selective_scan_cuda"
TRITON_MODULES = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update")


class MissingExtensionError(RuntimeError):
    """A function of a CUDA extension that was not built was called."""


class _MissingExtension(types.ModuleType):
    """Importable placeholder for an absent compiled extension: any non-dunder attribute raises on use."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(name)
        self.__dict__["_why"] = why
        self.__dict__["__hybridlora_stand_in__"] = True

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        raise MissingExtensionError(f"{self.__name__}.{attr} is unavailable: {self.__dict__['_why']}")


def install_extension_stand_in(name: str = EXTENSION, why: str | None = None) -> bool:
    """Register a raising placeholder for ``name`` unless the real module is importable. True if installed."""
    existing = sys.modules.get(name)
    if existing is not None:
        return bool(getattr(existing, "__hybridlora_stand_in__", False))
    if importlib.util.find_spec(name) is not None:
        return False
    why = why or ("mamba-ssm was installed without its CUDA extensions (MAMBA_SKIP_CUDA_BUILD); the Mamba-1 "
                  "selective scan needs them. Mamba-2 (SSD) Triton kernels do not.")
    sys.modules[name] = _MissingExtension(name, why)
    return True


def _bare_package(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__package__ = name
    pkg.__hybridlora_bare__ = True
    try:
        from importlib.metadata import version

        pkg.__version__ = version(name.replace("_", "-"))
    except Exception:  # metadata missing: leave the version out
        pass
    sys.modules[name] = pkg
    return pkg


def _forget(prefix: str) -> None:
    for key in [k for k in sys.modules if k == prefix or k.startswith(prefix + ".")]:
        del sys.modules[key]


def import_mamba_triton_ops() -> tuple[dict[str, Any], str]:
    """``({"mamba_chunk_scan_combined": fn, "selective_state_update": fn}, how)``; raises ImportError with
    every attempt's reason when mamba-ssm or Triton is missing."""
    errors = []
    for how in ("plain", "extension stand-in", "package without __init__"):
        try:
            if how == "extension stand-in":
                _forget("mamba_ssm")
                install_extension_stand_in()
                importlib.import_module("mamba_ssm")
            elif how == "package without __init__":
                _forget("mamba_ssm")
                _bare_package("mamba_ssm")
            else:
                importlib.import_module("mamba_ssm")
            ssd = importlib.import_module(TRITON_MODULES[0])
            ssu = importlib.import_module(TRITON_MODULES[1])
            return {"mamba_chunk_scan_combined": ssd.mamba_chunk_scan_combined,
                    "selective_state_update": ssu.selective_state_update}, how
        except Exception as exc:  # record and try the next way
            errors.append(f"{how}: {type(exc).__name__}: {exc}")
            if importlib.util.find_spec("mamba_ssm") is None:
                break
    _forget("mamba_ssm")
    raise ImportError("mamba-ssm Triton ops not importable (" + "; ".join(errors) + ")")
