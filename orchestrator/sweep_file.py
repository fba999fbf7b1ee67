"""The sweep file: a grid of models x privileged contexts x seeds over shared trial settings.

A sweep file is YAML; `load_sweep` validates it whole before anything starts and names the field and its
line in every error (`paper.yaml:14: contexts[2]: unknown construction 'feedbak'`). The trial settings are
the trial file's schema (`trainer/config.py`), reused: the `trial:` section and each model's `overrides:`
are merged into one `TrialConfig` per grid point, and every grid point is validated at load time.

Relative paths in a sweep file (a model folder, `data.path`, `context.hints_path`) are read from the sweep
file's folder, whatever the current directory, and every grid point gets them absolute: a trial runs in its
own folder, on any node. A relative path found only from the current directory is refused, with what to
write instead. `check_input_files` checks, before `opsd sweep run` starts Ray, that the files the trials
will read exist (`opsd sweep plan` does not: a cluster's paths need not exist on a laptop).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.errors import SweepError
from orchestrator.gpu_memory import GPU_MEMORY_GIB, GiB
from trainer.config import EMBEDDED_SMOLLM2, ContextConfig, DataConfig, ModelConfig, TrialConfig, format_validation_error

SWEEP_FORMAT = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Section):
    """What one trial holds for its whole life: one placement-group bundle on one node."""

    gpus: int = Field(0, ge=0, description="GPUs of the trial: its DeepSpeed ranks share them with its vLLM engine.")
    cpus: int = Field(2, ge=1, description="CPUs of the trial (trainer, vLLM's CPU work, sandbox workers).")
    sandbox_workers: int = Field(2, ge=1, description="Isolated sandbox workers grading the trial's rollouts.")
    gpu_memory_gib: float | None = Field(None, gt=0, description="Memory of one GPU in GiB, for a GPU model not "
                                         "listed under `gpu` (default: that model's).")
    gpu: str | None = Field(None, description=f"The GPU model ({', '.join(GPU_MEMORY_GIB)}): `opsd sweep plan` and "
                            "`sweep run` check that each trial fits its memory.")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, gpu: str | None, info: ValidationInfo) -> str | None:
        if gpu is not None and gpu not in GPU_MEMORY_GIB and info.data.get("gpu_memory_gib") is None:
            raise ValueError(f"unknown GPU {gpu!r} (known: {', '.join(GPU_MEMORY_GIB)}); give its memory as "
                             "gpu_memory_gib")
        return gpu

    @property
    def memory_per_gpu_bytes(self) -> int | None:
        """What one GPU holds (bytes), or None when the sweep does not say which GPU it runs on."""
        gib = self.gpu_memory_gib or GPU_MEMORY_GIB.get(self.gpu or "")
        return None if gib is None or not self.gpus else int(gib * GiB)


# Named resource sets. A B200 node (p6-b200.48xlarge and most SLURM B200 nodes) and an H100 node (p5.48xlarge)
# have 8 GPUs and ~192 vCPUs: 16 CPUs per GPU leaves room for the Ray and system processes; the sandbox takes
# 3/4 of a trial's CPUs.
RESOURCE_PRESETS: dict[str, Resources] = {
    "cpu": Resources(gpus=0, cpus=2, sandbox_workers=2),
    **{f"{gpu.lower()}-{n}": Resources(gpus=n, cpus=16 * n, sandbox_workers=12 * n, gpu=gpu)
       for gpu in ("B200", "H100") for n in (1, 4, 8)},
}


class WandbSettings(_Section):
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="'online' streams to W&B (needs WANDB_API_KEY); 'offline' writes runs to sync later.")
    project: str = Field("opsd-sweep", description="W&B project of the runs.")
    entity: str | None = Field(None, description="W&B team or user (default: the key's default entity).")
    tags: list[str] = Field(default_factory=list, description="Extra tags on every run of the sweep.")


class CheckpointRetention(_Section):
    keep_last: Literal[1, 2] = Field(
        2, description="Checkpoints a running trial keeps; a retry resumes from the newest complete one.")
    when_done: Literal["weights", "full", "none"] = Field(
        "weights", description="What a finished trial keeps: its final student weights without optimizer "
        "state ('weights'), its last checkpoints whole ('full'), or nothing ('none').")


class GuidedSettings(_Section):
    """A law-guided sweep (analysis/guided.py): screen every configuration's gap first, then train only the
    trials the policy chooses, until its goal or its budget stops it."""

    goal: Literal["law", "best"] = Field(description="'law': stop when each family's slope interval is expected "
                                         "(from the seed noise and the design) to be narrower than slope_ci_width; "
                                         "'best': stop when no untrained configuration's upper prediction bound "
                                         "beats the best measured improvement, once that best is confirmed by its "
                                         "further seeds.")
    slope_ci_width: float | None = Field(None, gt=0, description="Goal law: the widest expected slope interval (its "
                                         "full width, at `confidence`) that counts as known.")
    max_trials: int | None = Field(None, ge=1, description="Never train more trials than this.")
    max_hours: float | None = Field(None, gt=0, description="Never spend more device-hours (GPU-hours, or CPU-core-"
                                    "hours without GPUs) than this, each trial costed as `opsd sweep plan` costs it.")
    prior_law: str | None = Field(None, description="law.json of an earlier sweep (`opsd analyze`): its family "
                                  "lines predict before this sweep has its own, and combine with them after.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the slope and prediction intervals.")

    @model_validator(mode="after")
    def _goal_needs_target(self) -> "GuidedSettings":
        if self.goal == "law" and self.slope_ci_width is None:
            raise ValueError("goal 'law' needs slope_ci_width: the slope interval's width at which to stop")
        return self


def check_seeds(seeds: list[int] | None) -> list[int] | None:
    negative = [s for s in seeds or [] if s < 0]
    if negative:
        raise ValueError(f"seeds must be non-negative, got {negative}")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError("a seed is listed twice")
    return seeds


class SweepModel(ModelConfig):
    """A model of the grid: the trial file's `model:` section plus a label and its own trial settings."""

    label: str | None = Field(None, description="Name in trial ids and figures (default: from the path).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Trial settings for this model only, merged over `trial:`.")
    seeds: list[StrictInt] | None = Field(None, min_length=1, description="This model's seeds (default: the sweep's).")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int] | None) -> list[int] | None:
        return check_seeds(seeds)


# Settings of a trial that the grid sets; the shared `trial:` section and `overrides:` may not. `trial.context`
# may hold the settings every context shares (e.g. max_teacher_prompt_tokens), but not which context it is.
_GRID_SECTIONS = ("name", "model", "data", "seed")
_GRID_CONTEXT_FIELDS = ("name", "template")


class SweepFile(_Section):
    name: str = Field(description="Sweep name: the folder under `storage`, the W&B group, part of every trial id.")
    models: list[SweepModel] = Field(min_length=1, description="Models of the grid.")
    contexts: list[ContextConfig] = Field(
        min_length=1, description="Privileged contexts of the grid: built-in names or {name, template} mappings.")
    # Strict: a quoted "0" is refused rather than read as 0 (the trial ids and W&B runs carry the seed).
    seeds: list[StrictInt] = Field(min_length=1, description="Seeds of the grid (each grid point runs once per seed).")
    data: DataConfig = Field(DataConfig(), description="Problems, as in a trial file.")
    trial: dict[str, Any] = Field(default_factory=dict, description="Trial settings shared by every grid point.")
    resources: Resources | str = Field("cpu", validate_default=True, description="Per trial: a preset (cpu, b200-1, b200-4, b200-8, "
                                       "h100-1, h100-4, h100-8) or {gpus, cpus, sandbox_workers, gpu}.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="At most this many trials at once.")
    max_failures: int = Field(2, ge=0, description="Retries of a failed trial; each resumes from its checkpoint.")
    storage: str = Field("runs/sweeps", description="Results and checkpoints: a local or shared (NFS) folder, "
                         "or a URI (s3://bucket/prefix, gs://...; trials then work in node-local mirrors, see "
                         "orchestrator/remote.py); the sweep writes <storage>/<name>/. A relative folder is read "
                         "from the directory opsd runs in (`--storage` overrides it), unlike the files the "
                         "trials read, which are read from the sweep file's folder.")
    wandb: WandbSettings = WandbSettings()
    checkpoints: CheckpointRetention = CheckpointRetention()
    guided: GuidedSettings | None = Field(None, description="Make the sweep law-guided: screen first, then train "
                                          "only what the policy chooses (see GuidedSettings).")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a folder and W&B group)")
        return name

    @field_validator("contexts", mode="before")
    @classmethod
    def _names_to_sections(cls, contexts: Any) -> Any:
        if isinstance(contexts, list):
            return [{"name": c} if isinstance(c, str) else c for c in contexts]
        return contexts

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        return check_seeds(seeds)

    @field_validator("resources", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in RESOURCE_PRESETS:
                raise ValueError(f"unknown preset {value!r}; presets: {', '.join(RESOURCE_PRESETS)}")
            return RESOURCE_PRESETS[value]
        return value

    @field_validator("trial")
    @classmethod
    def _no_grid_sections(cls, trial: dict[str, Any]) -> dict[str, Any]:
        for key in _GRID_SECTIONS:
            if key in trial:
                raise ValueError(f"'{key}' is set by the grid (models, data, contexts, seeds), not in trial:")
        for key in _GRID_CONTEXT_FIELDS:
            if key in (trial.get("context") or {}):
                raise ValueError(f"'context.{key}' is set by the grid's contexts:, not in trial:")
        return trial

    @model_validator(mode="after")
    def _unique_labels(self) -> "SweepFile":
        labels = [model_label(m) for m in self.models]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"models: two models share the label {twice[0]!r}; give each a distinct `label`")
        names = [c.name for c in self.contexts]
        twice = sorted({x for x in names if names.count(x) > 1})
        if twice:
            raise ValueError(f"contexts: {twice[0]!r} is listed twice")
        return self

    @property
    def trial_resources(self) -> Resources:
        assert isinstance(self.resources, Resources)  # a preset name is replaced by its values when validated
        return self.resources


def model_label(model: ModelConfig | SweepModel) -> str:
    """A short, file-name-safe label: `Qwen/Qwen3-8B` -> `qwen3-8b`, the embedded model -> `smollm2-135m-instruct`."""
    label = getattr(model, "label", None) or model.path.rstrip("/").split("/")[-1].split(":")[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", label.lower()).strip("-") or "model"


@dataclass(frozen=True)
class GridPoint:
    """One trial of the sweep: its id, its grid coordinates and its fully resolved trial settings."""

    trial_id: str
    model: str
    context: str
    seed: int
    config: TrialConfig


def grid(sweep: SweepFile) -> list[GridPoint]:
    """The sweep's trials in a stable order (model, context, seed), each validated as a trial file would be."""
    points = []
    resources = sweep.trial_resources
    for model in sweep.models:
        label = model_label(model)
        for context in sweep.contexts:
            for seed in model.seeds or sweep.seeds:
                trial_id = f"{label}-{context.name}-s{seed}"
                raw = _deep_merge(copy.deepcopy(sweep.trial), model.overrides)
                raw.setdefault("device", "cuda" if resources.gpus else "cpu")
                # Every GPU of the trial is a trainer rank, with a vLLM engine beside it (rollout.engines).
                raw.setdefault("deepspeed", {}).setdefault("world_size", max(resources.gpus, 1))
                raw.setdefault("sandbox", {}).setdefault("workers", resources.sandbox_workers)
                shared_context = raw.get("context") or {}
                raw.update(name=trial_id, seed=seed, data=sweep.data.model_dump(exclude_unset=True),
                           context={**shared_context, **context.model_dump(exclude_unset=True)},
                           model=model.model_dump(exclude={"label", "overrides", "seeds"}, exclude_unset=True))
                try:
                    config = TrialConfig.model_validate(raw)
                except ValidationError as err:
                    raise _GridPointInvalid(label, context.name, model.overrides, err) from None
                points.append(GridPoint(trial_id, label, context.name, seed, config))
    return points


class _GridPointInvalid(Exception):
    def __init__(self, label: str, context: str, overrides: dict[str, Any], err: ValidationError):
        super().__init__(format_validation_error(err))
        self.label, self.context, self.overrides, self.err = label, context, overrides, err


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


# ------------------------------------------------------------------------------------------------ loading


def load_sweep(path: str | Path) -> tuple[SweepFile, list[GridPoint]]:
    """Read and validate a sweep file and its whole grid; raise SweepError naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of settings at the top level")

    def where(loc: tuple) -> str:
        # The deepest part of the location that the file spells out carries the line number.
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f"{path}:{lines[loc[:n]]}: "
        return f"{path}: "

    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as err:
        # A misspelt key also makes the key it was meant to be missing: report the misspelling.
        item = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc = tuple(item["loc"])
        # Errors inside a union (resources) carry the member's name in the location; drop it.
        loc = tuple(p for p in loc if p not in ("Resources", "str", "function-after[_preset(), Resources]"))
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise SweepError(f"{where(loc)}{_dotted(loc)}: {item['msg'].removeprefix('Value error, ')}{more}") from None
    base = path.resolve().parent
    models = [model.model_copy(update={"path": _model_path(model.path, base, f"{where(('models', i, 'path'))}"
                                                                            f"models[{i}].path")})
              for i, model in enumerate(sweep.models)]
    sweep = sweep.model_copy(update={"models": models})
    if sweep.guided is not None and sweep.guided.prior_law is not None:
        prior = _file_path(sweep.guided.prior_law, base, where(("guided", "prior_law")) + "guided.prior_law")
        if not Path(prior).is_file():
            raise SweepError(f"{where(('guided', 'prior_law'))}guided.prior_law: {prior} does not exist")
        sweep = sweep.model_copy(update={"guided": sweep.guided.model_copy(update={"prior_law": prior})})
    try:
        points = grid(sweep)
    except _GridPointInvalid as bad:
        item = bad.err.errors()[0]
        loc = tuple(item["loc"])
        model_index = next(i for i, m in enumerate(sweep.models) if model_label(m) == bad.label)
        in_overrides = _get(bad.overrides, loc) is not _MISSING
        full = ("models", model_index, "overrides", *loc) if in_overrides else ("trial", *loc)
        if not loc:  # a check across sections names its fields itself; the grid point is the model's
            full = ("models", model_index)
        raise SweepError(f"{where(full)}{_dotted(full)}: {item['msg'].removeprefix('Value error, ')} "
                         f"(trial {bad.label} x {bad.context})") from None
    resolved = []
    for point in points:
        cfg = point.config
        data_path = _file_path(cfg.data.path, base, where(("data", "path")) + "data.path")
        hints_loc = next((loc for loc in (("contexts", _context_index(sweep, point.context), "hints_path"),
                                          ("models", _model_index(sweep, point.model), "overrides", "context",
                                           "hints_path"), ("trial", "context", "hints_path")) if loc in lines),
                         ("trial", "context", "hints_path"))
        hints_path = _file_path(cfg.context.hints_path, base, where(hints_loc) + _dotted(hints_loc))
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": data_path}),
                                     "context": cfg.context.model_copy(update={"hints_path": hints_path})})
        resolved.append(GridPoint(point.trial_id, point.model, point.context, point.seed, cfg))
    return sweep, resolved


def _model_index(sweep: SweepFile, label: str) -> int:
    return next(i for i, m in enumerate(sweep.models) if model_label(m) == label)


def _context_index(sweep: SweepFile, name: str) -> int:
    return next(i for i, c in enumerate(sweep.contexts) if c.name == name)


def _relative_hint(given: str, base: Path, cwd_match: Path) -> str:
    return (f"{given} is not in the sweep file's folder {base} but in the current directory: relative paths "
            f"are read from the sweep file's folder; write {os.path.relpath(cwd_match, base)} or {cwd_match}")


def _model_path(given: str, base: Path, field: str) -> str:
    """The model's path as the trials get it: a local folder made absolute (a relative one read from the
    sweep file's folder), a Hugging Face id or the embedded model as written. A local folder must exist now,
    not when the trial starts on a node an hour later."""
    if given == EMBEDDED_SMOLLM2:
        return given
    local = Path(given).expanduser()
    if local.is_absolute():
        if not local.exists():
            raise SweepError(f"{field}: {given} does not exist")
        return str(local)
    beside = (base / local).resolve()
    if beside.exists():
        return str(beside)
    if local.exists():  # found from the current directory only: which one was meant is not ours to guess
        raise SweepError(f"{field}: {_relative_hint(given, base, local.resolve())}")
    if given.startswith((".", "~")) or given.count("/") != 1:
        raise SweepError(f"{field}: {given} does not exist in the sweep file's folder {base} (a local model "
                         f"folder, a Hugging Face id such as 'Qwen/Qwen3-8B', or '{EMBEDDED_SMOLLM2}')")
    return given  # an `org/name` found nowhere here: a Hugging Face id


def _file_path(given: str | None, base: Path, field: str) -> str | None:
    """A file setting made absolute, a relative one read from the sweep file's folder (whether it exists is
    `check_input_files`'s question)."""
    if given is None:
        return None
    local = Path(given).expanduser()
    if local.is_absolute():
        return str(local)
    beside = (base / local).resolve()
    if not beside.exists() and local.exists():
        raise SweepError(f"{field}: {_relative_hint(given, base, local.resolve())}")
    return str(beside)


def check_input_files(points: list[GridPoint]) -> None:
    """Refuse, before any trial starts, a grid whose trials would not find their problem or hint files."""
    for point in points:
        cfg = point.config
        for field, value in (("data.path", cfg.data.path), ("context.hints_path", cfg.context.hints_path)):
            if value is not None and not Path(value).is_file():
                raise SweepError(f"{field}: {value} does not exist (trial {point.trial_id}); the trials read it "
                                 "at this path on every node")


_MISSING = object()


def _get(tree: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and isinstance(part, int) and part < len(tree):
            tree = tree[part]
        else:
            return _MISSING
    return tree


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """1-based line of every key and list item of a composed YAML document, by its path."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*prefix, i)] = item.start_mark.line + 1
            lines.update(_key_lines(item, (*prefix, i)))
    return lines
