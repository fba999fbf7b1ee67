"""Trials shared between sweeps: a grid point whose settings equal those of a trial already completed by
another sweep in the same storage folder is not trained again; the sweep links that trial instead.

Two trials are the same when their resolved settings (trial.yaml) are equal once the settings that cannot
change a result are set aside (`result_key`): the trial's name, and `context.hints_path` for a context that
reads no hint. Paper Figures 1 and 3 both hold Qwen3-8B x peer_solution_feedback x seeds 0-2, so the second of
the two sweeps links those three trials (about 60 GPU-hours) rather than training them twice.

A link is decided when a sweep is prepared (`opsd sweep run`), for grid points this sweep has never started,
and is kept in its sweep.json (`links`: trial id -> the trial's folder relative to the storage folder):
`opsd sweep status` and `collect` read the linked folder, Ray Tune does not run the trial, and `opsd sweep
plan` says which trials it will link and which of several sweeps planned together share trials. Links need
a storage folder on a file system (local or mounted); a sweep in s3:// or gs:// storage trains its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from orchestrator.sweep_file import GridPoint
from trainer.config import TrialConfig


def result_key(cfg: TrialConfig) -> str:
    """A digest of the settings that decide a trial's results (module docstring)."""
    from trainer.contexts import needs_hints

    settings = cfg.model_dump(mode="json")
    settings.pop("name")
    if not needs_hints(cfg.context):
        settings["context"].pop("hints_path")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def trial_file_key(path: Path) -> str | None:
    """`result_key` of a trial.yaml, or None when it is missing or no longer a valid trial file."""
    try:
        return result_key(TrialConfig.model_validate(yaml.safe_load(Path(path).read_text())))
    except (OSError, ValueError, TypeError, yaml.YAMLError):  # unreadable, not YAML, or not a valid trial file
        return None


def completed_trials(storage: Path, *, exclude: str | None = None) -> dict[str, str]:
    """result_key -> folder (relative to `storage`) of every completed trial that a sweep in `storage` trained
    itself (linked trials are found in the sweep that trained them); sweeps in name order, the first wins."""
    found: dict[str, str] = {}
    for sweep_json in sorted(storage.glob("*/sweep.json")):
        sweep_dir = sweep_json.parent
        if sweep_dir.name == exclude:
            continue
        try:
            state = json.loads(sweep_json.read_text())
        except (OSError, ValueError):
            continue
        links = state.get("links") or {}
        for trial_id in state.get("trials") or {}:
            folder = sweep_dir / "trials" / trial_id
            if trial_id in links or not _completed(folder):
                continue
            key = trial_file_key(folder / "trial.yaml")
            if key is not None:
                found.setdefault(key, folder.relative_to(storage).as_posix())
    return found


def _completed(folder: Path) -> bool:
    try:
        return json.loads((folder / "trial.json").read_text()).get("status", "completed") == "completed"
    except (OSError, ValueError):
        return False


def find_links(storage: Path, sweep_name: str, points: list[GridPoint], *,
               started: set[str] = frozenset()) -> dict[str, str]:
    """trial id -> linked folder (relative to `storage`) for the grid points, other than `started` ones, whose
    results another sweep in `storage` has already completed."""
    done = completed_trials(storage, exclude=sweep_name)
    links = {}
    for point in points:
        if point.trial_id in started:
            continue
        key = result_key(point.config)
        if key in done:
            links[point.trial_id] = done[key]
    return links


def linked_sweep(link: str) -> str:
    """The name of the sweep that trained a linked trial (`paper-fig1/trials/<id>` -> `paper-fig1`)."""
    return link.split("/", 1)[0]


def shared_between(plans: list[tuple[str, str, list[GridPoint]]]) -> dict[tuple[str, str], str]:
    """Sweeps planned together, in run order, each as (name, storage, grid): (sweep, trial id) -> the earlier
    sweep in the same storage folder that trains the same trial (none in s3:// or gs:// storage: module
    docstring)."""
    first: dict[tuple[str, str], str] = {}
    shared = {}
    for name, storage, points in plans:
        if "://" in storage:
            continue
        storage = str(Path(storage).expanduser().resolve())
        for point in points:
            key = (storage, result_key(point.config))
            if key in first and first[key] != name:
                shared[(name, point.trial_id)] = first[key]
            else:
                first.setdefault(key, name)
    return shared
