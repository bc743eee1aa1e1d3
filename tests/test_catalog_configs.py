"""Offline architecture catalog: every entry builds its full-size causal LM on the meta device.

Loading convention (see src/hybridlora/catalog/README.md):
    cfg = transformers.AutoConfig.for_model(**entry["config"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
"""
from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from family_fixtures import REQUIRED_MODEL_TYPES as _REQUIRED  # noqa: E402

CATALOG_DIR = Path(__file__).resolve().parents[1] / "src" / "hybridlora" / "catalog"
CATALOG_FILES = sorted(CATALOG_DIR.glob("*.json"))
ALLOWED_KEYS = {"name", "hub_id", "aliases", "source", "expected_params", "config"}

# Families the catalog must cover (one real checkpoint each): the same list the family tests use.
REQUIRED_MODEL_TYPES = set(_REQUIRED)


def _load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _build_config(entry: dict) -> transformers.PreTrainedConfig:
    return transformers.AutoConfig.for_model(**entry["config"])


@lru_cache(maxsize=None)
def _built(path_str: str):
    """(config, model, n_params) for one catalog file; built once per test session."""
    entry = _load(Path(path_str))
    cfg = _build_config(entry)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    return cfg, model, n_params


def _ids(paths):
    return [p.stem for p in paths]


def test_catalog_is_not_empty():
    assert CATALOG_FILES, f"no catalog files in {CATALOG_DIR}"


def test_required_families_present():
    present = {_load(p)["config"]["model_type"] for p in CATALOG_FILES}
    assert REQUIRED_MODEL_TYPES <= present, f"missing: {sorted(REQUIRED_MODEL_TYPES - present)}"


def test_names_and_aliases_unique():
    seen: dict[str, str] = {}
    for path in CATALOG_FILES:
        entry = _load(path)
        for key in [entry["name"], *entry.get("aliases", [])]:
            assert key == key.lower(), f"{path.name}: name/alias {key!r} must be lowercase"
            assert key not in seen, f"{key!r} used by both {seen[key]} and {path.name}"
            seen[key] = path.name


@pytest.mark.parametrize("path", CATALOG_FILES, ids=_ids(CATALOG_FILES))
def test_entry_schema(path: Path):
    entry = _load(path)
    assert set(entry) <= ALLOWED_KEYS, f"unexpected keys {set(entry) - ALLOWED_KEYS}"
    assert entry["name"] == path.stem
    assert isinstance(entry["hub_id"], str) and "/" in entry["hub_id"]
    assert isinstance(entry["source"], str) and entry["source"].strip()
    assert isinstance(entry.get("aliases", []), list)
    if "expected_params" in entry:
        assert isinstance(entry["expected_params"], int) and entry["expected_params"] > 0
    config = entry["config"]
    assert isinstance(config, dict)
    assert config.get("model_type") in CONFIG_MAPPING, f"unknown model_type {config.get('model_type')!r}"
    assert "tie_word_embeddings" in config, "tie_word_embeddings must be explicit"
    for dropped in ("auto_map", "quantization_config", "quantization", "vision_config", "text_config"):
        assert dropped not in config, f"{dropped} must not be in a text-LM catalog config"


@pytest.mark.parametrize("path", CATALOG_FILES, ids=_ids(CATALOG_FILES))
def test_config_class_round_trips(path: Path):
    entry = _load(path)
    model_type = entry["config"]["model_type"]
    cfg = _build_config(entry)
    config_class = CONFIG_MAPPING[model_type]
    assert type(cfg) is config_class
    assert cfg.model_type == model_type

    as_dict = cfg.to_dict()
    again = config_class.from_dict(as_dict)
    assert again.to_dict() == as_dict

    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        reloaded = transformers.AutoConfig.from_pretrained(tmp)
    assert type(reloaded) is config_class
    reloaded_dict = reloaded.to_dict()
    reloaded_dict.pop("_name_or_path", None)
    as_dict.pop("_name_or_path", None)
    assert reloaded_dict == as_dict


@pytest.mark.parametrize("path", CATALOG_FILES, ids=_ids(CATALOG_FILES))
def test_builds_causal_lm_on_meta(path: Path):
    entry = _load(path)
    cfg, model, n_params = _built(str(path))
    assert type(model).__name__.endswith("ForCausalLM")
    assert n_params > 0
    assert all(p.device.type == "meta" for p in model.parameters())
    # The backbone has exactly the configured number of decoder layers.
    assert len(model.model.layers) == cfg.num_hidden_layers
    # Tying as declared: a tied lm_head shares the input-embedding Parameter.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == bool(entry["config"]["tie_word_embeddings"])
    assert model.get_input_embeddings().weight.shape[0] == entry["config"]["vocab_size"]


WITH_EXPECTED = [p for p in CATALOG_FILES if "expected_params" in _load(p)]


@pytest.mark.parametrize("path", WITH_EXPECTED, ids=_ids(WITH_EXPECTED))
def test_expected_parameter_total(path: Path):
    entry = _load(path)
    _, _, n_params = _built(str(path))
    assert n_params == entry["expected_params"]


def test_stated_totals_are_pinned():
    """The two totals stated in the project brief must stay pinned in the catalog."""
    by_name = {p.stem: _load(p) for p in CATALOG_FILES}
    assert by_name["qwen3.5-0.8b"]["expected_params"] == 752_393_024
    assert by_name["falcon-h1-0.5b"]["expected_params"] == 521_411_104
