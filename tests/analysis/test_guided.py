"""The guided sweep's decisions (analysis/guided.py) on grids small enough to check by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats

from analysis.guided import MIN_NOISE_DF, Candidate, Outcome, Policy, decide, expected_width, run_sequential
from analysis.law import Law, LineLaw

GAPS = {"c0": 0.0, "c1": 0.04, "c2": 0.08, "c3": 0.12, "c4": 0.15, "c5": 0.2}


def grid(gaps=GAPS, *, family="fam", model="m", seeds=(0, 1, 2), cost=10.0) -> list[Candidate]:
    return [Candidate(f"{model}-{ctx}-s{s}", family, model, ctx, s, g, cost) for ctx, g in gaps.items() for s in seeds]


def line_outcomes(candidates, *, slope=0.8, intercept=0.01, noise=None, rng=None) -> dict[str, Outcome]:
    """Each trial's outcome: its configuration's screened gap, and the law's improvement plus `noise`."""
    out = {}
    for c in candidates:
        e = 0.0 if noise is None else rng.normal(0, noise)
        out[c.trial_id] = Outcome(c.gap, intercept + slope * c.gap + e)
    return out


def test_expected_width_is_the_seed_weighted_fits_interval():
    x, n = [0.0, 0.1, 0.2], [1, 1, 1]
    # Equal seeds: 2·t(1)·sqrt(σ²/Sxx) with σ² = τ² = 4e-4, Sxx = 0.02.
    want = 2 * stats.t.ppf(0.975, 1) * np.sqrt(4e-4 / 0.02)
    assert expected_width(x, n, tau2=4e-4, s2=0.0, confidence=0.95) == pytest.approx(want)
    # Unequal seeds: the WLS slope's variance (X'WX)⁻¹X'WVWX(X'WX)⁻¹, W = diag(n), V = diag(τ² + s²/n).
    for n, tau2 in [([3, 1, 1], 1e-4), ([1, 4, 2], 0.0), ([2, 1, 3], 5e-4)]:
        design = sm.add_constant(np.array(x))
        w, v = np.diag(n), np.diag(tau2 + 9e-4 / np.array(n, dtype=float))
        bread = np.linalg.inv(design.T @ w @ design)
        var_b = (bread @ design.T @ w @ v @ w @ design @ bread)[1, 1]
        assert expected_width(x, n, tau2=tau2, s2=9e-4, confidence=0.95) == pytest.approx(
            2 * stats.t.ppf(0.975, 1) * np.sqrt(var_b))
    # Without τ², every seed is a point at its configuration's gap: s²/Σ n_i(x_i − x̄)².
    trial_x = np.repeat(x, [1, 4, 2])
    assert expected_width(x, [1, 4, 2], tau2=0.0, s2=9e-4, confidence=0.95) == pytest.approx(
        2 * stats.t.ppf(0.975, 1) * np.sqrt(9e-4 / np.sum((trial_x - trial_x.mean()) ** 2)))
    assert expected_width([0.0, 0.1], [1, 1], tau2=1e-4, s2=0, confidence=0.95) == float("inf")


def test_design_spreads_the_screened_gaps_largest_first():
    candidates = grid()
    outcomes = line_outcomes(candidates, noise=0.01, rng=np.random.default_rng(0))
    decisions, _ = run_sequential(candidates, outcomes, Policy("law", slope_ci_width=1e-9, max_trials=3))
    # Largest gap, then the farthest from it (the smallest), then the farthest from both: 0.08 and 0.12 are
    # 0.08 away, and the first listed wins.
    assert [d.trial_id for d in decisions[:3]] == ["m-c5-s0", "m-c0-s0", "m-c2-s0"]
    assert all(d.prediction is None for d in decisions[:3])  # no line yet: nothing to predict from
    assert decisions[3].action == "stop" and decisions[3].reason.startswith("budget: ")
    assert "3 trials" in decisions[3].reason


def test_every_model_of_a_family_is_in_its_first_configurations():
    small = grid({"a": 0.0, "b": 0.1, "c": 0.2}, model="small")
    large = grid({"a": 0.05, "b": 0.15}, model="large")
    decisions, _ = run_sequential(small + large, line_outcomes(small + large), Policy("law", slope_ci_width=1e-9,
                                                                                       max_trials=3))
    chosen = [d.trial_id for d in decisions[:3]]
    assert chosen[:2] == ["small-c-s0", "large-a-s0"]  # the largest gap, then the other model's farthest from it
    assert {c.split("-")[0] for c in chosen} == {"small", "large"}


def test_after_the_design_the_most_leveraged_configuration_gets_a_second_seed():
    candidates = grid()
    outcomes = line_outcomes(candidates, noise=0.01, rng=np.random.default_rng(1))
    done = {t: outcomes[t] for t in ("m-c5-s0", "m-c0-s0", "m-c2-s0")}
    decision = decide(candidates, done, (), Policy("law", slope_ci_width=1e-9))
    # Mean gap (0.2 + 0 + 0.08)/3 = 0.093: 0.2 is farthest.
    assert decision.trial_id == "m-c5-s1" and "seed noise" in decision.reason
    # Its prediction, made before training, is the OLS line's at gap 0.2 with statsmodels' obs interval.
    x = np.array([0.2, 0.0, 0.08])
    y = np.array([done[t].improvement for t in ("m-c5-s0", "m-c0-s0", "m-c2-s0")])
    frame = sm.OLS(y, sm.add_constant(x)).fit().get_prediction(np.array([[1.0, 0.2]])).summary_frame(alpha=0.05)
    assert decision.prediction["predicted_improvement"] == pytest.approx(frame["mean"].iloc[0])
    assert decision.prediction["pi_lo"] == pytest.approx(frame["obs_ci_lower"].iloc[0])
    assert decision.prediction["pi_hi"] == pytest.approx(frame["obs_ci_upper"].iloc[0])


def test_a_new_configuration_beats_a_seed_while_the_fit_has_few_degrees_of_freedom():
    candidates = grid()
    ys = {"m-c5-s0": 0.17, "m-c0-s0": 0.0, "m-c2-s0": 0.06, "m-c5-s1": 0.27}  # seed noise, measured
    outcomes = {t: Outcome(GAPS[t.split("-")[1]], y) for t, y in ys.items()}
    decision = decide(candidates, outcomes, (), Policy("law", slope_ci_width=1e-9))
    # From 3 to 4 configurations, t(0.975) drops from 12.7 to 4.3: no seed comes close.
    assert "new configuration" in decision.reason and decision.trial_id.endswith("-s0")


def test_extra_seeds_go_where_seed_noise_and_leverage_are():
    candidates = grid()
    once = {"m-c0-s0": 0.0, "m-c1-s0": 0.04, "m-c2-s0": 0.05, "m-c3-s0": 0.1, "m-c4-s0": 0.12, "m-c5-s0": 0.17}
    # Seeds that disagree: s² > 0. Every configuration has run; c0 (mean gap 0.098 away) has one seed, c5
    # (0.102 away) two: c0's second seed lowers Σ(x_i − x̄)²σ²_i most.
    outcomes = {t: Outcome(GAPS[t.split("-")[1]], y) for t, y in {**once, "m-c5-s1": 0.27}.items()}
    decision = decide(candidates, outcomes, (), Policy("law", slope_ci_width=1e-9))
    assert decision.trial_id == "m-c0-s1" and "seed 2 of its configuration" in decision.reason
    # Seeds that agree: the scatter is the configurations' own (τ²), which no seed reduces.
    outcomes = {t: Outcome(GAPS[t.split("-")[1]], y) for t, y in {**once, "m-c5-s1": 0.17}.items()}
    decision = decide(candidates, outcomes, (), Policy("law", slope_ci_width=1e-9))
    assert decision.action == "stop"
    assert decision.reason == "no trial left is expected to narrow the slope's interval of fam"


def _by_config(trained: dict[str, Outcome]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[Outcome]]]:
    groups: dict[str, list[Outcome]] = {}
    for t, o in trained.items():
        groups.setdefault(t.rsplit("-", 1)[0], []).append(o)
    x = np.array([np.mean([o.gap for o in v]) for v in groups.values()])
    y = np.array([np.mean([o.improvement for o in v]) for v in groups.values()])
    return x, y, np.array([len(v) for v in groups.values()]), list(groups.values())


def _expected_width(trained: dict[str, Outcome], confidence: float = 0.95) -> float:
    """The law goal's expected interval width, computed apart from the policy: WLS on configuration means
    weighted by seed counts (statsmodels), the seed noise of improvement − slope·gap pooled within
    configurations, the configurations' scatter τ² counted when an F test finds the fit's residual variance
    above the seed noise."""
    x, y, n, groups = _by_config(trained)
    fit = sm.WLS(y, sm.add_constant(x), weights=n).fit()
    slope = fit.params[1]
    within = [np.array([o.improvement - slope * o.gap for o in v]) for v in groups if len(v) > 1]
    df_e = sum(len(r) - 1 for r in within)
    s2 = sum(float(np.sum((r - r.mean()) ** 2)) for r in within) / df_e
    tau2 = (fit.scale - s2) / n.mean() if fit.scale / s2 > stats.f.ppf(confidence, len(x) - 2, df_e) else 0.0
    xm = np.average(x, weights=n)
    var = np.sum(n ** 2 * (x - xm) ** 2 * (tau2 + s2 / n)) / np.sum(n * (x - xm) ** 2) ** 2
    return 2 * stats.t.ppf(0.5 + confidence / 2, len(x) - 2) * np.sqrt(var)


def test_goal_law_stops_when_the_slope_interval_is_expected_to_be_narrow_enough():
    candidates = grid()
    rng = np.random.default_rng(2)
    # Measured gaps with their own noise (errors in x): the seed noise is that of improvement − slope·gap.
    outcomes = {c.trial_id: Outcome(c.gap + rng.normal(0, 0.005), 0.01 + 0.8 * c.gap + rng.normal(0, 0.008))
                for c in candidates}
    decisions, trained = run_sequential(candidates, outcomes, Policy("law", slope_ci_width=0.3))
    stop = decisions[-1]
    assert stop.action == "stop" and stop.reason.startswith("goal reached: every family's slope interval is expected")
    assert stop.fits["fam"]["expected_width"] == pytest.approx(_expected_width(trained))
    assert stop.fits["fam"]["expected_width"] < 0.3
    # The interval shown is the one `opsd analyze --by-seeds` would report on the trained trials.
    x, y, n, _ = _by_config(trained)
    assert len(set(n)) > 1  # the seeds went where they narrow the interval most, not evenly
    wls = sm.WLS(y, sm.add_constant(x), weights=n).fit()
    assert stop.fits["fam"]["slope_ci"] == pytest.approx(wls.conf_int(alpha=0.05)[1])
    # One trial fewer and it was still expected too wide, or its seed noise had too few degrees of freedom (else
    # it would have stopped there).
    before = decisions[-2].fits["fam"].get("expected_width")
    _, _, n_before, _ = _by_config({t: o for t, o in trained.items() if t != decisions[-2].trial_id})
    assert before is None or before >= 0.3 or np.sum(n_before - 1) < MIN_NOISE_DF
    assert len(trained) < len(candidates)


def test_goal_law_stops_honestly_its_intervals_cover_the_slope_as_often_as_they_say():
    # Stopping the first time the realized interval is narrow enough picks intervals that happen to be
    # narrow (the previous policy's covered in 86% of these 200 sweeps); planned from the seed noise, the stop
    # leaves the interval's coverage at its level (95% of them; 200 sweeps give about ±1.5%).
    rng = np.random.default_rng(11)
    candidates = grid()
    covered = []
    for _ in range(200):
        outcomes = {c.trial_id: Outcome(c.gap + rng.normal(0, 0.005), 0.01 + 0.8 * c.gap + rng.normal(0, 0.02))
                    for c in candidates}
        decisions, trained = run_sequential(candidates, outcomes, Policy("law", slope_ci_width=0.45))
        lo, hi = decisions[-1].fits["fam"]["slope_ci"]
        covered.append(lo <= 0.8 <= hi)
    assert np.mean(covered) >= 0.92


def test_the_plan_is_the_cheapest_allocation_of_seeds_that_meets_the_target():
    candidates = grid()
    rng = np.random.default_rng(5)
    outcomes = line_outcomes(candidates, noise=0.01, rng=rng)
    # Every configuration once, c5 twice (the seed noise): what is left is where to put seeds.
    done = {t: o for t, o in outcomes.items() if t.endswith("-s0") or t == "m-c5-s1"}
    x, y, n, groups = _by_config(done)
    fit = sm.WLS(y, sm.add_constant(x), weights=n).fit()
    r = [o.improvement - fit.params[1] * o.gap for o in groups[-1]]
    s2 = float(np.var(r, ddof=1))
    assert fit.scale / s2 <= stats.f.ppf(0.95, 4, 1)  # τ² = 0 here: the seed noise is all
    t = stats.t.ppf(0.975, 4)
    for target in (0.3, 0.25, 0.24, 0.23):
        decision = decide(candidates, done, (), Policy("law", slope_ci_width=target))
        # Apart from the policy: of every allocation of the seeds left, the fewest trials whose expected width
        # meets the target, with the seed noise measured on MIN_NOISE_DF degrees of freedom.
        best = None
        for alloc in itertools.product([1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [2, 3]):
            m = np.array(alloc)
            width = 2 * t * np.sqrt(s2 / np.sum(m * (x - np.average(x, weights=m)) ** 2))
            if width <= target and np.sum(m - 1) >= MIN_NOISE_DF and (best is None or m.sum() < sum(best)):
                best = alloc
        assert decision.action == "train" and f"one of the {sum(best) - 7} trial(s) expected" in decision.reason
        # The first: the second seed of the end with one seed (the other end, c5, has two).
        assert decision.trial_id == "m-c0-s1"


def test_the_configurations_scatter_counts_only_when_the_seed_noise_cannot_explain_it():
    candidates = grid()
    # Seeds that agree closely, configurations that miss the line by much more: τ² = residual variance of the
    # means − what the seed noise explains; scatter of the seeds' size: τ² = 0.
    misses = {"c0": 0.02, "c1": -0.03, "c2": 0.025, "c3": -0.02, "c4": 0.03, "c5": -0.025}
    for miss, seed_noise, want_tau in [(1.0, 0.001, True), (0.0, 0.02, False)]:
        rng = np.random.default_rng(6)
        outcomes = {c.trial_id: Outcome(c.gap, 0.8 * c.gap + miss * misses[c.context] + rng.normal(0, seed_noise))
                    for c in candidates if c.seed < 2}
        decision = decide(candidates, outcomes, (), Policy("law", slope_ci_width=1e-9))
        assert decision.fits["fam"]["expected_width"] == pytest.approx(_expected_width(outcomes))
        x = np.array(list(GAPS.values()))
        no_tau = 2 * stats.t.ppf(0.975, 4) * np.sqrt(_pure_error(outcomes) / (2 * np.sum((x - x.mean()) ** 2)))
        assert (decision.fits["fam"]["expected_width"] > 1.5 * no_tau) == want_tau


def _pure_error(outcomes: dict[str, Outcome]) -> float:
    """The pooled seed variance of improvement − slope·gap, the slope of the seed-weighted fit."""
    x, y, n, groups = _by_config(outcomes)
    slope = sm.WLS(y, sm.add_constant(x), weights=n).fit().params[1]
    r = [np.array([o.improvement - slope * o.gap for o in v]) for v in groups]
    return sum(float(np.sum((v - v.mean()) ** 2)) for v in r) / sum(len(v) - 1 for v in r)


def test_goal_best_confirms_the_apparent_best_with_its_further_seeds_before_it_stops():
    candidates = grid(seeds=(0, 1))
    # c5's first seed is lucky (0.30); its second (0.10) puts its mean, 0.20, below c4's (0.21, 0.21).
    values = {"c0": (0.0, 0.0), "c1": (0.03, 0.03), "c2": (0.06, 0.06), "c3": (0.1, 0.1), "c4": (0.21, 0.21),
              "c5": (0.30, 0.10)}
    outcomes = {c.trial_id: Outcome(c.gap, values[c.context][c.seed]) for c in candidates}
    decisions, trained = run_sequential(candidates, outcomes, Policy("best"))
    stop = decisions[-1]
    assert stop.action == "stop" and stop.reason.startswith("goal reached")
    confirmations = [d for d in decisions if "confirms the best measured configuration" in d.reason]
    assert confirmations and confirmations[0].trial_id == "m-c5-s1"
    # The best measured mean at the stop, over the trained trials, and every seed of it trained.
    means: dict[str, list[float]] = {}
    for t in trained:
        means.setdefault(t.rsplit("-", 1)[0], []).append(outcomes[t].improvement)
    leader = max(means, key=lambda k: np.mean(means[k]))
    assert leader == "m-c4" and len(means[leader]) == 2
    assert f"+0.210 (m|c4 over 2 seeds)" in stop.reason


def test_goal_best_trains_the_highest_upper_bound_and_stops_when_none_beats_the_best():
    candidates = grid(seeds=(0,))
    improvements = {"c0": 0.0, "c1": 0.05, "c2": 0.06, "c3": 0.12, "c4": 0.1, "c5": 0.16}
    outcomes = {c.trial_id: Outcome(c.gap, improvements[c.context]) for c in candidates}
    decisions, trained = run_sequential(candidates, outcomes, Policy("best"))
    design = ["m-c5-s0", "m-c0-s0", "m-c2-s0"]
    assert [d.trial_id for d in decisions[:3]] == design
    fitted = sm.OLS([0.16, 0.0, 0.06], sm.add_constant([0.2, 0.0, 0.08])).fit()
    frame = fitted.get_prediction(sm.add_constant([0.04, 0.12, 0.15])).summary_frame(alpha=0.05)
    upper = dict(zip(["m-c1-s0", "m-c3-s0", "m-c4-s0"], frame["obs_ci_upper"]))
    fourth = decisions[3]
    if max(upper.values()) > 0.16:
        assert fourth.trial_id == max(upper, key=upper.get)
        assert fourth.prediction["pi_hi"] == pytest.approx(upper[fourth.trial_id])
    stop = decisions[-1]
    assert stop.action == "stop" and stop.reason.startswith("goal reached: no untrained configuration")
    assert "+0.160 (m|c5)" in stop.reason


def test_budget_in_hours_is_never_passed_and_a_cheaper_trial_can_still_fit():
    cheap = grid({"a": 0.0, "b": 0.1, "c": 0.2}, model="cheap", family="f1", seeds=(0,), cost=5.0)
    dear = grid({"a": 0.0, "b": 0.1, "c": 0.2}, model="dear", family="f2", seeds=(0,), cost=30.0)
    candidates = dear + cheap
    decisions, trained = run_sequential(candidates, line_outcomes(candidates), Policy("law", slope_ci_width=1e-9,
                                                                                      max_hours=50.0))
    hours = sum(c.cost for c in candidates if c.trial_id in trained)
    assert hours <= 50.0
    # f2's first (30 h) and f1's (5 h) fit; f2's second would make 65 h, but f1's cheap ones still fit.
    assert set(trained) == {"dear-c-s0", "cheap-c-s0", "cheap-a-s0", "cheap-b-s0"}
    assert decisions[-1].reason.startswith("budget: the next trial (dear-a-s0, 30 h) would pass 50 device-hours")


def test_running_trials_count_against_the_budget_and_a_full_queue_waits():
    candidates = grid({"a": 0.0, "b": 0.1, "c": 0.2}, seeds=(0,))
    decision = decide(candidates, {}, {"m-a-s0", "m-b-s0", "m-c-s0"}, Policy("best"))
    assert decision.action == "wait"
    decision = decide(candidates, {}, {"m-c-s0"}, Policy("best", max_trials=1))
    assert decision.action == "wait"  # nothing may start, but the running trial may still end the sweep
    decision = decide(candidates, {}, {"m-c-s0"}, Policy("best"))
    assert decision.trial_id == "m-a-s0"  # the design goes on around the running trial


def test_decisions_do_not_depend_on_the_order_outcomes_arrive_in():
    candidates = grid()
    outcomes = line_outcomes(candidates, noise=0.01, rng=np.random.default_rng(3))
    done = ["m-c5-s0", "m-c0-s0", "m-c2-s0", "m-c5-s1", "m-c3-s0"]
    forward = decide(candidates, {t: outcomes[t] for t in done}, (), Policy("law", slope_ci_width=0.01))
    backward = decide(candidates, {t: outcomes[t] for t in reversed(done)}, (), Policy("law", slope_ci_width=0.01))
    assert forward == backward


def test_failed_trials_are_not_chosen_again_and_their_configuration_moves_to_its_next_seed():
    candidates = grid()
    decision = decide(candidates, {"m-c5-s0": Outcome(float("nan"), float("nan"))}, (), Policy("best"))
    assert decision.trial_id == "m-c5-s1"
    assert decision.spent_trials == 1 and decision.spent_hours == 10.0


def _prior(slope=0.8, intercept=0.0, cov=((1e-4, 0.0), (0.0, 1e-2)), residual_var=1e-4, df=10.0) -> Law:
    line = LineLaw(slope=slope, intercept=intercept, slope_ci=(0.6, 1.0), intercept_ci=(-0.02, 0.02),
                   slope_se=0.1, intercept_se=0.01, slope_p=0.0, intercept_p=1.0, r2=0.9, loo_r2=0.8, loo_rmse=0.01,
                   n_configs=12, n_trials=12, n_points=12, df_resid=df, residual_var=residual_var, coef_cov=cov,
                   x_mean=0.1, x_min=0.0, x_max=0.2, sizes=(1.0,))
    return Law(settings={"confidence": 0.95}, families={"fam": line}, pooled=None)


def test_a_prior_law_predicts_before_the_sweep_has_a_line():
    candidates = grid(seeds=(0,))
    prior = _prior()
    decision = decide(candidates, {}, (), Policy("best"), prior=prior)
    # Goal best with a prior: no design, the highest upper bound (the largest gap, slope > 0) at once.
    assert decision.trial_id == "m-c5-s0" and "upper prediction bound" in decision.reason
    t = stats.t.ppf(0.975, 10)
    se = np.sqrt(1e-4 + 0.2 ** 2 * 1e-2 + 1e-4)
    assert decision.prediction["pi_hi"] == pytest.approx(0.8 * 0.2 + t * se)
    assert decision.prediction["law"] == "prior"


def test_a_prior_law_combines_with_the_sweeps_own_fit_by_precision():
    candidates = grid(seeds=(0,))
    rng = np.random.default_rng(4)
    outcomes = line_outcomes(candidates, slope=0.5, noise=0.01, rng=rng)
    done = {t: outcomes[t] for t in ("m-c5-s0", "m-c0-s0", "m-c2-s0", "m-c3-s0")}
    prior = _prior()
    decision = decide(candidates, done, (), Policy("law", slope_ci_width=1e-9), prior=prior)
    x = [0.2, 0.0, 0.08, 0.12]
    own = sm.OLS([done[t].improvement for t in done], sm.add_constant(x)).fit()
    p0, p1 = np.linalg.inv(np.array([[1e-4, 0.0], [0.0, 1e-2]])), np.linalg.inv(own.cov_params())
    cov = np.linalg.inv(p0 + p1)
    beta = cov @ (p0 @ [0.0, 0.8] + p1 @ own.params)
    fit = decision.fits["fam"]
    assert fit["source"] == "sweep + prior"
    assert fit["slope"] == pytest.approx(beta[1]) and fit["intercept"] == pytest.approx(beta[0])
    half = stats.t.ppf(0.975, own.df_resid + 10) * np.sqrt(cov[1, 1])
    assert fit["slope_ci"] == pytest.approx([beta[1] - half, beta[1] + half])


def test_a_fit_without_residual_variance_is_not_a_known_law():
    candidates = grid()
    # Three configurations that improved alike (quantized accuracies on few problems): the OLS interval has
    # width 0, which must not stop the sweep.
    outcomes = {t: Outcome(GAPS[t.split("-")[1]], 0.0) for t in ("m-c5-s0", "m-c0-s0", "m-c2-s0")}
    decision = decide(candidates, outcomes, (), Policy("law", slope_ci_width=0.1))
    assert decision.fits["fam"]["slope_ci"] == pytest.approx([0.0, 0.0]) and decision.fits["fam"]["met"] is False
    assert decision.action == "train"


def test_goal_law_needs_a_target():
    with pytest.raises(ValueError, match="slope_ci_width"):
        decide(grid(), {}, (), Policy("law"))
