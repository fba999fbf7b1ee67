"""A sweep's checkpoint retention (orchestrator/trainable.py) on checkpoint folders laid out as the trainer writes
them: only complete checkpoints count, the newest survive, and a finished trial keeps what `when_done` says."""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.sweep_file import CheckpointRetention
from orchestrator.trainable import prune_checkpoints, retain_when_done


def _checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "optimizer": {"exp_avg": torch.ones(2)}},
               path / "mp_rank_00_model_states.pt")
    if complete:  # the trainer writes its state file last
        (path / "trainer_state.json").write_text("{}")
    return path


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 9, 10):
        _checkpoint(tmp_path, step)
    unfinished = _checkpoint(tmp_path, 11, complete=False)
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000009", "step-00000010", unfinished.name]


def test_when_done_weights_keeps_the_last_checkpoint_without_optimizer_state(tmp_path):
    for step in (1, 2):
        _checkpoint(tmp_path, step)
    retain_when_done(tmp_path, CheckpointRetention(keep_last=2, when_done="weights"))
    (last,) = tmp_path.iterdir()
    assert last.name == "step-00000002" and (last / "WEIGHTS_ONLY").is_file()
    state = torch.load(last / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["optimizer"] is None and torch.equal(state["module"]["w"], torch.ones(2))


def test_when_done_none_and_full(tmp_path):
    _checkpoint(tmp_path / "a", 1)
    _checkpoint(tmp_path / "b", 1)
    _checkpoint(tmp_path / "b", 2)
    retain_when_done(tmp_path / "a", CheckpointRetention(keep_last=1, when_done="none"))
    retain_when_done(tmp_path / "b", CheckpointRetention(keep_last=1, when_done="full"))
    assert not (tmp_path / "a").exists() and len(list((tmp_path / "b").iterdir())) == 2
