"""The sweep folder: what `opsd sweep run` writes under `<storage>/<name>/`, and how every command reads it.

    sweep.yaml                the sweep file as given
    sweep.json                the resolved grid: trial ids with their model, context and seed; resources; W&B;
                              `links`: trials completed by another sweep in the same storage, not trained here
                              (trial id -> their folder, relative to the storage folder; orchestrator/shared_trials.py)
    trials/<trial id>/        one folder per grid point, the trial's `--out` folder:
        trial.yaml            its fully resolved trial settings (the input of `opsd trial`)
        config.json, steps.parquet, trial.json, progress.json, rollouts/, checkpoints/   (written by the trial)
        attempts.jsonl        one line per attempt event: start (node, GPUs), pid, end (exit code)
        processes.json        the running attempt's process tree, for clean-up after a hard failure
        logs/attempt-N.log    everything the trial's processes printed (vLLM, DeepSpeed, the sandbox)
    tune/                     Ray Tune's experiment state (what `opsd sweep resume` restores)
    wandb/                    W&B runs (offline runs to sync with `wandb sync`)
    driver.log                Ray's and Tune's own messages
    trials.parquet, steps.parquet   written by `opsd sweep collect`, read by `opsd analyze`

Everything lives under the storage path, not in Tune's node-local trial folders, so a retry on another node
(shared storage) resumes the trial's own checkpoint. Reading the folder needs no Ray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SweepError
from orchestrator.remote import RemoteSweep, is_uri, mirror_dir
from orchestrator.shared_trials import find_links
from orchestrator.sweep_file import CheckpointRetention, GridPoint, Resources, SweepFile, WandbSettings
from trainer.records import atomic_write_bytes

STATE_FORMAT = 1


@dataclass(frozen=True)
class TrialFiles:
    """The files of one trial inside the sweep folder."""

    dir: Path

    @property
    def trial_file(self) -> Path:
        return self.dir / "trial.yaml"

    @property
    def steps(self) -> Path:
        return self.dir / "steps.parquet"

    @property
    def progress(self) -> Path:
        return self.dir / "progress.json"

    @property
    def summary_path(self) -> Path:
        return self.dir / "trial.json"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def processes(self) -> Path:
        return self.dir / "processes.json"

    @property
    def attempts_path(self) -> Path:
        return self.dir / "attempts.jsonl"

    def log(self, attempt: int) -> Path:
        return self.dir / "logs" / f"attempt-{attempt}.log"

    def events(self) -> list[dict[str, Any]]:
        if not self.attempts_path.is_file():
            return []
        return [json.loads(line) for line in self.attempts_path.read_text().splitlines() if line.strip()]

    def attempts(self) -> list[dict[str, Any]]:
        """The start event of each attempt, merged with its pid and end events."""
        merged: dict[int, dict[str, Any]] = {}
        for event in self.events():
            kind = event.get("event")
            entry = merged.setdefault(event["attempt"], {})
            if kind == "start":
                entry.update({k: v for k, v in event.items() if k != "event"}, started=event["time"])
            elif kind == "end":
                entry.update(ended=event["time"], exit_code=event.get("exit_code"), seconds=event.get("seconds"),
                             lost=event.get("lost", False))
            elif kind == "pid":
                entry["pid"] = event["pid"]
        return [merged[k] for k in sorted(merged)]

    def append_attempt(self, event: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.attempts_path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def summary(self) -> dict[str, Any] | None:
        if not self.summary_path.is_file():
            return None
        return json.loads(self.summary_path.read_text())


@dataclass(frozen=True)
class SweepState:
    """`sweep.json`: what every command needs to know about a sweep folder."""

    dir: Path
    name: str
    resources: Resources
    wandb: WandbSettings
    checkpoints: CheckpointRetention
    max_failures: int
    max_concurrent_trials: int | None
    trials: dict[str, dict[str, Any]]  # trial id -> model, context, seed, model path, family, size
    remote: str | None = None  # the sweep's URI when its storage is s3://, gs://, ...; `dir` is then a mirror
    links: dict[str, str] = field(default_factory=dict)  # trial id -> another sweep's trial folder (storage-relative)

    @property
    def tune_dir(self) -> Path:
        return self.dir / "tune"

    @property
    def wandb_dir(self) -> Path:
        return self.dir

    def trial_files(self, trial_id: str) -> TrialFiles:
        """The trial's folder: its own, or for a linked trial the folder of the sweep that trained it."""
        if trial_id in self.links:
            return TrialFiles(self.dir.parent / self.links[trial_id])
        return TrialFiles(self.dir / "trials" / trial_id)

    @property
    def trials_to_train(self) -> list[str]:
        """The trial ids this sweep runs itself (all but the linked ones)."""
        return [t for t in self.trials if t not in self.links]

    @classmethod
    def read(cls, sweep_dir: Path) -> "SweepState":
        path = Path(sweep_dir) / "sweep.json"
        if not path.is_file():
            raise SweepError(f"{sweep_dir} is not a sweep folder (no sweep.json); `opsd sweep run FILE` makes one")
        raw = json.loads(path.read_text())
        if raw.get("format") != STATE_FORMAT:
            raise SweepError(f"{path}: sweep folder format {raw.get('format')} is not {STATE_FORMAT}")
        return cls(dir=Path(sweep_dir).resolve(), name=raw["name"], resources=Resources(**raw["resources"]),
                   wandb=WandbSettings(**raw["wandb"]), checkpoints=CheckpointRetention(**raw["checkpoints"]),
                   max_failures=raw["max_failures"], max_concurrent_trials=raw["max_concurrent_trials"],
                   trials=raw["trials"], remote=raw.get("remote"), links=raw.get("links") or {})

    def remote_sweep(self) -> "RemoteSweep | None":
        return RemoteSweep(self.remote, self.dir) if self.remote else None


# What `status`, `collect` and the live view need of a remote sweep (not checkpoints, rollouts, logs, runs).
SMALL_FILES_SKIP = ("checkpoints", "rollouts", "logs", "wandb", "tune")


def sweep_location(sweep: SweepFile, storage: str | None = None) -> tuple[Path, str | None]:
    """The sweep's folder on this machine, and its URI when the storage is remote (the folder is a mirror)."""
    root = storage or sweep.storage
    if is_uri(root):
        uri = f"{root.rstrip('/')}/{sweep.name}"
        return mirror_dir(uri, "driver"), uri
    return (Path(root).expanduser() / sweep.name).resolve(), None


def sweep_dir_of(sweep: SweepFile, storage: str | None = None) -> Path:
    return sweep_location(sweep, storage)[0]


def open_sweep(where: str | Path, role: str = "read") -> SweepState:
    """A sweep folder, or a sweep's URI (its small files are pulled into this machine's mirror first)."""
    if is_uri(str(where)):
        local = mirror_dir(str(where), role)
        RemoteSweep(str(where), local).pull(skip=SMALL_FILES_SKIP)
        return SweepState.read(local)
    return SweepState.read(Path(where))


def prepare_sweep_dir(sweep: SweepFile, points: list[GridPoint], sweep_dir: Path, source: Path,
                      remote: str | None = None) -> SweepState:
    """Create (or check) the sweep folder: the resolved grid and one trial file per grid point.

    Re-running the same sweep file continues its folder; a different grid in the same folder is refused, so
    results of two sweeps never mix. With `remote`, `sweep_dir` mirrors the sweep's URI."""
    mirror = RemoteSweep(remote, sweep_dir) if remote else None
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        probe = sweep_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        if mirror is not None:
            mirror.fs.create_dir(mirror.root, recursive=True)
            with mirror.fs.open_output_stream(f"{mirror.root}/.write-probe") as out:
                out.write(b"ok")
            mirror.fs.delete_file(f"{mirror.root}/.write-probe")
            mirror.pull(skip=SMALL_FILES_SKIP)
        probe.unlink()
    except OSError as err:
        where = remote or sweep_dir
        raise SweepError(f"storage: cannot write to {where}: {getattr(err, 'strerror', None) or err}") from None
    trials = {p.trial_id: {"model": p.model, "context": p.context, "seed": p.seed, "model_path": p.config.model.path,
                           "family": p.config.model.family, "size_b": p.config.model.size_b, "steps": p.config.steps}
              for p in points}
    path = sweep_dir / "sweep.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    links = dict(previous.get("links") or {})  # a link, once made, stays: Ray Tune's grid was built without it
    if remote is None:
        links.update({k: v for k, v in find_links(sweep_dir.parent, sweep.name, points,
                                                   started=_started(sweep_dir, points)).items() if k not in links})
    state = {"format": STATE_FORMAT, "name": sweep.name, "resources": sweep.trial_resources.model_dump(),
             "wandb": sweep.wandb.model_dump(), "checkpoints": sweep.checkpoints.model_dump(),
             "max_failures": sweep.max_failures, "max_concurrent_trials": sweep.max_concurrent_trials,
             "trials": trials, "remote": remote, "links": links}
    if previous:
        if previous.get("trials") != trials:
            raise SweepError(f"{sweep_dir} holds another sweep's grid; give this sweep another name or storage")
        for point in points:
            if point.trial_id in links:
                continue
            written = sweep_dir / "trials" / point.trial_id / "trial.yaml"
            if written.is_file() and yaml.safe_load(written.read_text()) != point.config.model_dump(mode="json"):
                raise SweepError(f"trial {point.trial_id} in {sweep_dir} was started with other settings; "
                                 "give this sweep another name or storage")
    _atomic_text(sweep_dir / "sweep.yaml", source.read_text())
    _atomic_text(path, json.dumps(state, indent=1) + "\n")
    for point in points:
        if point.trial_id in links:
            continue
        trial_dir = sweep_dir / "trials" / point.trial_id
        trial_dir.mkdir(parents=True, exist_ok=True)
        _atomic_text(trial_dir / "trial.yaml", yaml.safe_dump(point.config.model_dump(mode="json"), sort_keys=False))
    if mirror is not None:
        mirror.push(skip=SMALL_FILES_SKIP)
    return SweepState.read(sweep_dir)


def _started(sweep_dir: Path, points: list[GridPoint]) -> set[str]:
    """The grid points this sweep has already started (an attempt, progress or a summary in their folder)."""
    names = ("attempts.jsonl", "progress.json", "trial.json")
    return {p.trial_id for p in points if any((sweep_dir / "trials" / p.trial_id / n).exists() for n in names)}


def read_progress(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_step_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a trial's steps.parquet (replaced atomically by the trial, so always complete)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError):
        return []


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# The live metrics of a trial: its latest training and evaluation rows.
TRAIN_KEYS = ("loss", "kl", "reward")
EVAL_KEYS = ("student_acc", "teacher_acc", "gap")


def latest_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`train/<key>`, `eval/<key>` and `<phase>/step` of the newest row of each phase (None values left out)."""
    out: dict[str, Any] = {}
    for phase, keys in (("train", TRAIN_KEYS), ("eval", EVAL_KEYS)):
        latest = [r for r in rows if r.get("phase") == phase]
        if latest:
            out.update({f"{phase}/{k}": latest[-1][k] for k in keys if latest[-1].get(k) is not None})
            out[f"{phase}/step"] = latest[-1]["step"]
    return out
