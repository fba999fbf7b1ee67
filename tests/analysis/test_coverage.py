"""Intervals mean what they say: on results drawn from a known law, the 95% intervals cover the truth about
95% of the time."""

from __future__ import annotations

import numpy as np

from analysis.fit import fit_law
from analysis.predict import predict_improvement
from analysis.results import completed_trials
from analysis.synthetic import make_trials

SLOPE, INTERCEPT = 0.8, -0.003
NOISE = 0.015
MODELS = (("M-8B", "fam", 8.0),)
CONTEXTS = ("none", "expert_preamble", "feedback", "llm_peer_hints", "own_solution_feedback",
            "peer_solution_feedback")


def test_slope_interval_and_prediction_interval_cover_the_true_law_about_95_percent():
    # The gap is measured without noise here: the regression conditions on measured gaps, and noise in them
    # would bias the slope towards zero (errors in variables), which no OLS interval accounts for.
    rng = np.random.default_rng(2024)
    n_reps, n_seeds = 400, 3
    slope_hits = pi_hits = 0
    for _ in range(n_reps):
        trials = make_trials(rng, models=MODELS, contexts=CONTEXTS, n_seeds=n_seeds,
                             laws={"fam": (INTERCEPT, SLOPE)}, gap_noise=0.0, improvement_noise=NOISE,
                             n_failed=0)
        law = fit_law(completed_trials(trials)).law
        lo, hi = law.families["fam"].slope_ci
        slope_hits += lo <= SLOPE <= hi
        # A new, untrained configuration at gap 0.12: its mean improvement over n_seeds seeds.
        new_gap = 0.12
        observed = INTERCEPT + SLOPE * new_gap + rng.normal(0, NOISE, n_seeds).mean()
        pred = predict_improvement(law, "fam", [new_gap]).iloc[0]
        pi_hits += pred["pi_lo"] <= observed <= pred["pi_hi"]
    assert 0.92 <= slope_hits / n_reps <= 0.98
    assert 0.92 <= pi_hits / n_reps <= 0.98
