"""The study config: one YAML file that says which grid to run and how (validated with pydantic).

    name: my-study
    output: studies/my-study           # relative paths are relative to the current directory
    data_dir: ../shared/data           # local data (shared/data layout); omit to use the Hugging Face hub
    models:
      - model: Qwen/Qwen3.5-0.8B-Base  # catalog name, hub id or local directory
      - {model: falcon-h1-0.5b, tiny: true}   # tiny random-weight same-family model (pipeline checks)
    placements: [study]                # preset groups (study, generic), preset names, {file: x.yaml},
                                       # {preset: NAME, rank: 8}, {preset: NAME, match_budget: OTHER},
                                       # advisor, {advisor: {signal: probe}, match_budget: OTHER}
    domains:
      - {name: gsm8k, max_examples: 2000}
      - codealpaca
    seeds: [3407]
    train: {epochs: 3, rank: 16, alpha: 32}
    eval:
      benchmarks: {mmlu: 512, arc_challenge: 299, hellaswag: 512, gsm8k: 256, humaneval: 164}

Every field has the study's value as its default; unknown keys are errors (a typo never silently runs the
default). :func:`load_study_config` turns any problem into one :class:`StudyConfigError` line.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MAX_SEED

BENCHMARK_SIZES = {"mmlu": 512, "arc_challenge": 299, "hellaswag": 512, "gsm8k": 256, "humaneval": 164}
"""The study's evaluation subset sizes (Where Should LoRA Go?, its evaluation section)."""

BUILTIN_DATA = "builtin:demo"
"""``data_dir`` value that asks for the project's own generated demo data (see :mod:`.demo_data`)."""


class StudyConfigError(ValueError):
    """A study config that cannot be run; the message names the field and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    model: str = Field(min_length=1)
    tiny: bool = False  # random-weight tiny same-family model + byte tokenizer (no weights needed)
    label: Optional[str] = None  # name in results and the report (default: the model spec)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # what kind of hybrid it is: with a sequential and a parallel model the report adds the topology-effect section
    topology: Optional[Literal["sequential", "parallel", "all_attention", "all_recurrent"]] = None
    mixer: Optional[str] = Field(default=None, min_length=1)  # its recurrent mixer (gdn, mamba2, ...), pairs models
    made_by: Optional[str] = Field(default=None, min_length=1)  # command that makes this local model directory
    placements: Optional[list[str]] = Field(default=None, min_length=1)  # the study's placements it takes (default all)

    @property
    def name(self) -> str:
        # A tiny random stand-in is never reported under the real checkpoint's name.
        return self.label or (f"{self.model} [tiny random]" if self.tiny else self.model)


class AdvisorSettings(_Strict):
    """``placements: [advisor]``: the advisor's proposal for each model × domain, resolved when the grid is built
    (``hybridlora.advise.study``) so every job spec holds the concrete hosts and ranks it trains."""
    signal: Literal["grad", "probe"] = "probe"
    unit: Literal["host", "component"] = "host"
    examples: int = Field(default=256, ge=1)
    max_length: int = Field(default=512, ge=16)
    seed: int = 3407


class PlacementEntry(_Strict):
    advisor: Optional[AdvisorSettings] = None  # budget: match_budget's placement, else `all` at rank (train.rank)
    preset: Optional[str] = None
    group: Optional[str] = None
    file: Optional[str] = None
    rank: Optional[int] = Field(default=None, ge=1)
    alpha: Optional[float] = Field(default=None, gt=0)
    match_budget: Optional[str] = None  # rescale ranks to train as many parameters as this other placement

    @model_validator(mode="after")
    def _one_source(self) -> "PlacementEntry":
        given = [k for k in ("preset", "group", "file", "advisor") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each placement entry needs exactly one of preset, group or file, or advisor")
        if self.group and (self.match_budget or self.rank):
            raise ValueError("rank/match_budget apply to one placement, not to a whole group")
        return self


class DomainEntry(_Strict):
    name: str = Field(min_length=1)  # gsm8k | codealpaca | chat | path to a local file
    max_examples: Optional[int] = Field(default=2000, ge=1)
    val_examples: Optional[int] = Field(default=None, ge=0)
    label: Optional[str] = None  # train_domain in results (default: name, or the file's stem)

    @property
    def train_domain(self) -> str:
        return self.label or (Path(self.name).stem if "/" in self.name or "." in self.name else self.name)


class TrainSettings(_Strict):
    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    epochs: int = Field(default=3, ge=1)
    micro_batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=4, ge=1)
    max_length: int = Field(default=1024, ge=16)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    loss_on: Literal["assistant", "full"] = "full"  # the study trained on the full text
    save_every: int = Field(default=100, ge=0)
    norm_every: int = Field(default=10, ge=0)
    compile: Literal["off", "lora", "layers"] = "off"  # torch.compile regions (speed; changes dropout masks)


class EvalSettings(_Strict):
    benchmarks: dict[str, Optional[Annotated[int, Field(ge=1)]]] = Field(
        default_factory=lambda: dict(BENCHMARK_SIZES))  # name -> subset size (null: the whole split)
    limit: Optional[int] = Field(default=None, ge=1)  # first N of each subset (quick looks; changes results)
    batch_size: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = 8  # auto: largest that fits the GPU
    max_length: Optional[int] = Field(default=None, ge=16)
    max_new_tokens: Optional[int] = Field(default=None, ge=1)  # None: each benchmark's protocol value
    allow_code_execution: bool = False  # HumanEval runs model code (sandboxed) only when this is true
    subset_seed: int = 1234
    # multiple choice on the shared few-shot prefix's cache (docs/EVALUATION.md, "Prefix reuse"); in a job's spec
    # only when true, so the job ids of studies written before it stay
    prefix_reuse: bool = False

    @field_validator("subset_seed")
    @classmethod
    def _subset_seed(cls, value: int) -> int:
        return check_seed(value)

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _benchmarks(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):  # [mmlu, gsm8k] -> study sizes
            value = {name: BENCHMARK_SIZES.get(name) for name in value}
        if isinstance(value, dict):
            from ..evaluate.runner import BENCHMARKS

            unknown = [b for b in value if b not in BENCHMARKS]
            if unknown:
                raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
            if not value:
                raise ValueError("name at least one benchmark")
        return value


def check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} is out of range; use an integer from 0 to {MAX_SEED:,}")
    return seed


class BackendSettings(_Strict):
    """Where the jobs run (docs/RAY.md); not part of any job's spec, so changing it never changes a job id."""
    name: Literal["local", "ray"] = "local"
    address: Optional[str] = None  # ray: "auto" or HOST:PORT of a running cluster; None starts one in-process
    gpus_per_job: Optional[float] = Field(default=None, ge=0)  # None: 1 when the cluster has GPUs, else 0
    cpus_per_job: float = Field(default=1.0, gt=0)
    retries: int = Field(default=0, ge=0)  # reruns of a job that raises, before it is recorded failed
    workers_per_gpu: Optional[int] = Field(default=None, ge=1)  # local: runner processes per GPU; None: one


class StudyConfig(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    output: Optional[str] = None  # default: studies/<name>
    data_dir: Optional[str] = None  # shared/data layout; "builtin:demo" = generated demo data; None = the hub
    models: list[ModelEntry] = Field(min_length=1)
    placements: list[PlacementEntry] = Field(min_length=1)
    domains: list[DomainEntry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [3407], min_length=1)
    model_seed: int = 0  # weights of tiny random models (the same base model for every cell)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    notes: list[str] = Field(default_factory=list)  # shown at the top of the report
    full_placement: Optional[str] = None  # the all-components placement compared against (default: largest)
    backend: BackendSettings = Field(default_factory=BackendSettings)  # `backend: ray` or a mapping

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        return [{"model": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("placements", mode="before")
    @classmethod
    def _placements(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        from ..placement.presets import PRESET_GROUPS

        def entry(v: Any) -> Any:
            if v == "advisor":
                return {"advisor": {}}
            if isinstance(v, dict) and v.get("advisor") is True:
                return {**v, "advisor": {}}
            if isinstance(v, str):
                if v in PRESET_GROUPS:
                    return {"group": v}
                if v.endswith((".yaml", ".yml")):
                    return {"file": v}
                return {"preset": v}
            return v
        return [entry(v) for v in value]

    @field_validator("domains", mode="before")
    @classmethod
    def _domains(cls, value: Any) -> Any:
        return [{"name": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        for seed in value:
            check_seed(seed)
        return value

    @field_validator("model_seed")
    @classmethod
    def _model_seed(cls, value: int) -> int:
        return check_seed(value)

    @model_validator(mode="after")
    def _unique_names(self) -> "StudyConfig":
        for what, names in (("model", [m.name for m in self.models]),
                            ("domain", [d.train_domain for d in self.domains])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names repeat: {dup}; give the entries distinct `label`s")
        if "base" in [d.train_domain for d in self.domains]:
            raise ValueError("'base' is reserved for the un-fine-tuned model; label that domain otherwise")
        return self

    def output_dir(self) -> Path:
        return Path(self.output or f"studies/{self.name}")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath("presets").iterdir()
                  if p.name.endswith(".yaml"))


def _preset_text(name: str) -> str:
    return resources.files(__package__).joinpath("presets", f"{name}.yaml").read_text()


def study_config_from_dict(data: Any, source: str = "study config") -> StudyConfig:
    if not isinstance(data, dict):
        raise StudyConfigError(f"{source}: expected a YAML mapping (name, models, placements, domains, ...)")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        from ..placement.spec import first_error

        raise StudyConfigError(f"{source}: {first_error(exc)}") from None


def load_study_config(spec: str | None) -> StudyConfig:
    """A preset name (``demo``, ``paper``, ...) or a YAML file path; ``None`` = the demo preset."""
    spec = spec or "demo"
    path = Path(spec)
    if spec in preset_names() and not path.is_file():
        text, source = _preset_text(spec), f"preset {spec}"
    elif path.is_file():
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise StudyConfigError(f"{path}: not UTF-8 text (at byte {exc.start}); save the YAML as UTF-8") from None
        except OSError as exc:
            raise StudyConfigError(f"{path}: cannot read ({exc.strerror})") from None
    else:
        raise StudyConfigError(f"{spec}: no such file and no such preset; presets: {', '.join(preset_names())}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise StudyConfigError(f"{source}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return study_config_from_dict(data, source)
