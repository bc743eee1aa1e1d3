"""The `topology` study preset: lab model directories as study models, tags, per-model placements."""
from __future__ import annotations

import pytest

from hybridlora.lab import spec_from_dict
from hybridlora.lab.solve import build
from hybridlora.study.config import StudyConfigError, load_study_config, study_config_from_dict
from hybridlora.study.grid import expand_grid
from hybridlora.study.results import _model_tags

SIX = ["attention_only", "recurrent_only", "mlp_only", "attention_mlp", "recurrent_mlp", "all"]
BUDGET = "recurrent_only@budget_of_attention_only"


def _save_lab_model(path, mixers, topology):
    """A tiny random-init lab model directory (width 32: fast), as `lab pretrain` leaves under DIR/model."""
    spec = spec_from_dict(dict(name="t", vocab_size=300, depth=2, target_params=0, width=32, head_dim=16,
                               mixers=mixers, topology=topology, ratio="1:1" if topology == "sequential" else None))
    model, _ = build(spec, seed=0)
    model.save_pretrained(path)


def test_preset_parses_with_tags_seeds_and_the_made_by_commands():
    config = load_study_config("topology")
    assert len(config.seeds) >= 3
    tags = {m.label: (m.topology, m.mixer) for m in config.models}
    assert tags == {"gdn-sequential": ("sequential", "gdn"), "gdn-parallel": ("parallel", "gdn"),
                    "mamba2-sequential": ("sequential", "mamba2"), "mamba2-parallel": ("parallel", "mamba2"),
                    "all-attention": ("all_attention", "attention")}
    for m in config.models:  # every model directory names the command that makes it, writing to its parent
        assert m.made_by.startswith("hybridlora lab pretrain ") and m.model == m.made_by.split("--output ")[1] + "/model"


def test_missing_model_directory_names_the_lab_pretrain_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StudyConfigError, match="made by: hybridlora lab pretrain tiny-gdn --variant sequential"):
        expand_grid(load_study_config("topology"))


def test_grid_expands_on_tiny_lab_model_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for mixer in ("gdn", "mamba2"):
        for topology in ("sequential", "parallel"):
            _save_lab_model(tmp_path / f"lab/topology/{mixer}-{topology}/model", ["attention", mixer], topology)
    _save_lab_model(tmp_path / "lab/topology/all-attention/model", ["attention"], "sequential")
    config = load_study_config("topology")
    jobs = expand_grid(config)
    n_domains, n_seeds = len(config.domains), len(config.seeds)
    per_model = {}
    for job in jobs:
        if job.kind == "train":
            per_model.setdefault(job.model, set()).add(job.placement)
    for name in ("gdn-sequential", "gdn-parallel", "mamba2-sequential", "mamba2-parallel"):
        assert per_model[name] == set(SIX) | {BUDGET}
    assert per_model["all-attention"] == {"attention_only", "mlp_only", "attention_mlp", "all"}
    assert sum(j.kind == "base" for j in jobs) == 5
    assert sum(j.kind == "train" for j in jobs) == (4 * 7 + 4) * n_domains * n_seeds
    # the study's results carry the tags the report pairs models by
    assert _model_tags([config.model_dump(mode="json")])["mamba2-parallel"] == {"topology": "parallel",
                                                                               "mixer": "mamba2"}


def test_a_placement_a_model_does_not_take_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save_lab_model(tmp_path / "m", ["attention"], "sequential")
    config = study_config_from_dict({"name": "x", "models": [{"model": "m", "placements": ["recurrent_only"]}],
                                     "placements": ["attention_only"], "domains": ["gsm8k"]})
    with pytest.raises(StudyConfigError, match=r"placements \['recurrent_only'\] are not among"):
        expand_grid(config)


def test_synthetic_preset_pretrains_on_the_generated_mixture_and_expands_to_111_jobs(tmp_path, monkeypatch):
    config = load_study_config("topology-synthetic")
    assert {m.label: (m.topology, m.mixer) for m in config.models} == {
        "gdn-sequential": ("sequential", "gdn"), "gdn-parallel": ("parallel", "gdn"),
        "all-attention": ("all_attention", "attention")}
    for m in config.models:  # one spec, one corpus, one seed: the models differ only in wiring
        assert m.made_by.startswith("hybridlora lab pretrain gpu-30m-gdn ") and "--corpus synthetic" in m.made_by
        assert "--seed 0" in m.made_by and m.model == m.made_by.split("--output ")[1] + "/model"
    assert {d.name for d in config.domains} <= set(config.eval.benchmarks) and len(config.seeds) >= 3
    monkeypatch.chdir(tmp_path)
    for label, mixers, topology in (("gdn-sequential", ["attention", "gdn"], "sequential"),
                                    ("gdn-parallel", ["attention", "gdn"], "parallel"),
                                    ("all-attention", ["attention"], "sequential")):
        _save_lab_model(tmp_path / f"lab/topology-synthetic/{label}/model", mixers, topology)
    jobs = expand_grid(config)
    assert len(jobs) == 111 and sum(j.kind == "base" for j in jobs) == 3
