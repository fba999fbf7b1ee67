"""Atomic trial checkpoints: a retried trial resumes where the last complete checkpoint left it.

Layout under a trial's checkpoint folder:

    step-00000007/
        student/engine/...        DeepSpeed checkpoint: weights, optimizer state (ZeRO partitions), counters
        teacher.pt                EMA teacher weights by HF name
        rng-rank000.pt            python / numpy / torch (and CUDA) RNG states, one file per rank
        trainer_state.json        format, step, world size, data-sampler state, caller metadata (JSON)
    .tmp-step-00000008/           a checkpoint being written (or left by a process that died): ignored

Every rank writes its part into `.tmp-step-N`; rank 0 then fsyncs the files and renames the folder to
`step-N` in one `os.rename`, so a `step-N` folder is complete or absent. Resuming restores everything in
fresh objects built with the same config; on CPU in float32 the continuation is bit-for-bit the run that
was never interrupted (tested).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.distributed import get_rank, wait_for_main
from trainer.errors import CheckpointError
from trainer.layout import CHECKPOINT_DIR, CHECKPOINT_STATE, checkpoint_dir_name, list_checkpoints
from trainer.student import Student
from trainer.teacher import EmaTeacher

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class ResumeState:
    """What a trial needs besides the student and teacher to continue after `step`."""

    step: int
    sampler_state: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global) and torch RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, *, step: int, student: Student, teacher: EmaTeacher,
                    sampler_state: Any = None, metadata: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep_last`; every rank calls. Returns its path.

    `sampler_state` and `metadata` must be JSON values (e.g. `numpy.random.Generator.bit_generator.state`).
    Saving a step that already exists replaces it. Rank 0 writes the teacher and fsyncs the whole folder alone
    (minutes for a large model on shared storage): the other ranks wait in `wait_for_main`, whose timeout is
    the long one, not the training collectives'.
    """
    if step < 0 or keep_last < 1:
        raise CheckpointError(f"bad checkpoint request: step={step} keep_last={keep_last}")
    root = Path(root)
    rank = get_rank()
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{checkpoint_dir_name(step)}"
    try:
        state_json = json.dumps({"format": CHECKPOINT_FORMAT, "step": step, "world_size": student.dist.world_size,
                                 "sampler_state": sampler_state, "metadata": metadata or {}}, indent=1)
    except TypeError as err:
        raise CheckpointError(f"sampler_state and metadata must be JSON values: {err}") from None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a process that died mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    wait_for_main()
    student.save_checkpoint(tmp / "student")
    torch.save(capture_rng_state(), tmp / f"rng-rank{rank:03d}.pt")
    if rank == 0:
        torch.save(teacher.state_dict(), tmp / "teacher.pt")
        (tmp / CHECKPOINT_STATE).write_text(state_json)
    wait_for_main()
    if rank == 0:
        _fsync_tree(tmp)
        replaced = None
        if final.exists():
            replaced = root / f".old-{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_dir(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    wait_for_main()
    return final


def load_checkpoint(path: str | Path, *, student: Student, teacher: EmaTeacher, restore_rng: bool = True) -> ResumeState:
    """Restore a checkpoint into a fresh student and teacher (same config); every rank calls.

    With `restore_rng` this rank's python, numpy and torch RNG states are restored as well.
    """
    path = Path(path)
    state_file = path / CHECKPOINT_STATE
    if not CHECKPOINT_DIR.match(path.name) or not state_file.is_file():
        raise CheckpointError(f"not a complete checkpoint (a step-NNNNNNNN folder with {CHECKPOINT_STATE}): {path}")
    state = json.loads(state_file.read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')} (this code reads {CHECKPOINT_FORMAT})")
    if state["world_size"] != student.dist.world_size:
        raise CheckpointError(f"{path}: written by {state['world_size']} ranks, resuming with {student.dist.world_size}")
    student.load_checkpoint(path / "student")
    teacher.load_state_dict(torch.load(path / "teacher.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        rng_file = path / f"rng-rank{get_rank():03d}.pt"
        restore_rng_state(torch.load(rng_file, weights_only=True))
    return ResumeState(step=int(state["step"]), sampler_state=state["sampler_state"], metadata=state["metadata"],
                       path=path)
