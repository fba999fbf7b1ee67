"""The layout of a trial's folder (`opsd trial --out DIR`, and each trial's folder in a sweep): the names the
trainer writes and the orchestrator reads, spelled once. It imports only the standard library, so the sweep
driver, `opsd sweep status` and `collect` read a trial's folder without torch.

    config.json                      the resolved settings (a rerun on the same folder must match them)
    steps.parquet                    one row per step and phase
    trial.json                       the summary, once the trial has completed
    progress.json                    what rank 0 is doing now (status, step, phase, a one-line error)
    rollouts/step-NNNNNN.jsonl       each step's rollouts
    checkpoints/step-NNNNNNNN/       complete checkpoints: `trainer_state.json` is written last
    checkpoints/.tmp-step-NNNNNNNN/  a checkpoint being written, or left by a process that died
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"
STEPS = "steps.parquet"
SUMMARY = "trial.json"
PROGRESS = "progress.json"
ROLLOUTS = "rollouts"
CHECKPOINTS = "checkpoints"
# Written last into a checkpoint folder: a `step-N` folder holding it is complete (trainer/checkpoint.py).
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, path), oldest first; temporary folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_DIR.match(child.name)
        if match and child.is_dir() and (child / CHECKPOINT_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


@dataclass(frozen=True)
class TrialFolder:
    """The files of one trial's folder."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / CONFIG

    @property
    def steps(self) -> Path:
        return self.dir / STEPS

    @property
    def summary_path(self) -> Path:
        return self.dir / SUMMARY

    @property
    def progress(self) -> Path:
        return self.dir / PROGRESS

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS

    def rollouts(self, step: int) -> Path:
        return self.dir / ROLLOUTS / f"step-{step:06d}.jsonl"
