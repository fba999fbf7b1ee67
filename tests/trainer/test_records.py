"""What a trial writes besides its metrics: progress.json while it runs, and the code version it ran."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from trainer import records
from trainer.config import TrialConfig
from trainer.records import Progress, code_version, error_line, mark_failed


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_progress_follows_the_phase_timer(tmp_path, monkeypatch):
    clock = iter(range(100, 200))
    monkeypatch.setattr(records.time, "time", lambda: float(next(clock)))
    path = tmp_path / "progress.json"
    progress = Progress(path, steps=3)
    assert read(path) == {"status": "running", "step": 0, "steps": 3, "phase": "setup", "phase_started": 100.0,
                          "started": 100.0, "updated": 100.0}
    progress.step(2)
    timer = progress.timer()
    with timer("rollout"):
        assert read(path) == {"status": "running", "step": 2, "steps": 3, "phase": "rollout",
                              "phase_started": 101.0, "started": 100.0, "updated": 101.0}
    with timer("optimizer"):
        pass
    assert read(path)["phase"] == "optimizer" and read(path)["phase_started"] == 102.0
    assert set(timer.metrics()) == {"time/rollout_s", "time/optimizer_s"}
    progress.completed()
    assert read(path)["status"] == "completed" and read(path)["updated"] == 103.0


def test_phase_timer_sums_each_token_count_over_a_step():
    timer = records.PhaseTimer()
    timer.add_tokens(teacher_forward=10, teacher_forward_padded=12)
    timer.add_tokens(teacher_forward=5, teacher_forward_padded=8)
    timer.add_tokens(rollout_generated=7)
    assert timer.metrics() == {"tokens/teacher_forward": 15, "tokens/teacher_forward_padded": 20,
                               "tokens/rollout_generated": 7}
    assert {name.removeprefix("tokens/") for name in timer.metrics()} <= set(records.TOKEN_COLUMNS)


def test_a_failure_is_one_line_and_the_first_cause_is_kept(tmp_path):
    path = tmp_path / "progress.json"
    progress = Progress(path, steps=1)
    progress.failed(RuntimeError("the engine died\nTraceback ..."))
    assert read(path)["status"] == "failed" and read(path)["error"] == "RuntimeError: the engine died"
    mark_failed(path, ValueError("a later consequence"))
    assert read(path)["error"] == "RuntimeError: the engine died"
    other = tmp_path / "other.json"
    mark_failed(other, KeyboardInterrupt())
    assert read(other)["status"] == "failed" and read(other)["error"] == "KeyboardInterrupt"
    assert len(error_line(ValueError("x" * 2000))) == 500


def test_other_ranks_write_nothing(tmp_path):
    progress = Progress(None, steps=1)
    with progress.timer()("rollout"):
        pass
    progress.completed()
    assert list(tmp_path.iterdir()) == []


def test_code_version_is_the_checkout_commit():
    root = Path(records.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert code_version() == head.stdout.strip() + ("-dirty" if dirty.strip() else "")


def test_code_version_without_git_is_the_package_version(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(records.subprocess, "run", no_git)
    assert re.fullmatch(r"opsd-sweep==\d+\.\d+\.\d+.*", code_version())


def test_a_trial_that_fails_says_so_in_progress_json(tmp_path):
    from trainer.trial import run_trial

    cfg = TrialConfig.model_validate({"model": {"path": str(tmp_path / "no-such-model")}, "steps": 1})
    with pytest.raises(Exception, match="no-such-model"):
        run_trial(cfg, tmp_path / "out")
    state = read(tmp_path / "out" / "progress.json")
    assert state["status"] == "failed" and state["phase"] == "setup" and "no-such-model" in state["error"]
    assert "\n" not in state["error"] and not (tmp_path / "out" / "trial.json").exists()


def test_phase_timer_records_each_phases_gpu_memory_in_a_cuda_process(monkeypatch):
    """On a GPU the step rows carry each phase's peak and in-use GPU memory (what `opsd sweep plan` estimates);
    a CPU process writes no such column and never initialises CUDA."""
    import torch

    from trainer.records import PhaseTimer

    timer = PhaseTimer()
    with timer("rollout"):
        pass
    assert not any(key.startswith("memory/") for key in timer.metrics())

    allocated = iter([3 * 2**30, 5 * 2**30, 4 * 2**30])
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(allocated))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (70 * 2**30, 80 * 2**30))
    timer = PhaseTimer()
    for phase in ("teacher_forward", "student_forward_backward", "teacher_forward"):
        with timer(phase):
            pass
    metrics = timer.metrics()
    assert len(resets) == 3  # each phase's own peak, not the process's
    assert metrics["memory/teacher_forward_peak_gib"] == 4.0  # the larger of its two calls
    assert metrics["memory/student_forward_backward_peak_gib"] == 5.0
    assert metrics["memory/teacher_forward_used_gib"] == 10.0


def test_the_data_summary_goes_into_trial_json_and_a_line_at_the_start(tmp_path):
    cfg = TrialConfig(rollout={"max_prompt_tokens": 2048}, model={"size_b": 8})
    data = {"data/problems_loaded": 175, "data/prompts_skipped_too_long": 2, "data/skipped_ids": ["lcb/1", "lcb/9"],
            "data/split": "tests", "data/train_problems": 173, "data/val_problems": 173, "data/train_tests": 900,
            "data/val_tests": 1800, "data/problems_without_hint": 11}
    initial = {"student_acc": 0.3, "teacher_acc": 0.5, "student_acc_t1": 0.25, "gap": 0.25, "student_test_frac": 0.4,
               "teacher_test_frac": 0.6, "gap_test_frac": 0.25}
    summary = records.trial_summary(cfg, tmp_path, initial, {**initial, "student_acc": 0.4}, 10.0, data)
    assert {k: summary[k] for k in data} == data and summary["improvement"] == pytest.approx(0.1)
    assert records.data_line(cfg, data) == (
        "data: 175 problems loaded, 2 dropped (student prompt longer than rollout.max_prompt_tokens=2,048: "
        "lcb/1, lcb/9); 173 train problems (900 tests), 173 validation problems (1800 tests); 11 without a hint")
