"""`opsd sweep collect`: every trial's steps exactly once, or a one-line refusal naming the file that cannot be
read; never a trial's steps silently missing from steps.parquet."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from tests.orchestrator.test_sweep_status import make_sweep, trial_ids, write_steps

OPSD = [sys.executable, "-m", "orchestrator.cli"]


def test_collect_gathers_every_trials_steps(tmp_path):
    state = make_sweep(tmp_path)
    for k, trial in enumerate(trial_ids(state)):
        write_steps(state.trial_files(trial).steps, [{"step": 0, "phase": "eval", "gap": 0.1 * k},
                                                     {"step": 1, "phase": "train", "loss": 1.0 + k}])
    out = subprocess.run([*OPSD, "sweep", "collect", str(state.dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    steps = pd.read_parquet(state.dir / "steps.parquet")
    assert sorted(steps.trial_id) == sorted(trial_ids(state) * 2)
    assert sorted(steps.loss.dropna()) == [1.0, 2.0, 3.0]


def test_a_trial_whose_steps_cannot_be_read_is_refused_in_one_line_naming_the_file(tmp_path):
    state = make_sweep(tmp_path)
    good, damaged, _ = trial_ids(state)
    write_steps(state.trial_files(good).steps, [{"step": 1, "phase": "train", "loss": 0.5}])
    broken = state.trial_files(damaged).steps
    write_steps(broken, [{"step": 1, "phase": "train", "loss": 0.5}])
    broken.write_bytes(broken.read_bytes()[:40])  # cut short, as by a full disk or an interrupted copy
    out = subprocess.run([*OPSD, "sweep", "collect", str(state.dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"opsd sweep: error: {broken}: cannot read this trial's steps")
    assert not (state.dir / "steps.parquet").exists()  # nothing written that would lack the trial's steps
    # status still shows the sweep, with the damaged file named on the trial's row.
    status = subprocess.run([*OPSD, "sweep", "status", str(state.dir)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and f"{damaged}: {broken}: cannot read" in " ".join(status.stdout.split())


def test_status_collect_and_plan_read_a_sweep_without_torch_ray_or_vllm():
    """A trial folder's layout (trainer/layout.py) is shared with the trainer without its stack: the sweep's
    read-only commands start fast and work on a machine without it."""
    code = ("import sys; import orchestrator.sweep_status, orchestrator.collect, orchestrator.plan, trainer.layout; "
            "print(sorted(m for m in ('torch', 'ray', 'vllm', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
