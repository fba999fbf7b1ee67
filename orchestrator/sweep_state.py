"""The sweep folder: what `opsd sweep run` writes under `<storage>/<name>/`, and how every command reads it.

    sweep.yaml                the sweep file as given
    sweep.json                the resolved grid: trial ids with their model, context and seed; resources; W&B;
                              `links`: trials completed by another sweep in the same storage, not trained here
                              (trial id -> their folder, relative to the storage folder; orchestrator/shared_trials.py);
                              `guided`: a guided sweep's settings and each trial's planned device-hours
    screen/                   a guided sweep's screen: screen.json (one row per configuration: its initial gap), one
                              folder per model with the screen's rollouts, screen.log (orchestrator/guided_screen.py)
    guided.json               a guided sweep's decisions, each with its reason, its prediction and the fits it saw,
                              and why it stopped (orchestrator/guided_search.py)
    trials/<trial id>/        one folder per grid point, the trial's `--out` folder:
        trial.yaml            its fully resolved trial settings (the input of `opsd trial`)
        config.json, steps.parquet, trial.json, progress.json, rollouts/, checkpoints/   (written by the trial)
        prediction.json       a guided sweep's prediction of the trial's improvement, made before it trained
        attempts.jsonl        one line per attempt event: start (node, GPUs, driver run), pid, end (exit
                              code and a one-line reason, or interrupted/lost with the driver)
        processes.json        the running attempt's process tree, for clean-up after a hard failure
        logs/attempt-N.log    everything the trial's processes printed (vLLM, DeepSpeed, the sandbox)
    tune/                     Ray Tune's experiment state (what `opsd sweep resume` restores)
    wandb/                    W&B runs (offline runs to sync with `wandb sync`; incomplete/ holds those of
                              attempts that ended without finishing their run)
    driver.json               the driver: host, pid, heartbeat, how it ended (orchestrator/driver.py)
    driver.log                Ray's and Tune's own messages
    trials.parquet, steps.parquet   written by `opsd sweep collect`, read by `opsd analyze`

Everything lives under the storage path, not in Tune's node-local trial folders, so a retry on another node
(shared storage) resumes the trial's own checkpoint. Reading the folder needs no Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SweepError
from orchestrator.remote import RemoteSweep, is_uri, mirror_dir
from orchestrator.shared_trials import find_links
from orchestrator.sweep_file import CheckpointRetention, GridPoint, Resources, SweepFile, WandbSettings
from trainer.layout import TrialFolder
from trainer.records import atomic_write_bytes

STATE_FORMAT = 1


@dataclass(frozen=True)
class TrialFiles(TrialFolder):
    """The files of one trial inside the sweep folder: the trial's own (trainer/layout.py) and the sweep's."""

    @property
    def trial_file(self) -> Path:
        return self.dir / "trial.yaml"

    @property
    def processes(self) -> Path:
        return self.dir / "processes.json"

    @property
    def attempts_path(self) -> Path:
        return self.dir / "attempts.jsonl"

    def log(self, attempt: int) -> Path:
        return self.dir / "logs" / f"attempt-{attempt}.log"

    def started(self) -> bool:
        """Whether any attempt of the trial ever started (then its folder holds results to keep)."""
        return self.attempts_path.is_file() or self.config.is_file()

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
                             lost=event.get("lost", False), interrupted=event.get("interrupted", False),
                             reason=event.get("reason"))
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
    # A law-guided sweep: {"settings": the sweep file's `guided:`, "hours": trial id -> the plan's device-hours}
    guided: dict[str, Any] | None = None

    @property
    def tune_dir(self) -> Path:
        return self.dir / "tune"

    @property
    def wandb_dir(self) -> Path:
        """The folder of the sweep's W&B runs (`offline-run-*`)."""
        return self.dir / "wandb"

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
                   trials=raw["trials"], remote=raw.get("remote"), links=raw.get("links") or {},
                   guided=raw.get("guided"))

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


def open_sweep(where: str | Path, role: str = "read") -> SweepState:
    """A sweep folder, or a sweep's URI (its small files are pulled into this machine's mirror first)."""
    if is_uri(str(where)):
        local = mirror_dir(str(where), role)
        RemoteSweep(str(where), local).pull(skip=SMALL_FILES_SKIP)
        return SweepState.read(local)
    return SweepState.read(Path(where))


def check_storage(sweep_dir: Path, remote: str | None = None) -> None:
    """Create the sweep's folder (and its URI's) and check that both can be written."""
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        probe = sweep_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        if remote is not None:
            mirror = RemoteSweep(remote, sweep_dir)
            mirror.fs.create_dir(mirror.root, recursive=True)
            with mirror.fs.open_output_stream(f"{mirror.root}/.write-probe") as out:
                out.write(b"ok")
            mirror.fs.delete_file(f"{mirror.root}/.write-probe")
        probe.unlink()
    except OSError as err:
        where = remote or sweep_dir
        raise SweepError(f"storage: cannot write to {where}: {getattr(err, 'strerror', None) or err}") from None


def prepare_sweep_dir(sweep: SweepFile, points: list[GridPoint], sweep_dir: Path, source: Path,
                      remote: str | None = None, hours: dict[str, float | None] | None = None) -> SweepState:
    """Create (or check) the sweep folder: the resolved grid and one trial file per grid point.

    Re-running the same sweep file continues its folder. Once a trial has started, a different grid or other
    settings in the same folder are refused, so results of two sweeps never mix; before any trial started
    (a sweep refused before it ran, or stopped while every trial was pending) the folder takes the new grid.
    With `remote`, `sweep_dir` mirrors the sweep's URI. A guided sweep records its settings and each trial's
    planned device-hours (`hours`, the budget's unit); its settings cannot change once a trial has started."""
    check_storage(sweep_dir, remote)
    mirror = RemoteSweep(remote, sweep_dir) if remote else None
    if mirror is not None:
        mirror.pull(skip=SMALL_FILES_SKIP)
    trials = {p.trial_id: {"model": p.model, "context": p.context, "seed": p.seed, "model_path": p.config.model.path,
                           "family": p.config.model.family, "size_b": p.config.model.size_b, "steps": p.config.steps}
              for p in points}
    path = sweep_dir / "sweep.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    started = {t.name for t in (sweep_dir / "trials").glob("*") if TrialFiles(t).started()}
    # A link, once made, stays (Ray Tune's grid was built without it); links of a grid given up go with it.
    links = {k: v for k, v in (previous.get("links") or {}).items() if k in trials}
    if remote is None:
        links.update({k: v for k, v in find_links(sweep_dir.parent, sweep.name, points,
                                                   started=started & set(trials)).items() if k not in links})
    state = {"format": STATE_FORMAT, "name": sweep.name, "resources": sweep.trial_resources.model_dump(),
             "wandb": sweep.wandb.model_dump(), "checkpoints": sweep.checkpoints.model_dump(),
             "max_failures": sweep.max_failures, "max_concurrent_trials": sweep.max_concurrent_trials,
             "trials": trials, "remote": remote, "links": links,
             "guided": ({"settings": sweep.guided.model_dump(mode="json"), "hours": hours or {}}
                        if sweep.guided is not None else None)}
    old_guided = previous.get("guided")
    if old_guided and state["guided"] and old_guided["settings"] == state["guided"]["settings"]:
        state["guided"]["hours"] = old_guided["hours"]  # the budget's costs stay those the decisions used
    if previous:
        if started and old_guided != state["guided"]:
            raise SweepError(f"{sweep_dir} ran with other guided: settings (its decisions depend on them); give this "
                             "sweep another name or storage")
        if started and previous.get("trials") != trials:
            raise SweepError(f"{sweep_dir} holds another sweep's grid, whose trials have run; give this sweep "
                             "another name or storage")
        for point in points:
            written = sweep_dir / "trials" / point.trial_id / "trial.yaml"
            if point.trial_id in started and point.trial_id not in links and written.is_file() \
                    and yaml.safe_load(written.read_text()) != point.config.model_dump(mode="json"):
                raise SweepError(f"trial {point.trial_id} in {sweep_dir} was started with other settings; "
                                 "give this sweep another name or storage")
        if previous.get("trials") != trials:
            _forget_unstarted_grid(sweep_dir, set(trials), mirror)
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


def _forget_unstarted_grid(sweep_dir: Path, keep: set[str], mirror: RemoteSweep | None) -> None:
    """Drop what an earlier grid in this folder left before any of its trials started: the trial folders
    outside the new grid and Ray Tune's state (a restore would run the old grid)."""
    for trial_dir in (sweep_dir / "trials").glob("*"):
        if trial_dir.name not in keep:
            shutil.rmtree(trial_dir, ignore_errors=True)
            if mirror is not None:
                mirror.delete(f"trials/{trial_dir.name}")
    shutil.rmtree(sweep_dir / "tune", ignore_errors=True)
    if mirror is not None:
        mirror.delete("tune")


GUIDED_FILE = "guided.json"


def read_guided(sweep_dir: Path) -> dict[str, Any]:
    """A guided sweep's guided.json: {"decisions": [...], "failed": [trial ids], "stopped": reason or null}."""
    path = Path(sweep_dir) / GUIDED_FILE
    if not path.is_file():
        return {"decisions": [], "failed": [], "stopped": None}
    return json.loads(path.read_text())


def read_progress(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class StepsUnreadable(SweepError):
    """A trial's steps.parquet that exists but cannot be read: its steps would be lost without a word."""


def read_step_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a trial's steps.parquet ([] before its first step). The trial replaces the file atomically,
    so one that cannot be read is damaged (a disk that filled up, a copy cut short): StepsUnreadable."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StepsUnreadable(f"{path}: cannot read this trial's steps ({first}); restore the file from a copy "
                              "or move it aside (the trial's steps are then missing from steps.parquet)") from None


def close_open_attempts(state: SweepState, reason: str) -> list[str]:
    """After the driver stopped (its trials die with it): an `end` event, marked interrupted, for every attempt
    still open, so that `status` shows it ended; returns the trials that had one."""
    closed = []
    for trial_id in state.trials:
        files = state.trial_files(trial_id)
        for attempt in files.attempts():
            if "ended" not in attempt and "started" in attempt:
                files.append_attempt({"attempt": attempt["attempt"], "event": "end", "time": time.time(),
                                      "exit_code": None, "interrupted": True, "reason": reason,
                                      "seconds": round(time.time() - attempt["started"], 1)})
                closed.append(trial_id)
    return closed


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
