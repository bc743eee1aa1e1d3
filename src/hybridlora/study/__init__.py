"""The placement study: config, grid of jobs, SQLite store with claims, runner, demo data, results loading."""
from .config import StudyConfig, StudyConfigError, load_study_config, preset_names
from .grid import Job, expand_grid, filter_jobs, parse_only
from .runner import dry_run, run_study
from .store import Store, StoreError

__all__ = ["Job", "Store", "StoreError", "StudyConfig", "StudyConfigError", "dry_run", "expand_grid",
           "filter_jobs", "load_study_config", "parse_only", "preset_names", "run_study"]
