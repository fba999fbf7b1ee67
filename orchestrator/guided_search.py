"""The Ray Tune searcher of a guided sweep: the policy of analysis/guided.py choosing the grid's next trial.

Tune asks `suggest` for a trial whenever it can start one; the searcher reads the sweep folder (the screen's
gaps, each trial's trial.json), asks `decide`, and answers with the chosen grid point, None (wait: trials are
running and nothing else may start) or FINISHED (the policy stopped). Every decision is appended to
guided.json in the sweep folder with its reason, the fits it saw and, for a trial, the prediction made before
it trained (also written to the trial's prediction.json).

Resuming decides the same: outcomes are read from the trials' own trial.json (never from Tune's callbacks,
which a killed driver loses), a decision depends on the set of outcomes and running trials only, and a trial
decided in guided.json but unknown to the restored Tune (chosen after Tune's last snapshot) is started again
before anything new is decided. Tune restores the searcher from tuner.pkl (this class, with its sweep folder)
and then `restore` gives it the running trials of Tune's snapshot (RAY_TUNE_FACTS.md, custom searchers).
With max_concurrent_trials 1 the decisions are those of a sweep that was never interrupted; with several
trials at once they also depend on which trial finished first.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from orchestrator.sweep_state import GUIDED_FILE, read_guided
from trainer.records import atomic_write_bytes

PREDICTION_FILE = "prediction.json"


def candidates_and_outcomes(state, gaps: dict) -> tuple[list, dict, Any, Any]:
    """The policy's inputs from the sweep folder: candidates (grid order), outcomes of finished trials, the
    policy and the prior law."""
    import numpy as np

    from analysis.guided import Candidate, Outcome, Policy
    from analysis.law import load_law

    settings = state.guided["settings"]
    hours = state.guided.get("hours") or {}
    candidates = []
    for trial_id, p in state.trials.items():
        row = gaps[(p["model"], p["context"])]
        cost = hours.get(trial_id)
        candidates.append(Candidate(trial_id, p.get("family") or row["model_family"], p["model"], p["context"],
                                    p["seed"], float(row["initial_gap"]), float(cost if cost is not None else 1.0)))
    failed = set(read_guided(state.dir).get("failed") or [])
    outcomes = {}
    for c in candidates:
        summary = state.trial_files(c.trial_id).summary()
        if summary is not None and summary.get("status", "completed") == "completed":
            outcomes[c.trial_id] = Outcome(float(summary["initial_gap"]), float(summary["improvement"]))
        elif c.trial_id in failed:
            outcomes[c.trial_id] = Outcome(np.nan, np.nan)
    policy = Policy(settings["goal"], slope_ci_width=settings.get("slope_ci_width"),
                    max_trials=settings.get("max_trials"), max_hours=settings.get("max_hours"),
                    confidence=settings.get("confidence", 0.95))
    prior = load_law(settings["prior_law"]) if settings.get("prior_law") else None
    return candidates, outcomes, policy, prior


class GuidedSearcher(Searcher):
    """Suggests the grid points analysis/guided.py chooses, one decision at a time (module docstring)."""

    def __init__(self, sweep_dir: str):
        super().__init__(metric=None, mode=None)
        self.sweep_dir = sweep_dir
        self.running: dict[str, str] = {}  # Tune's trial id -> grid trial id

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the param space holds constants only (the sweep folder); the searcher needs nothing

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        from analysis.guided import decide
        from orchestrator.guided_screen import screened_gaps
        from orchestrator.sweep_state import SweepState

        state = SweepState.read(Path(self.sweep_dir))
        log = read_guided(state.dir)
        if log.get("stopped"):
            return Searcher.FINISHED
        candidates, outcomes, policy, prior = candidates_and_outcomes(state, screened_gaps(state))
        # A decision Tune never heard of (made after its last snapshot): run it before deciding anything new.
        for entry in log["decisions"]:
            chosen = entry.get("trial_id")
            if entry["action"] == "train" and chosen not in outcomes and chosen not in self.running.values():
                self.running[trial_id] = chosen
                return {"trial_id": chosen}
        decision = decide(candidates, outcomes, set(self.running.values()), policy, prior=prior)
        if decision.action == "wait":
            return None
        entry = {"n": len(log["decisions"]) + 1, "time": time.time(), "action": decision.action,
                 "trial_id": decision.trial_id, "reason": decision.reason, "prediction": decision.prediction,
                 "fits": decision.fits, "spent_trials": decision.spent_trials, "spent_hours": decision.spent_hours,
                 "outcomes": len(outcomes)}
        log["decisions"].append(entry)
        if decision.action == "stop":
            log["stopped"] = decision.reason
            _write(state.dir / GUIDED_FILE, log)
            return Searcher.FINISHED
        files = state.trial_files(decision.trial_id)
        files.dir.mkdir(parents=True, exist_ok=True)
        _write(files.dir / PREDICTION_FILE, {"trial_id": decision.trial_id, "decision": entry["n"],
                                             "screened_gap": next(c.gap for c in candidates
                                                                  if c.trial_id == decision.trial_id),
                                             "prediction": decision.prediction})
        _write(state.dir / GUIDED_FILE, log)
        self.running[trial_id] = decision.trial_id
        return {"trial_id": decision.trial_id}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Never raises: Tune would mark the trial errored and call again (RAY_TUNE_FACTS.md).
        chosen = self.running.pop(trial_id, None) or (result or {}).get("config/trial_id")
        if not error or chosen is None:
            return
        try:
            path = Path(self.sweep_dir) / GUIDED_FILE
            log = read_guided(Path(self.sweep_dir))
            if chosen not in log["failed"]:
                log["failed"].append(chosen)
                _write(path, log)
        except (OSError, ValueError):
            pass

    def save(self, checkpoint_path: str) -> None:
        atomic_write_bytes(Path(checkpoint_path), pickle.dumps({"running": dict(self.running)}))

    def restore(self, checkpoint_path: str) -> None:
        self.running = dict(pickle.loads(Path(checkpoint_path).read_bytes())["running"])


def _write(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=1, default=float) + "\n").encode())
