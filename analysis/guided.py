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
   - `law`: for each family whose slope interval is still wider than the target, every affordable action (a
     new configuration, or the next seed of one already chosen) is scored by how much it is expected to
     narrow the interval per device-hour, and the best is trained. The expected width of an OLS on
     configuration means (what `opsd analyze` reports) with k configurations at gaps x_i and n_i seeds is
     2·t(k−2)·sqrt(Σ(x_i − x̄)²(τ² + s²/n_i))/Sxx (`expected_width`): s² is the seed variance of the
     improvement pooled over configurations with several seeds, τ² the rest of the fit's residual variance
     (the configurations' scatter about the law). A new configuration adds a degree of freedom and spread; an
     extra seed lowers its configuration's noise, most where the leverage is. Stop when every family's
     interval is narrower than the target.
   - `best`: train the untrained configuration with the highest upper prediction bound; stop when no
     untrained configuration's upper bound beats the best measured improvement.
4. **Budget.** An action whose cost would take the sweep past `max_trials` or `max_hours` (completed, failed
   and running trials counted) is never taken; when none is left the sweep stops and says so.

A prior law (law.json of an earlier sweep) combines with each family's own fit as two independent estimates of
the same line (precision-weighted coefficients); before a family's own fit exists, it predicts alone. The
`law` goal still needs MIN_CONFIGS configurations of the sweep's own before a family's interval counts.

Decisions depend only on the sets of outcomes and running trials, never on their order, so that a sweep
killed and resumed decides as one that was not (ties go to the candidate listed first).
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
    """The family's line on its completed configurations' means (analysis.fit.fit_line, as `opsd analyze`),
    combined with `prior` where both have intervals; None when neither gives a line."""
    done = [c for c in configs if c.done]
    own = None
    x = np.array([c.x for c in done])
    if len(done) >= 2 and np.ptp(x) > 1e-12:
        y = np.array([np.mean([o.improvement for o in c.done]) for c in done])
        res = fit_line(x, y)
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


def seed_variance(configs: Mapping[str, _Config]) -> float | None:
    """The improvement's variance between seeds of one configuration, pooled over configurations with two or
    more completed seeds; None without any."""
    ss, df = 0.0, 0
    for c in configs.values():
        if len(c.done) >= 2:
            y = np.array([o.improvement for o in c.done])
            ss += float(np.sum((y - y.mean()) ** 2))
            df += len(y) - 1
    return ss / df if df else None


def expected_width(x: Sequence[float], n: Sequence[int], *, tau2: float, s2: float, confidence: float) -> float:
    """Expected width of the slope's interval of an OLS on configuration means at gaps `x` with `n` seeds each:
    2·t(k−2)·sqrt(Σ(x_i − x̄)²·(τ² + s²/n_i)) / Sxx, the slope's standard error when configuration i's mean
    has variance τ² + s²/n_i (equal variances make it the textbook sqrt(σ²/Sxx)); infinite below MIN_CONFIGS
    configurations or without spread."""
    x, n = np.asarray(x, dtype=float), np.asarray(n, dtype=float)
    k = len(x)
    dev2 = (x - x.mean()) ** 2 if k else x
    sxx = float(np.sum(dev2))
    if k < MIN_CONFIGS or sxx <= 1e-12:
        return float("inf")
    return 2 * _t(confidence, k - 2) * np.sqrt(float(np.sum(dev2 * (tau2 + s2 / n)))) / sxx


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
    # A fit without residual variance (every configuration on its line, e.g. equal improvements measured on few
    # problems) has an interval of width 0 that says nothing: it does not count as a known law.
    met = {f: policy.goal == "law" and fits[f] is not None and fits[f].predicts and fits[f].residual_var > 0
           and fits[f].n_configs >= MIN_CONFIGS and fits[f].width <= policy.slope_ci_width for f in families}
    summary = {f: {**fits[f].summary(), **({"met": bool(met[f])} if policy.goal == "law" else {})}
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
        widths = ", ".join(f"{f} {fits[f].width:.3g}" for f in families)
        return done("stop", f"goal reached: every family's slope interval is narrower than "
                            f"{policy.slope_ci_width:g} ({widths})")
    if policy.goal == "best" and best is not None and all(fits[f] is not None and fits[f].predicts for f in families):
        bounds = [(float(fits[c.family].predict([c.gap])["pi_hi"][0]), key) for key, c in configs.items()
                  if not c.chosen and c.untried]
        top = max(bounds, default=None)
        if top is None or top[0] <= best[0]:
            beyond = f"the highest is {top[0]:+.3f} ({top[1]})" if top else "none is left"
            return done("stop", f"goal reached: no untrained configuration's upper prediction bound beats the best "
                                f"measured improvement {best[0]:+.3f} ({best[1]}): {beyond}")

    wanted: list[tuple[str, Candidate]] = []  # what the policy would train, affordable or not, best first
    # 1. Design: spread each family that cannot predict yet (the law goal needs the sweep's own line).
    needs_design = [f for f in families if _needs_design(f, members[f], fits[f], policy.goal)]
    for f in sorted(needs_design, key=lambda f: (sum(1 for c in members[f] if c.chosen), families.index(f))):
        pick = _design_pick(members[f])
        if pick is not None:
            wanted.append((f"spreads {f}'s screened gaps ({sum(1 for c in members[f] if c.chosen) + 1} of at least "
                           f"{MIN_CONFIGS} configurations, every model)", pick))
    s2 = seed_variance(configs)
    if policy.goal == "law":
        unmet = [f for f in families if not met[f] and f not in needs_design]
        # 2. Seed noise, once: the most leveraged configuration's second seed.
        if s2 is None and not any(c.chosen >= 2 for c in configs.values()):
            for f in unmet:
                chosen = [c for c in members[f] if c.chosen and c.untried]
                if chosen:
                    xs = np.array([c.x for c in members[f] if c.chosen])
                    top = max(chosen, key=lambda c: abs(c.x - xs.mean()))
                    wanted.append((f"measures the seed noise: a second seed of {f}'s configuration farthest from "
                                   f"its mean gap", top.untried[0]))
        # 3. The action that narrows an unmet family's slope interval most per device-hour.
        scored = []
        for f in unmet:
            scored += _law_actions(f, members[f], fits[f], s2, policy.confidence)
        scored.sort(key=lambda item: -item[0])
        for gain, reason, c in scored:
            if gain > 0:
                wanted.append((reason, c))
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
                            f"wider than {policy.slope_ci_width:g} ("
                            + ", ".join(f"{f} {fits[f].width:.3g}" for f in unmet) + ")")
    return done("stop", f"no trial left is expected to narrow the slope's interval of {', '.join(unmet)}"
                if unmet else "no trial left to choose")


def _prior_line(prior: Law | None, family: str) -> LineLaw | None:
    return prior.families.get(family) if prior is not None else None


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


def _law_actions(family: str, members: Sequence[_Config], fit: FamilyFit | None, s2: float | None,
                 confidence: float) -> list[tuple[float, str, Candidate]]:
    """(narrowing of the expected slope interval per device-hour, reason, candidate) for every next trial."""
    design = [c for c in members if c.chosen]
    x = [c.x for c in design]
    n = [c.chosen for c in design]
    resid = fit.residual_var if fit is not None and fit.predicts and fit.source != "prior" else None
    if resid is None:
        return []
    s2 = s2 or 0.0
    tau2 = max(resid - float(np.mean([s2 / max(len(c.done), 1) for c in design])), 0.0)
    now = expected_width(x, n, tau2=tau2, s2=s2, confidence=confidence)
    out = []
    for c in members:
        if not c.untried:
            continue
        nxt = c.untried[0]
        if c.chosen:
            i = design.index(c)
            after = expected_width(x, [m + (j == i) for j, m in enumerate(n)], tau2=tau2, s2=s2,
                                   confidence=confidence)
            what = f"seed {c.chosen + 1} of its configuration"
        else:
            after = expected_width([*x, c.gap], [*n, 1], tau2=tau2, s2=s2, confidence=confidence)
            what = "a new configuration"
        gain = (now - after) / max(nxt.cost, 1e-12)
        out.append((gain, f"({what}) narrows {family}'s expected slope interval most per device-hour: "
                          f"{now:.3g} -> {after:.3g}", nxt))
    return out


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
