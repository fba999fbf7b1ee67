"""Bootstrap over seeds: reproducible, centred on the fit, and resampling only within configurations."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis.bootstrap import attach_bootstrap, bootstrap_draws
from analysis.fit import fit_law
from analysis.results import completed_trials
from tests.analysis.conftest import noisy_trials, trials_from


@pytest.fixture
def fitted(rng):
    trials = completed_trials(noisy_trials(rng))
    return trials, fit_law(trials)


def test_same_seed_same_draws_other_seed_other_draws(fitted):
    trials, fit = fitted
    a = bootstrap_draws(trials, fit, n_resamples=60, seed=3)
    b = bootstrap_draws(trials, fit, n_resamples=60, seed=3)
    c = bootstrap_draws(trials, fit, n_resamples=60, seed=4)
    for name in ("fam_a", "fam_b", "pooled"):
        pd.testing.assert_frame_equal(a[name], b[name])
        assert not np.allclose(a[name]["slope"], c[name]["slope"])


@pytest.mark.parametrize("unit,weighted,by_seeds", [("configuration", False, False), ("seed", False, False),
                                                    ("configuration", True, False), ("configuration", False, True)])
def test_intervals_contain_the_point_estimates(rng, unit, weighted, by_seeds):
    trials = completed_trials(noisy_trials(rng))
    fit = fit_law(trials, unit=unit, weighted=weighted, by_seeds=by_seeds)
    law = attach_bootstrap(fit.law, bootstrap_draws(trials, fit, n_resamples=300, seed=0), seed=0)
    assert law.settings["bootstrap"] == 300 and law.settings["seed"] == 0
    for line in [*law.families.values(), law.pooled]:
        boot = line.bootstrap
        assert boot["n_resamples"] == 300 and boot["n_failed"] == 0
        assert boot["slope_ci"][0] < line.slope < boot["slope_ci"][1]
        assert boot["intercept_ci"][0] < line.intercept < boot["intercept_ci"][1]
        assert boot["loo_rmse_ci"][0] < boot["loo_rmse_ci"][1]


def test_configurations_whose_seeds_agree_add_no_bootstrap_variance():
    # Every configuration's seeds are identical: any resample reproduces the data, so the interval is a point.
    gaps = [0.0, 0.1, 0.15, 0.2, 0.3]
    trials = completed_trials(trials_from([(f"c{i}", [g] * 3, [0.01 + 0.6 * g + 0.01 * (-1) ** i] * 3)
                                           for i, g in enumerate(gaps)]))
    fit = fit_law(trials)
    draws = bootstrap_draws(trials, fit, n_resamples=50, seed=1)["fam"]
    assert draws["slope"].to_numpy() == pytest.approx(np.full(50, fit.law.families["fam"].slope), abs=1e-12)
    assert draws["loo_r2"].to_numpy() == pytest.approx(np.full(50, fit.law.families["fam"].loo_r2), abs=1e-12)


def test_resampling_stays_within_each_configuration():
    # Only configuration c2 has seed noise. Resampling within configurations can only change c2's mean to the
    # mean of a multiset of c2's own three seeds: every bootstrap slope is one of those 10 candidate fits.
    gaps = [0.0, 0.1, 0.2, 0.3]
    c2_seeds = np.array([0.05, 0.20, 0.11])
    points = [(f"c{i}", [g] * 3, [0.6 * g] * 3) for i, g in enumerate(gaps)]
    points[2] = ("c2", [0.2] * 3, c2_seeds)
    trials = completed_trials(trials_from(points))
    fit = fit_law(trials)
    slopes = bootstrap_draws(trials, fit, n_resamples=200, seed=5)["fam"]["slope"].to_numpy()
    candidates = []
    for combo in itertools.combinations_with_replacement(c2_seeds, 3):
        y = np.array([0.0, 0.06, np.mean(combo), 0.18])
        X = np.column_stack([np.ones(4), gaps])
        candidates.append(np.linalg.lstsq(X, y, rcond=None)[0][1])
    candidates = np.array(candidates)
    assert all(np.min(np.abs(candidates - s)) < 1e-12 for s in slopes)
    assert len(np.unique(np.round(slopes, 12))) > 3  # the resamples do vary c2


def test_bootstrap_draw_matches_a_refit_on_the_resampled_trials(fitted):
    # One resample, replayed: the same seeds drawn from the same generator, then the full fit on them.
    trials, fit = fitted
    draws = bootstrap_draws(trials, fit, n_resamples=1, seed=11)
    ordered = trials.sort_values(["model", "context", "seed"]).reset_index(drop=True)
    keys = (ordered["model"] + "|" + ordered["context"]).to_numpy()
    _, code = np.unique(keys, return_inverse=True)
    counts = np.bincount(code)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = starts[code] + np.random.default_rng(11).integers(0, counts[code])
    resampled = ordered.assign(initial_gap=ordered["initial_gap"].to_numpy()[idx],
                               improvement=ordered["improvement"].to_numpy()[idx])
    refit = fit_law(resampled).law
    for name in ("fam_a", "fam_b"):
        assert draws[name]["slope"].iloc[0] == pytest.approx(refit.families[name].slope, rel=1e-10)
        assert draws[name]["loo_r2"].iloc[0] == pytest.approx(refit.families[name].loo_r2, rel=1e-10)
    assert draws["pooled"]["intercept"].iloc[0] == pytest.approx(refit.pooled.intercept, rel=1e-10)


def test_progress_is_reported_up_to_the_total(fitted):
    trials, fit = fitted
    calls = []
    bootstrap_draws(trials, fit, n_resamples=5, seed=0, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_delayed_progress_bar_stays_hidden_for_quick_work_and_shows_for_slow():
    from analysis.cli import _DelayedProgress

    quick = _DelayedProgress("x", delay=60.0)
    for done in range(4):
        quick(done, 3)
    assert quick.bar is None
    slow = _DelayedProgress("x", delay=0.0)
    slow(1, 3)
    assert slow.bar is not None and slow.bar.tasks[0].completed == 1
    slow.close()
