"""Shared test fixtures.

Real data lives beside the checkout in ../shared/data (CI has it too). Tests read it from
there; nothing from it is ever copied into the repository.
"""
from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from intra-op threads, and on a 2-core CI machine the subprocess tests (concurrent
# runners, kill -9) oversubscribe the cores: torch's spinning worker threads then slow everything down ~10×.
# Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    path = Path(os.environ.get("HYBRIDLORA_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise RuntimeError(f"test data not found at {path}; set HYBRIDLORA_TEST_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


@pytest.fixture()
def fast_bindings():
    """``hybridlora.fast.use("fast")`` for one test (packing-aware references on CPU), undone afterwards."""
    from hybridlora import fast
    from hybridlora.fast import kernels

    fast.use("fast")
    yield
    kernels.restore()
