"""Shared test fixtures.

Real data lives beside the checkout in ../shared/data (CI has it too). Tests read it from
there; nothing from it is ever copied into the repository.
"""
from __future__ import annotations

import os
from pathlib import Path

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
