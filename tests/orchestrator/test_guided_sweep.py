"""A real guided sweep on this machine: six contexts of a tiny model screened, then trials chosen one at a time by
the searcher (Ray Tune, real trials), a refit after each, the driver SIGKILLed mid-way and the sweep resumed,
and a stop by the policy's rule (its trial budget) with the reason printed.

The tiny model is fitted to copy the solution it finds in the `llm_peer_hints` prompt, so that context's gap
stands out from the others'. The decisions of the resumed sweep are checked against the policy replayed on the
same outcomes, one trial at a time: what a sweep that was never interrupted decides from them.

Slow (half an hour on 2 shared cores): `bash scripts/test.sh -m slow tests/orchestrator/test_guided_sweep.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.guided import decide
from analysis.predicted import check_predictions
from orchestrator.guided_search import candidates_and_outcomes
from orchestrator.guided_screen import screened_gaps
from orchestrator.sweep_state import SweepState, read_guided
from tests.orchestrator.test_sweep_run import OPSD, attempts, trial_env
from tests.trainer.copy_task import copy_task

# Each real trial takes minutes here (an engine and DeepSpeed start): well past the default 900 s in all.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

SWEEP = f"guided-{os.getpid()}"
CONTEXTS = ["none", "expert_preamble", "feedback", "llm_peer_hints", "own_solution_feedback",
            "peer_solution_feedback"]
# The first three configurations set a line; the fourth is trained with a prediction made before it, which the
# report checks against its outcome.
MAX_TRIALS = 4


def sweep_file(root: Path, model: Path, data: Path) -> Path:
    path = root / "guided.yaml"
    path.write_text(yaml.safe_dump({
        "name": SWEEP, "storage": str(root / "storage"),
        "models": [{"path": str(model), "label": "copier", "family": "tiny", "size_b": 0.001}],
        "contexts": CONTEXTS, "seeds": [0, 1], "data": {"source": "jsonl", "path": str(data)},
        "resources": {"gpus": 0, "cpus": 1, "sandbox_workers": 1}, "max_concurrent_trials": 1, "max_failures": 1,
        "wandb": {"mode": "disabled"}, "checkpoints": {"when_done": "none"},
        # An interval no tiny sweep reaches: the trial budget stops it.
        "guided": {"goal": "law", "slope_ci_width": 1.0e-6, "max_trials": MAX_TRIALS},
        "trial": {"steps": 1, "context": {"max_teacher_prompt_tokens": 1024},
                  "rollout": {"prompts_per_step": 4, "n_samples": 2, "max_response_tokens": 16,
                              "max_prompt_tokens": 512},
                  "optim": {"lr": 1.0e-3, "mini_batch_size": 4, "micro_batch_size": 4},
                  "teacher": {"ema_rate": 0.0}, "eval": {"every_steps": 1, "n_samples": 1, "teacher_n_samples": 1}},
    }))
    return path


def completed(sweep_dir: Path) -> list[str]:
    trials = sweep_dir / "trials"
    return [d.name for d in trials.iterdir() if (d / "trial.json").is_file()] if trials.is_dir() else []


@pytest.fixture(scope="module")
def guided_sweep(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("guided")
    data, model = copy_task(root, tiny_model_dir)
    path = sweep_file(root, model, data)
    sweep_dir = root / "storage" / SWEEP
    started = time.monotonic()
    with open(root / "run.log", "w") as log:
        driver = subprocess.Popen([*OPSD, "sweep", "run", str(path), "--num-cpus", "2"], stdout=log,
                                  stderr=subprocess.STDOUT, env=trial_env(), start_new_session=True)
    try:
        # Killed once the first trial has completed and the second (chosen after a refit) is running.
        deadline = time.monotonic() + 2400
        while True:
            assert driver.poll() is None, (root / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (root / "run.log").read_text()[-3000:]
            running = [d for d in (sweep_dir / "trials").iterdir() if any(e["event"] == "pid" for e in attempts(d))
                       and not (d / "trial.json").exists()] if (sweep_dir / "trials").is_dir() else []
            if len(completed(sweep_dir)) >= 1 and running:
                break
            time.sleep(0.5)
        killed_during = running[0].name
        decisions_at_kill = read_guided(sweep_dir)["decisions"]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    with open(root / "resume.log", "w") as log:
        resumed = subprocess.run([*OPSD, "sweep", "resume", str(sweep_dir), "--num-cpus", "2"], stdout=log,
                                 stderr=subprocess.STDOUT, env=trial_env(), timeout=2400)
    status = subprocess.run([*OPSD, "sweep", "status", str(sweep_dir)], capture_output=True, text=True, timeout=120)
    analyze = subprocess.run([*OPSD, "analyze", str(sweep_dir), "--out", str(root / "report"), "--bootstrap", "0"],
                             capture_output=True, text=True, timeout=300)
    return {"root": root, "dir": sweep_dir, "resume_code": resumed.returncode, "killed_during": killed_during,
            "decisions_at_kill": decisions_at_kill, "status": status, "analyze": analyze,
            "seconds": time.monotonic() - started}


def test_every_context_is_screened_before_any_trial(guided_sweep):
    state = SweepState.read(guided_sweep["dir"])
    gaps = screened_gaps(state)
    assert gaps is not None and sorted(c for _, c in gaps) == sorted(CONTEXTS)
    screen_done = (guided_sweep["dir"] / "screen" / "screen.json").stat().st_mtime
    first_start = min(e["time"] for d in (guided_sweep["dir"] / "trials").iterdir() for e in attempts(d)
                      if e["event"] == "start")
    assert screen_done < first_start
    # The copier solves what the hint gives it: that context's gap is the largest, and the first trial.
    assert max(gaps.values(), key=lambda r: r["initial_gap"])["context"] == "llm_peer_hints"
    assert read_guided(guided_sweep["dir"])["decisions"][0]["trial_id"] == "copier-llm_peer_hints-s0"


def test_the_searcher_chose_the_trials_and_stopped_by_its_rule(guided_sweep):
    log_text = " ".join((guided_sweep["root"] / "resume.log").read_text().split())
    assert guided_sweep["resume_code"] == 0, log_text[-3000:]
    log = read_guided(guided_sweep["dir"])
    trained = [d for d in log["decisions"] if d["action"] == "train"]
    assert len(trained) == MAX_TRIALS and sorted(completed(guided_sweep["dir"])) == sorted(d["trial_id"] for d in trained)
    assert log["stopped"].startswith(f"budget: the next trial") and f"would pass {MAX_TRIALS} trials" in log["stopped"]
    assert f"stopped after {MAX_TRIALS} trials: {log['stopped']}" in log_text  # printed by the resumed driver
    # A refit after each completed trial: each decision saw one more outcome, and its fits once there is a line.
    assert [d["outcomes"] for d in log["decisions"]] == list(range(len(log["decisions"])))
    assert all(d["fits"] for d in log["decisions"][2:])
    status = " ".join(guided_sweep["status"].stdout.split())
    assert f"{MAX_TRIALS}/12 done" in status and f"{12 - MAX_TRIALS} skipped" in status


def test_the_resumed_sweep_decided_as_one_never_interrupted(guided_sweep):
    state = SweepState.read(guided_sweep["dir"])
    log = read_guided(state.dir)
    # The kill came mid-way: decisions made before it are kept as they were, and the running trial was resumed.
    before = guided_sweep["decisions_at_kill"]
    assert 2 <= len(before) < len(log["decisions"])
    assert [d["reason"] for d in log["decisions"][:len(before)]] == [d["reason"] for d in before]
    killed = [e for e in attempts(state.dir / "trials" / guided_sweep["killed_during"]) if e["event"] == "end"]
    assert any(e.get("lost") or e.get("interrupted") for e in killed), killed
    # Replay: decision k is the policy's on the outcomes of the first k - 1 trials.
    candidates, outcomes, policy, prior = candidates_and_outcomes(state, screened_gaps(state))
    trained = [d["trial_id"] for d in log["decisions"] if d["action"] == "train"]
    for k, entry in enumerate(log["decisions"]):
        replay = decide(candidates, {t: outcomes[t] for t in trained[:k]}, (), policy, prior=prior)
        assert (replay.action, replay.trial_id, replay.reason) == (entry["action"], entry["trial_id"], entry["reason"])


def test_the_report_checks_predictions_and_counts_the_hours(guided_sweep):
    analyze = guided_sweep["analyze"]
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    report = (guided_sweep["root"] / "report" / "report.md").read_text()
    assert "## Predictions checked against outcomes" in report
    predicted = check_predictions(pd.read_parquet(guided_sweep["dir"] / "trials.parquet"), confidence=0.95)
    assert predicted is not None and predicted["n"] >= 1, report
    for row in predicted["rows"].itertuples():  # each predicted trial's row: its interval, its realized improvement
        assert f"{row.predicted_improvement:+.3f} [{row.pi_lo:+.3f}, {row.pi_hi:+.3f}] | {row.improvement:+.3f}" in report
    trials = pd.read_parquet(guided_sweep["dir"] / "trials.parquet")
    hours = trials["planned_hours"]
    spent = hours[trials["status"].eq("completed")].sum()
    assert f"Device-hours: **{spent:.3g} spent on {MAX_TRIALS} trial(s), against {hours.sum():.3g} for the full grid of 12**" \
        in report
    print(f"guided sweep: {guided_sweep['seconds']:.0f} s")  # shown with -s
