"""Law-guided sweeps: which trial of the grid to train next, or why to stop. Pure functions, no Ray or torch.

A guided sweep screens every configuration (model × context) first, so each has a measured initial gap before
any training; `decide` then looks at the trials completed so far and returns one decision:

1. **Design.** A family whose law cannot predict yet (fewer than MIN_CONFIGS configurations, and no prior law
   for it) gets configurations spread over its screened gaps: every model of the family first, each pick the
   configuration farthest from the gaps already chosen (the largest gap first).
2. **Seed noise.** Once a family has its first line and no configuration anywhere has two seeds, the
   configuration with the most leverage (gap farthest from the mean) gets its second seed: without a seed
   variance, extra seeds cannot be weighed against new configurations.
3. **Goal.**
   - `law`: the interval aimed at is the slope's interval of a fit on configuration means weighted by their
     seed counts (what `opsd analyze --by-seeds` reports: a guided sweep's configurations have unequal seeds).
     With k configurations at gaps x_i and n_i seeds its expected width is 2·t(k−2)·sqrt(var), var =
     Σ n_i²·d_i²·(τ² + s²/n_i)/(Σ n_i·d_i²)² with d_i = x_i − x̄ (`expected_width`), where s² is the seed
     noise of one trial's improvement − slope·gap (`seed_noise`: the improvement's seed variance and the
     measured gap's own noise, errors in x, together) and τ² the configurations' scatter about the law beyond
     it (`config_scatter`). For each family still short of the target, `_plan` finds the cheapest set of
     further trials expected to meet it: the slope's variance falls with the seeds' spread Σ n_i·d_i² (the
     ends of the screened gap range), while t(k−2) needs configurations; the plan's next trial is trained,
     the family furthest from its target first. Stop when every family's expected width is narrower than the
     target, its seed noise measured on at least MIN_NOISE_DF degrees of freedom. The stop is planned from
     the seed noise, measured within configurations, not from the fit's own residual variance: stopping when
     the fitted interval is first narrow enough picks the intervals that happen to be narrow, and they then
     cover the slope less often than they say.
   - `best`: train the untrained configuration with the highest upper prediction bound; when no untrained
     configuration's upper bound beats the best measured improvement, confirm that best with its further
     seeds of the grid (the lead may pass to another configuration, confirmed in turn), then stop.
4. **Budget.** An action whose cost would take the sweep past `max_trials` or `max_hours` (completed, failed
   and running trials counted) is never taken; when none is left the sweep stops and says so.

A prior law (law.json of an earlier sweep) combines with each family's own fit as two independent estimates of
the same line (precision-weighted coefficients); before a family's own fit exists, it predicts alone. The
`law` goal still needs MIN_CONFIGS configurations of the sweep's own before a family's interval counts.

Decisions depend only on the sets of outcomes and running trials, never on their order, so that a sweep
killed and resumed decides as one that was not (ties go to the candidate listed first).

Why one module of ~600 lines: the steps above are one decision, read top to bottom as listed; the plan, the
noise and the stop share the family fit and the configuration records at every step, and the parts that stand
alone (the line's fit, predictions, the law's file) are their own modules already.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from scipy import stats

from analysis.fit import fit_line
from analysis.law import MIN_CONFIGS, Law, LineLaw
from analysis.predict import line_prediction

Goal = Literal["law", "best"]
# The seed noise plans the law goal's stop; measured with fewer degrees of freedom (seeds beyond the first,
# summed over configurations) it is too often far too small, and a sweep would stop on that luck with an
# interval much wider than its target.
MIN_NOISE_DF = 4


@dataclass(frozen=True)
class Candidate:
    """One trial of the grid: a configuration (model × context) at one seed."""

    trial_id: str
    family: str
    model: str
    context: str
    seed: int
    gap: float  # the configuration's screened initial gap
    cost: float  # device-hours its training takes (the plan's estimate)

    @property
    def config(self) -> str:
        return f"{self.model}|{self.context}"


@dataclass(frozen=True)
class Outcome:
    """A finished trial: its own measured initial gap and its improvement (NaN for both when it failed)."""

    gap: float
    improvement: float

    @property
    def failed(self) -> bool:
        return not np.isfinite(self.improvement)


@dataclass(frozen=True)
class Policy:
    goal: Goal
    slope_ci_width: float | None = None  # goal law: stop when each family's slope interval is narrower
    max_trials: int | None = None
    max_hours: float | None = None
    confidence: float = 0.95


@dataclass(frozen=True)
class FamilyFit:
    """A family's line as the policy sees it: its own fit on configuration means, combined with the prior."""

    family: str
    n_configs: int  # of the sweep's own, completed
    intercept: float
    slope: float
    coef_cov: tuple | None  # over (intercept, slope); None: a line through two configurations
    residual_var: float | None
    df_resid: float
    source: str  # "sweep", "prior" or "sweep + prior"
    confidence: float

    @property
    def predicts(self) -> bool:
        return self.coef_cov is not None

    @property
    def slope_ci(self) -> tuple[float, float] | None:
        if not self.predicts:
            return None
        half = _t(self.confidence, self.df_resid) * np.sqrt(self.coef_cov[1][1])
        return (self.slope - half, self.slope + half)

    @property
    def width(self) -> float:
        ci = self.slope_ci
        return float("inf") if ci is None else ci[1] - ci[0]

    def predict(self, gaps) -> dict[str, np.ndarray]:
        return line_prediction(self.intercept, self.slope, self.coef_cov, self.residual_var, self.df_resid, gaps,
                               confidence=self.confidence)

    def summary(self) -> dict[str, Any]:
        ci = self.slope_ci
        return {"n_configs": self.n_configs, "slope": self.slope, "intercept": self.intercept,
                "slope_ci": [float(v) for v in ci] if ci else None, "source": self.source}


@dataclass(frozen=True)
class Decision:
    action: Literal["train", "wait", "stop"]
    reason: str
    trial_id: str | None = None
    # Before training: predicted_improvement, pi_lo, pi_hi and the line that predicted it (None: no line yet).
    prediction: dict[str, Any] | None = None
    fits: dict[str, dict[str, Any]] = field(default_factory=dict)
    spent_trials: int = 0
    spent_hours: float = 0.0


# ------------------------------------------------------------------------------------------------- the fits


@dataclass
class _Config:
    """A configuration of the grid and where it stands."""

    family: str
    model: str
    gap: float  # screened
    seeds: list[Candidate]  # in grid order
    done: list[Outcome] = field(default_factory=list)  # completed, not failed
    running: int = 0
    untried: list[Candidate] = field(default_factory=list)  # neither finished nor running, in grid order

    @property
    def x(self) -> float:
        """The gap the fit uses: the mean of its trials' own measured gaps, the screened one before any."""
        return float(np.mean([o.gap for o in self.done])) if self.done else self.gap

    @property
    def chosen(self) -> int:
        return len(self.done) + self.running


def _configs(candidates: Sequence[Candidate], outcomes: Mapping[str, Outcome],
             in_flight: Collection[str]) -> dict[str, _Config]:
    out: dict[str, _Config] = {}
    for c in candidates:
        cfg = out.setdefault(c.config, _Config(c.family, c.model, c.gap, []))
        cfg.seeds.append(c)
        if c.trial_id in outcomes:
            if not outcomes[c.trial_id].failed:
                cfg.done.append(outcomes[c.trial_id])
        elif c.trial_id in in_flight:
            cfg.running += 1
        else:
            cfg.untried.append(c)
    return out


def fit_family(family: str, configs: Sequence[_Config], *, confidence: float,
               prior: LineLaw | None = None) -> FamilyFit | None:
    """The family's line on its completed configurations' means weighted by their seed counts
    (analysis.fit.fit_line, as `opsd analyze --by-seeds`: a guided sweep's configurations have unequal seeds),
    combined with `prior` where both have intervals; None when neither gives a line. Its residual variance is
    that of a configuration trained with one seed, what a prediction for the next new configuration needs."""
    done = [c for c in configs if c.done]
    own = None
    x = np.array([c.x for c in done])
    if len(done) >= 2 and np.ptp(x) > 1e-12:
        y = np.array([np.mean([o.improvement for o in c.done]) for c in done])
        res = fit_line(x, y, weights=[len(c.done) for c in done])
        if len(done) >= MIN_CONFIGS:
            own = FamilyFit(family, len(done), float(res.params[0]), float(res.params[1]),
                            _tuple(np.asarray(res.cov_params())), float(res.scale), float(res.df_resid), "sweep",
                            confidence)
        else:
            own = FamilyFit(family, len(done), float(res.params[0]), float(res.params[1]), None, None, 0.0,
                            "sweep", confidence)
    usable_prior = prior is not None and prior.has_intervals
    if not usable_prior:
        return own
    from_prior = FamilyFit(family, len(done), prior.intercept, prior.slope, prior.coef_cov, prior.residual_var,
                           prior.df_resid, "prior", confidence)
    if own is None or not own.predicts:
        return from_prior
    # Two independent estimates of one line: precision-weighted coefficients.
    p0, p1 = np.linalg.inv(np.asarray(prior.coef_cov)), np.linalg.inv(np.asarray(own.coef_cov))
    cov = np.linalg.inv(p0 + p1)
    beta = cov @ (p0 @ [prior.intercept, prior.slope] + p1 @ [own.intercept, own.slope])
    return FamilyFit(family, own.n_configs, float(beta[0]), float(beta[1]), _tuple(cov), own.residual_var,
                     own.df_resid + prior.df_resid, "sweep + prior", confidence)


def _tuple(matrix: np.ndarray) -> tuple:
    return tuple(tuple(float(v) for v in row) for row in matrix)


def seed_noise(configs: Sequence[_Config], slope: float) -> tuple[float, int] | None:
    """(variance, degrees of freedom) of one trial's improvement − slope·gap about its configuration's mean,
    pooled over configurations with two or more completed seeds; None without any.

    A configuration mean's residual about the law is ē − slope·ū (ē, ū: the mean seed errors of its
    improvement and of its measured gap), so its variance is this noise over the seed count: the seed noise
    of the improvement and the gap's own measurement noise (errors in x) in one number. It is pure error,
    measured within configurations, and so independent of where the configuration means lie about the line."""
    ss, df = 0.0, 0
    for c in configs:
        if len(c.done) >= 2:
            r = np.array([o.improvement - slope * o.gap for o in c.done])
            ss += float(np.sum((r - r.mean()) ** 2))
            df += len(r) - 1
    return (ss / df, df) if df else None


def expected_width(x: Sequence[float], n: Sequence[int], *, tau2: float, s2: float, confidence: float,
                   prior: tuple[float, float] | None = None) -> float:
    """Expected width of the slope's interval of a fit on configuration means at gaps `x`, each weighted by
    its seed count `n` (WLS, what `opsd analyze --by-seeds` reports): 2·t(k−2)·sqrt(var) with
    var = Σ n_i²·d_i²·(τ² + s²/n_i) / (Σ n_i·d_i²)², d_i = x_i − x̄ (x̄ the seed-weighted mean gap), the
    slope's variance when configuration i's mean has variance τ² + s²/n_i; with τ² = 0 it is the textbook
    s²/Σ n_i·d_i², every seed a point at its configuration's gap. Infinite below MIN_CONFIGS configurations or
    without spread. `prior` (slope variance, degrees of freedom) of a prior law combines by precision, as
    `fit_family` combines the lines."""
    if len(x) < MIN_CONFIGS:
        return float("inf")
    return _width(_slope_var([float(v) for v in x], [float(v) for v in n], tau2, s2), len(x), confidence, prior)


def _slope_var(x: list[float], n: list[float], tau2: float, s2: float) -> float:
    # Plain floats: the plan calls this thousands of times per decision, on a handful of configurations.
    total = sum(n)
    mean = sum(ni * xi for ni, xi in zip(n, x)) / total
    dev2 = [(xi - mean) ** 2 for xi in x]
    sxx = sum(ni * d for ni, d in zip(n, dev2))
    if sxx <= 1e-12:
        return float("inf")
    return sum(ni * d * (ni * tau2 + s2) for ni, d in zip(n, dev2)) / sxx ** 2


def _width(var: float, k: int, confidence: float, prior: tuple[float, float] | None) -> float:
    df = k - 2
    if prior is not None:
        var = 1 / (1 / var + 1 / prior[0]) if var > 0 else 0.0
        df += prior[1]
    return 2 * _t(confidence, df) * float(np.sqrt(var))


def config_scatter(fit: FamilyFit | None, done: Sequence[_Config], noise: tuple[float, int] | None,
                   confidence: float) -> float:
    """τ²: the variance of configurations about the law beyond their seed noise, counted only where the fit's
    residual variance is significantly larger than the seed noise predicts (a lack-of-fit F test at
    `confidence`); else 0.

    Why gated: a decision that depended on the residual variance of the configuration means would stop most
    often when that variance happened to be small, and the sweep's own interval, made from the same residuals,
    would cover the slope less often than it says. The seed noise is measured within configurations and is
    independent of those residuals (for normal errors), so decisions made from it leave the final interval
    honest; the configurations' own scatter enters only when the data show it."""
    df = len(done) - 2  # the sweep's own residual degrees of freedom (a prior adds its own to fit.df_resid)
    if fit is None or not fit.predicts or fit.source == "prior" or noise is None or df < 1:
        return 0.0
    # The fit weights configuration i by its n_i seeds: its residual variance estimates s² + n̄·τ².
    mean_n = float(np.mean([len(c.done) for c in done]))
    if noise[0] <= 0:
        return fit.residual_var / mean_n
    if fit.residual_var / noise[0] <= _f(confidence, df, noise[1]):
        return 0.0
    return (fit.residual_var - noise[0]) / mean_n


@lru_cache(maxsize=256)
def _f(confidence: float, df_num: float, df_den: float) -> float:
    return float(stats.f.ppf(confidence, df_num, df_den))


@lru_cache(maxsize=256)
def _t(confidence: float, df: float) -> float:
    """The two-sided Student t quantile (scipy's ppf is slow, and the policy asks for few distinct ones)."""
    return float(stats.t.ppf(0.5 + confidence / 2, df))


# --------------------------------------------------------------------------------------------- the decision


def decide(candidates: Sequence[Candidate], outcomes: Mapping[str, Outcome], in_flight: Collection[str],
           policy: Policy, *, prior: Law | None = None) -> Decision:
    """The next trial to train, a wait (trials running and nothing to start), or a stop with its reason.

    candidates: the grid, in order (a configuration's seeds in the order they are to be trained); outcomes:
    finished trials by id; in_flight: ids of trials running now.
    """
    if policy.goal == "law" and not (policy.slope_ci_width and policy.slope_ci_width > 0):
        raise ValueError("goal 'law' needs a positive slope_ci_width")
    by_id = {c.trial_id: c for c in candidates}
    configs = _configs(candidates, outcomes, in_flight)
    families = list(dict.fromkeys(c.family for c in candidates))
    spent = [by_id[t] for t in (*outcomes, *in_flight) if t in by_id]
    spent_trials, spent_hours = len(spent), float(sum(c.cost for c in spent))

    def affordable(c: Candidate) -> bool:
        return ((policy.max_trials is None or spent_trials + 1 <= policy.max_trials)
                and (policy.max_hours is None or spent_hours + c.cost <= policy.max_hours + 1e-9))

    members = {f: [c for c in configs.values() if c.family == f] for f in families}
    fits = {f: fit_family(f, members[f], confidence=policy.confidence, prior=_prior_line(prior, f))
            for f in families}
    # The law goal's interval, as planned from the seed noise (see config_scatter for why not from the fit's
    # own residual variance): the expected width of the completed configurations' interval.
    noise = _noises(families, members, fits) if policy.goal == "law" else {}
    trained = {f: [c for c in members[f] if c.done] for f in noise}
    tau2 = {f: config_scatter(fits[f], trained[f], noise[f], policy.confidence) for f in noise}
    expected = {f: expected_width([c.x for c in trained[f]], [len(c.done) for c in trained[f]], tau2=tau2[f],
                                  s2=noise[f][0] if noise[f] else 0.0, confidence=policy.confidence,
                                  prior=_prior_slope(_prior_line(prior, f)))
                for f in noise}
    # Without seed noise, or with none and no scatter (configurations that improved alike, e.g. equal
    # improvements measured on few problems), an interval of width 0 says nothing: not a known law.
    met = {f: policy.goal == "law" and fits[f] is not None and fits[f].predicts and fits[f].source != "prior"
           and fits[f].n_configs >= MIN_CONFIGS and noise[f] is not None and noise[f][1] >= MIN_NOISE_DF
           and (noise[f][0] > 0 or tau2[f] > 0) and expected[f] <= policy.slope_ci_width for f in families}
    summary = {f: {**fits[f].summary(),
                   **({"expected_width": expected[f] if np.isfinite(expected[f]) else None, "met": bool(met[f])}
                      if policy.goal == "law" else {})}
               for f in families if fits[f] is not None}

    def done(action: str, reason: str, chosen: Candidate | None = None) -> Decision:
        prediction = None
        if chosen is not None:
            fit = fits[chosen.family]
            if fit is not None and fit.predicts:
                p = fit.predict([chosen.gap])
                prediction = {"gap": chosen.gap, "law": fit.source,
                              **{k: float(p[k][0]) for k in ("predicted_improvement", "pi_lo", "pi_hi")}}
        return Decision(action, reason, chosen.trial_id if chosen else None, prediction, summary,
                        spent_trials, spent_hours)

    # The goal, from completed trials only (running ones finish whatever is decided).
    best = _best_measured(configs)
    if policy.goal == "law" and all(met.values()):
        widths = ", ".join(f"{f} {expected[f]:.3g} (this fit's {fits[f].width:.3g})" for f in families)
        return done("stop", f"goal reached: every family's slope interval is expected to be narrower than "
                            f"{policy.slope_ci_width:g}, from its seed noise and design: {widths}")
    if policy.goal == "best" and best is not None and all(fits[f] is not None and fits[f].predicts for f in families):
        bounds = [(float(fits[c.family].predict([c.gap])["pi_hi"][0]), key) for key, c in configs.items()
                  if not c.chosen and c.untried]
        top = max(bounds, default=None)
        if top is None or top[0] <= best[0]:
            # Confirm the apparent best first: one lucky seed must not end the sweep. Its further seeds of the
            # grid are trained (the best measured mean may move to another configuration, which is then
            # confirmed in turn) before the stop.
            leader = configs[best[1]]
            if leader.running:
                return done("wait", f"{best[1]}, the best measured configuration, has a confirmation seed running")
            if leader.untried and affordable(leader.untried[0]):
                return done("train", f"{leader.untried[0].trial_id} confirms the best measured configuration "
                                     f"({best[1]}, {best[0]:+.3f} over {len(leader.done)} seed(s)) before the stop: "
                                     f"no untrained configuration's upper prediction bound beats it",
                            leader.untried[0])
            beyond = f"the highest is {top[0]:+.3f} ({top[1]})" if top else "none is left"
            seeds = f" over {len(leader.done)} seeds" if len(leader.done) > 1 else ""
            return done("stop", f"goal reached: no untrained configuration's upper prediction bound beats the best "
                                f"measured improvement {best[0]:+.3f} ({best[1]}{seeds}): {beyond}")

    wanted: list[tuple[str, Candidate]] = []  # what the policy would train, affordable or not, best first
    # 1. Design: spread each family that cannot predict yet (the law goal needs the sweep's own line).
    needs_design = [f for f in families if _needs_design(f, members[f], fits[f], policy.goal)]
    for f in sorted(needs_design, key=lambda f: (sum(1 for c in members[f] if c.chosen), families.index(f))):
        pick = _design_pick(members[f])
        if pick is not None:
            wanted.append((f"spreads {f}'s screened gaps ({sum(1 for c in members[f] if c.chosen) + 1} of at least "
                           f"{MIN_CONFIGS} configurations, every model)", pick))
    if policy.goal == "law":
        unmet = [f for f in families if not met[f] and f not in needs_design]
        # 2. Seed noise, once: the most leveraged configuration's second seed.
        if all(noise[f] is None for f in families) and not any(c.chosen >= 2 for c in configs.values()):
            for f in unmet:
                chosen = [c for c in members[f] if c.chosen and c.untried]
                if chosen:
                    xs = np.array([c.x for c in members[f] if c.chosen])
                    top = max(chosen, key=lambda c: abs(c.x - xs.mean()))
                    wanted.append((f"measures the seed noise: a second seed of {f}'s configuration farthest from "
                                   f"its mean gap", top.untried[0]))
        # 3. The cheapest plan to the target, the family furthest from it first.
        plans = []
        for f in unmet:
            if noise[f] is None or fits[f] is None or fits[f].source == "prior":
                continue
            steps, now = _plan(f, members[f], s2=noise[f][0], tau2=tau2[f], target=policy.slope_ci_width,
                               confidence=policy.confidence, prior=_prior_slope(_prior_line(prior, f)),
                               noise_df=noise[f][1])
            plans.append((-now / policy.slope_ci_width, families.index(f), steps))
        for _, _, steps in sorted(plans, key=lambda p: p[:2]):
            wanted += steps
    else:
        # 3. The untrained configuration with the highest upper prediction bound.
        bounds = []
        for key, c in configs.items():
            fit = fits[c.family]
            if not c.chosen and c.untried and fit is not None and fit.predicts:
                bounds.append((float(fit.predict([c.gap])["pi_hi"][0]), c.untried[0]))
        bounds.sort(key=lambda item: -item[0])  # stable: ties keep grid order
        for hi, c in bounds:
            wanted.append((f"has the highest upper prediction bound ({hi:+.3f}) of the untrained configurations", c))

    for reason, c in wanted:
        if affordable(c):
            return done("train", f"{c.trial_id} {reason}", c)
    if in_flight:
        return done("wait", f"{len(in_flight)} trial(s) running; nothing else to start until one finishes")
    if wanted:
        budget = [f"{policy.max_trials} trials" if policy.max_trials is not None else None,
                  f"{policy.max_hours:g} device-hours" if policy.max_hours is not None else None]
        return done("stop", f"budget: the next trial ({wanted[0][1].trial_id}, {wanted[0][1].cost:.3g} h) would pass "
                            f"{' or '.join(b for b in budget if b)} ({spent_trials} trials, {spent_hours:.3g} h spent)")
    if not any(c.untried for c in configs.values()):
        return done("stop", "grid exhausted: every trial of the grid has run")
    unmet = [f for f in families if policy.goal == "law" and not met[f]]
    exhausted = [f for f in unmet if not any(c.untried for c in members[f])]
    if unmet and exhausted == unmet:
        return done("stop", f"grid exhausted for {', '.join(unmet)}: every trial of "
                            f"{'its' if len(unmet) == 1 else 'their'} grid has run, and the slope's interval is still "
                            f"expected to be wider than {policy.slope_ci_width:g} ("
                            + ", ".join(f"{f} {expected.get(f, float('inf')):.3g}" for f in unmet) + ")")
    return done("stop", f"no trial left is expected to narrow the slope's interval of {', '.join(unmet)}"
                if unmet else "no trial left to choose")


def _prior_line(prior: Law | None, family: str) -> LineLaw | None:
    return prior.families.get(family) if prior is not None else None


def _prior_slope(line: LineLaw | None) -> tuple[float, float] | None:
    """(slope variance, residual degrees of freedom) of a prior line with intervals, for `expected_width`."""
    return (float(line.coef_cov[1][1]), float(line.df_resid)) if line is not None and line.has_intervals else None


def _noises(families: Sequence[str], members: Mapping[str, Sequence[_Config]],
            fits: Mapping[str, FamilyFit | None]) -> dict[str, tuple[float, int] | None]:
    """Each family's seed noise (`seed_noise`, with its own slope) once it has MIN_NOISE_DF degrees of
    freedom, before that the noise pooled over every family's seeds."""
    own = {f: seed_noise(members[f], fits[f].slope if fits[f] is not None else 0.0) for f in families}
    known = [v for v in own.values() if v is not None]
    pooled = (sum(v * df for v, df in known) / sum(df for _, df in known), sum(df for _, df in known)) \
        if known else None
    return {f: own[f] if own[f] is not None and own[f][1] >= MIN_NOISE_DF else pooled for f in families}


def _needs_design(family: str, members: Sequence[_Config], fit: FamilyFit | None, goal: Goal) -> bool:
    chosen = [c for c in members if c.chosen]
    models = {c.model for c in members}
    if len(chosen) >= MIN_CONFIGS and {c.model for c in chosen} == models:
        return False
    if goal == "best" and fit is not None and fit.predicts:  # a prior predicts for it: no need to spread first
        return False
    return any(not c.chosen and c.untried for c in members)


def _design_pick(members: Sequence[_Config]) -> Candidate | None:
    """Next configuration of the family's design: an unrepresented model first, then the screened gap farthest
    from those already chosen (the largest gap to begin with)."""
    open_ = [c for c in members if not c.chosen and c.untried]
    if not open_:
        return None
    chosen = [c for c in members if c.chosen]
    represented = {c.model for c in chosen}
    pool = [c for c in open_ if c.model not in represented] or open_
    if not chosen:
        return max(pool, key=lambda c: c.gap).untried[0]  # max keeps the first of equals
    gaps = np.array([c.gap for c in chosen])
    # Rounded, so that distances equal but for float error tie, and the first listed wins.
    return max(pool, key=lambda c: round(float(np.min(np.abs(gaps - c.gap))), 12)).untried[0]


def _plan(family: str, members: Sequence[_Config], *, s2: float, tau2: float, target: float, confidence: float,
          prior: tuple[float, float] | None, noise_df: int = MIN_NOISE_DF) -> tuple[list[tuple[str, Candidate]], float]:
    """The cheapest set of further trials of the family expected to narrow its slope interval below `target`
    (or, where the grid cannot, the narrowest), in the order to train them, and the expected width now.

    The expected width (`expected_width`) needs configurations for its t(k−2) and falls with the seeds'
    spread Σ n_i·(x_i − x̄)²: seeds count most at the ends of the gap range. So for each set of configurations
    (those chosen, then one more at a time, each the one whose first seed narrows the width most: the ends of
    the screened gaps first) seeds are added one at a time, each where it narrows the width most per
    device-hour, until the target is met and the seed noise has MIN_NOISE_DF degrees of freedom (each seed of
    a configuration already trained adds one); the cheapest set that meets it wins. Its new configurations
    come first (they add degrees of freedom and spread), then its seeds."""
    chosen = [c for c in members if c.chosen]
    x0, n0 = [c.x for c in chosen], [c.chosen for c in chosen]
    now = expected_width(x0, n0, tau2=tau2, s2=s2, confidence=confidence, prior=prior)
    open_ = [c for c in members if not c.chosen and c.untried]
    sets: list[list[_Config]] = [[]]
    while len(sets[-1]) < len(open_):
        added = sets[-1]
        rest = [c for c in open_ if all(c is not a for a in added)]
        widths = [expected_width([*x0, *(a.gap for a in added), c.gap], [*n0, *([1] * len(added)), 1], tau2=tau2,
                                 s2=s2, confidence=confidence, prior=prior) for c in rest]
        sets.append([*added, rest[int(np.argmin(np.round(widths, 12)))]])
    best: tuple | None = None  # (key, width, steps)
    for added in sets:
        configs = [*chosen, *added]
        x = [*x0, *(a.gap for a in added)]
        n = [float(v) for v in (*n0, *([1] * len(added)))]
        k = len(x)
        steps = [("a new configuration", a.untried[0]) for a in added]
        cost = sum(a.untried[0].cost for a in added)
        left = [list(c.untried[1:] if i >= len(chosen) else c.untried) for i, c in enumerate(configs)]
        width = expected_width(x, n, tau2=tau2, s2=s2, confidence=confidence, prior=prior)
        if not np.isfinite(width):
            continue
        df = noise_df
        while (width > target or df < MIN_NOISE_DF) and s2 > 0:  # a seed averages seed noise away, nothing else
            # The seed that narrows the width most per device-hour (the weighted mean moves with each seed, so
            # every candidate is computed whole).
            gains = {}
            for i in range(k):
                if left[i]:
                    after = expected_width(x, [m + (j == i) for j, m in enumerate(n)], tau2=tau2, s2=s2,
                                           confidence=confidence, prior=prior)
                    gains[i] = ((width - after) / max(left[i][0].cost, 1e-12), after)
            if not gains:
                break
            i = max(gains, key=lambda j: gains[j][0])
            if gains[i][0] <= 1e-15 and width > target:
                break
            df += 1
            n[i] += 1
            nxt = left[i].pop(0)
            steps.append((f"seed {int(n[i])} of its configuration", nxt))
            cost += nxt.cost
            width = gains[i][1]
        key = (0, cost) if width <= target and df >= MIN_NOISE_DF else (1, width, cost)
        if best is None or key < best[0]:
            best = (key, width, steps)
    if best is None:
        return [], now
    _, width, steps = best
    return [(f"({what}) is one of the {len(steps)} trial(s) expected, at the least device-hours, to narrow "
             f"{family}'s slope interval from {now:.3g} to {width:.3g}", c) for what, c in steps], now


def _best_measured(configs: Mapping[str, _Config]) -> tuple[float, str] | None:
    means = [(float(np.mean([o.improvement for o in c.done])), key) for key, c in configs.items() if c.done]
    return max(means, default=None)


def run_sequential(candidates: Sequence[Candidate], outcome_of: Mapping[str, Outcome], policy: Policy, *,
                   prior: Law | None = None, max_decisions: int = 10_000) -> tuple[list[Decision], dict[str, Outcome]]:
    """The policy run one trial at a time against known outcomes (a simulation): the decisions up to the stop
    and the outcomes of the trials it trained."""
    outcomes: dict[str, Outcome] = {}
    decisions = []
    for _ in range(max_decisions):
        decision = decide(candidates, outcomes, (), policy, prior=prior)
        decisions.append(decision)
        if decision.action != "train":
            return decisions, outcomes
        outcomes[decision.trial_id] = outcome_of[decision.trial_id]
    raise RuntimeError(f"no stop after {max_decisions} decisions")
