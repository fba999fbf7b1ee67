"""Guided sweeps against the full grid, simulated at the paper's scale: Fig. 1's grid (Qwen3-8B × 6 contexts × 3
seeds, Olmo-3-7B-Instruct × 6 × 2 seeds, the plan's GPU-hours per trial from sweeps/paper_fig1.yaml), outcomes
drawn from the analysis's synthetic generator (analysis/synthetic.py: the paper's two families and their laws,
seed noise on the gap and the improvement, gaps spread as the paper's contexts spread them).

Each simulated sweep draws one grid of outcomes; the full grid trains all 30 trials, each guided policy
(analysis/guided.py) trains the trials it chooses, one at a time, the screen's gap of a configuration being
its first seed's measured gap (the screen samples what that trial's first evaluation samples). Every sweep is
then fitted as `opsd analyze` fits it (configuration means, OLS) and compared with the true law.

    python benchmarks/guided_vs_grid.py                 500 sweeps (about a minute)
    python benchmarks/guided_vs_grid.py --sweeps 2000 --improvement-noise 0.03

Printed per policy: GPU-hours (mean, and against the full grid), trials, the slope's RMSE against the true law
and the coverage of its 95% interval per family, how the runs stopped, and for every policy how often the
configuration it measured best is the truly best one (the `best` goal's aim). The `law` goal's target is the
median width of the full grid's slope intervals in a pilot of the same number of sweeps (other seeds): "as
precise as the full grid".
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.aggregate import aggregate_configs  # noqa: E402
from analysis.fit import fit_line  # noqa: E402
from analysis.guided import Candidate, Outcome, Policy, run_sequential  # noqa: E402
from analysis.law import MIN_CONFIGS  # noqa: E402
from analysis.synthetic import LAWS, MODELS, make_trials  # noqa: E402

FAMILIES = ("qwen3", "olmo3")
SEEDS = {"qwen3": 3, "olmo3": 2}  # METHOD.md section 5 / sweeps/paper_fig1.yaml


def plan_costs() -> dict[str, float]:
    """GPU-hours per trial of Fig. 1 by family, from `opsd sweep plan`'s cost model on sweeps/paper_fig1.yaml."""
    from orchestrator.plan import estimate
    from orchestrator.sweep_file import load_sweep

    root = Path(__file__).resolve().parents[1]
    sweep, points = load_sweep(root / "sweeps" / "paper_fig1.yaml")
    hours = {}
    for e in estimate(sweep, points, []):
        hours[e.point.config.model.family] = e.device_hours
    return hours


def draw_grid(rng: np.random.Generator, costs: dict[str, float], **noise) -> tuple[pd.DataFrame, list[Candidate]]:
    models = [m for m in MODELS if m[0] in ("Qwen3-8B", "Olmo-3-7B-Instruct")]
    trials = make_trials(rng, models=models, n_seeds=max(SEEDS.values()), n_failed=0, **noise)
    trials = trials[trials["seed"] < trials["model_family"].map(SEEDS)].reset_index(drop=True)
    screened = trials[trials["seed"] == 0].set_index(["model", "context"])["initial_gap"]
    candidates = [Candidate(r.trial_id, r.model_family, r.model, r.context, int(r.seed),
                            float(screened[(r.model, r.context)]), costs[r.model_family]) for r in trials.itertuples()]
    return trials, candidates


def evaluate(trials: pd.DataFrame, trained: list[str]) -> dict:
    """The fit of the trained trials as `opsd analyze` fits by default (OLS on configuration means: the
    analysis's aggregate_configs and fit_line, without fit_law's diagnostics), against the truth."""
    sub = trials[trials["trial_id"].isin(trained)]
    out: dict = {"hours": float(sub["cost"].sum()), "trials": len(sub)}
    configs = aggregate_configs(sub)
    for family in FAMILIES:
        mine = configs[configs["model_family"] == family]
        true_slope = LAWS[family][1]
        out[f"{family}_err"] = out[f"{family}_cover"] = out[f"{family}_width"] = np.nan
        if len(mine) < MIN_CONFIGS:
            continue
        res = fit_line(mine["gap_mean"], mine["improvement_mean"])
        lo, hi = np.asarray(res.conf_int(alpha=0.05))[1]
        out[f"{family}_err"] = float(res.params[1]) - true_slope
        out[f"{family}_cover"] = float(lo <= true_slope <= hi)
        out[f"{family}_width"] = hi - lo
    truth = trials.assign(true=[LAWS[f][0] + LAWS[f][1] * g for f, g in zip(trials["model_family"], trials["true_gap"])])
    true_best = truth.groupby(["model", "context"])["true"].first().idxmax()
    measured = sub.groupby(["model", "context"])["improvement"].mean()
    out["best_found"] = float(len(measured) > 0 and measured.idxmax() == true_best)
    return out


def simulate(n_sweeps: int, seed: int, policies: dict[str, Policy | None], costs: dict[str, float],
             **noise) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(seed)
    for i in range(n_sweeps):
        trials, candidates = draw_grid(rng, costs, **noise)
        trials = trials.assign(cost=trials["model_family"].map(costs))
        outcomes = {r.trial_id: Outcome(r.initial_gap, r.improvement) for r in trials.itertuples()}
        for name, policy in policies.items():
            if policy is None:
                rows.append({"policy": name, "sweep": i, "stop": "-", **evaluate(trials, list(trials["trial_id"]))})
                continue
            decisions, done = run_sequential(candidates, outcomes, policy)
            stop = decisions[-1].reason.split(":")[0]
            rows.append({"policy": name, "sweep": i, "stop": stop, **evaluate(trials, list(done))})
    return pd.DataFrame(rows)


def table(results: pd.DataFrame, grid_hours: float) -> str:
    lines = ["| policy | GPU-hours (of the grid) | trials | slope RMSE qwen3 / olmo3 | 95% CI coverage qwen3 / olmo3 "
             "| CI width qwen3 / olmo3 (median) | best config found | stops |", "|" + "---|" * 8]
    for name, sub in results.groupby("policy", sort=False):
        def rmse(f):
            e = sub[f"{f}_err"].dropna()
            return np.sqrt(np.mean(e ** 2)) if len(e) else np.nan
        fitted = min(sub[f"{f}_err"].notna().mean() for f in FAMILIES)
        stops = Counter(sub["stop"])
        stop_text = "-" if list(stops) == ["-"] else ", ".join(f"{k} {v / len(sub):.0%}" for k, v in stops.most_common())
        lines.append(
            f"| {name} | {sub['hours'].mean():.0f} ({sub['hours'].mean() / grid_hours:.0%}) | {sub['trials'].mean():.1f} "
            f"| {rmse('qwen3'):.3f} / {rmse('olmo3'):.3f}"
            + (f" ({fitted:.0%} fitted)" if fitted < 1 else "")
            + f" | {sub['qwen3_cover'].mean():.1%} / {sub['olmo3_cover'].mean():.1%} "
            f"| {sub['qwen3_width'].median():.3f} / {sub['olmo3_width'].median():.3f} "
            f"| {sub['best_found'].mean():.0%} | {stop_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=500, help="simulated sweeps (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--improvement-noise", type=float, default=0.015,
                        help="SD of a seed's improvement about its configuration's law value (default 0.015)")
    parser.add_argument("--gap-noise", type=float, default=0.01, help="SD of a measured gap (default 0.01)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    costs = plan_costs()
    grid_hours = sum(costs[f] * 6 * n for f, n in SEEDS.items())
    noise = {"improvement_noise": args.improvement_noise, "gap_noise": args.gap_noise}
    pilot = simulate(args.sweeps, args.seed + 1_000_003, {"full grid": None}, costs, **noise)
    target = float(np.nanmedian(pilot[[f"{f}_width" for f in FAMILIES]].to_numpy()))
    policies = {
        "full grid (Fig. 1)": None,
        f"guided, goal law (slope CI < {target:.3f})": Policy("law", slope_ci_width=target),
        f"guided, goal law (slope CI < {1.5 * target:.3f})": Policy("law", slope_ci_width=1.5 * target),
        f"guided, goal law, budget {grid_hours / 2:.0f} GPU-h": Policy("law", slope_ci_width=target,
                                                                       max_hours=grid_hours / 2),
        "guided, goal best": Policy("best"),
    }
    results = simulate(args.sweeps, args.seed, policies, costs, **noise)
    print(f"Simulated: {args.sweeps} sweeps drawn from analysis/synthetic.py (laws {LAWS}, gap noise "
          f"{args.gap_noise}, improvement noise {args.improvement_noise}); Fig. 1's grid of 30 trials, "
          f"{', '.join(f'{f} {h:.1f} GPU-h' for f, h in costs.items())} per trial (`opsd sweep plan`): "
          f"{grid_hours:.0f} GPU-hours. Law target: the full grid's median slope-CI width in a pilot, {target:.3f}.")
    print()
    print(table(results, grid_hours))
    print()
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
