"""A study directory belongs to one study config.

Running a different config into an existing study directory used to replace its grid and ``study.yaml`` and
overwrite the first study's report with a mix of both grids. Now the first config that registers a directory owns
it; another config is refused unless the caller asks explicitly (``--add-cells``) to add its cells to the study,
in which case the directory's grid becomes the union and the added config is recorded beside the first.

The comparison ignores ``output`` (the same directory may be named by different relative paths) and ``backend`` and normalises
the stored config through the current validator, so defaults added by a newer hybridlora do not count as a change.
"""
from __future__ import annotations

from pathlib import Path

from .config import StudyConfig, StudyConfigError, study_config_from_dict
from .grid import Job
from .store import DB_NAME, Store

ADDED_KEY = "added_configs"  # meta key: configs whose cells were added with --add-cells, in order


# Fields that say where or how the jobs run, not what they compute: a study may be resumed on another backend.
NOT_IDENTITY = ("output", "backend")


def _identity(config_dump: dict) -> dict:
    """The part of a config dump that decides what the study computes (not where it is written or run)."""
    return {k: v for k, v in config_dump.items() if k not in NOT_IDENTITY}


def _normalised(stored: dict) -> dict | None:
    """A stored config as the current version would dump it; None when it no longer validates."""
    try:
        return study_config_from_dict(stored, "stored config").model_dump(mode="json")
    except StudyConfigError:
        return None


def differing_fields(stored: dict, config: StudyConfig) -> list[str]:
    """Top-level fields in which ``config`` differs from the stored one (empty: the same study)."""
    new = _identity(config.model_dump(mode="json"))
    old = _normalised(stored)
    if old is None:
        return ["(the stored config no longer validates)"]
    old = _identity(old)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def stored_configs(study_dir: Path) -> tuple[dict | None, list[dict]]:
    """(the owning config, the configs added to it) of an existing study directory; (None, []) if new."""
    if not (Path(study_dir) / DB_NAME).is_file():
        return None, []
    store = Store(study_dir, create=False)
    try:
        return store.get("config"), store.get(ADDED_KEY, []) or []
    finally:
        store.close()


def check_owner(study_dir: Path, config: StudyConfig, jobs: list[Job], *, add_cells: bool = False) -> bool:
    """Raise StudyConfigError if ``study_dir`` holds a study of another config and ``add_cells`` is off.

    Returns True when this config's cells are to be added to another config's study (``add_cells`` and a
    different owner), False when the directory is new or already this config's (or one added to it). Writes
    nothing: call it before anything is written into the directory.
    """
    owner, added = stored_configs(study_dir)
    if owner is None:
        return False
    if not differing_fields(owner, config) or any(not differing_fields(a, config) for a in added):
        return False
    if add_cells:
        _check_no_clash(study_dir, jobs)
        return True
    fields = differing_fields(owner, config)
    raise StudyConfigError(
        f"{study_dir} holds the study {owner.get('name', '?')!r} of another config (it differs in: "
        f"{', '.join(fields)}); run into a new directory (--output DIR), or pass --add-cells to add this "
        "config's cells to that study")


def _check_no_clash(study_dir: Path, jobs: list[Job]) -> None:
    """Added cells must not share a report identity (model, placement, domain, seed) with a cell of the study
    that computes something else (another eval set, say): the report could not tell them apart."""
    store = Store(study_dir, create=False)
    try:
        existing = {(j["model"], j["placement"], j["train_domain"], j["seed"]): j["id"] for j in store.jobs()}
    finally:
        store.close()
    for job in jobs:
        other = existing.get((job.model, job.placement, job.train_domain, job.seed))
        if other is not None and other != job.id:
            raise StudyConfigError(
                f"--add-cells: cell {job.label} is already in the study, computed otherwise (job {other}, not "
                f"{job.id}); give this config's models or domains distinct labels, or use a new directory")


def register_grid(study_dir: Path, jobs: list[Job], config: StudyConfig) -> None:
    """Record ``jobs`` as the directory's grid: this config's own grid, or the union of the current grid and
    ``jobs`` when this config's cells are added to another config's study (the owning config is kept, and this
    one recorded among the added configs)."""
    dump = config.model_dump(mode="json")
    store = Store(study_dir)
    try:
        owner = store.get("config")
        if owner is None or not differing_fields(owner, config):
            store.register(jobs, dump)
            return
        # cells added now with --add-cells, or by an added config run again: the grid stays the union
        current = store.grid()
        known = set(current)
        store.register(jobs, grid=current + [j.id for j in jobs if j.id not in known])
        added = store.get(ADDED_KEY, []) or []
        if all(differing_fields(a, config) for a in added):
            store.set_meta(ADDED_KEY, added + [dump])
    finally:
        store.close()
