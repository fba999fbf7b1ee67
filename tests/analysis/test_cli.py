"""`opsd analyze` end to end on a synthetic sweep, and the loading rules users rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.fit import fit_law
from analysis.results import completed_trials, join_steps, load_results
from analysis.synthetic import write_synthetic

OPSD = str(Path(sys.executable).parent / "opsd")
LAW_KEYS = {"slope", "intercept", "slope_ci", "intercept_ci", "r2", "loo_r2", "loo_rmse", "n_configs", "n_trials"}


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """Two `opsd analyze` runs on one synthetic sweep, started together: default settings with a bootstrap,
    and seed-level weighted fits without one."""
    root = tmp_path_factory.mktemp("sweep")
    results = write_synthetic(root / "results", seed=3)
    commands = {
        "default": [OPSD, "analyze", str(results), "--out", str(root / "out"), "--bootstrap", "200", "--seed", "9"],
        "seed_weighted": [OPSD, "analyze", str(results / "trials.parquet"), "--out", str(root / "seed_weighted"),
                          "--seed-level", "--weighted", "--bootstrap", "0"],
    }
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    runs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[name] = subprocess.CompletedProcess(commands[name], proc.returncode, stdout, stderr)
    return results, root, runs


def test_analyze_writes_law_figures_and_report(analyzed):
    results, root, runs = analyzed
    proc, out = runs["default"], root / "out"
    assert proc.returncode == 0, proc.stderr
    for name in ("law.json", "report.md", "fig1_law.png", "fig1_law.pdf", "fig2_dynamics.png",
                 "fig2_dynamics.pdf", "fig3_scale.png", "fig3_scale.pdf"):
        assert (out / name).stat().st_size > 1000, name
    law = json.loads((out / "law.json").read_text())
    assert law["settings"] == {"unit": "configuration", "weighted": False, "by_seeds": False, "confidence": 0.95,
                               "bootstrap": 200, "seed": 9}
    assert set(law["families"]) == {"qwen3", "olmo3"}
    for entry in [*law["families"].values(), law["pooled"]]:
        assert LAW_KEYS <= set(entry)
        assert entry["bootstrap"]["n_resamples"] == 200
        assert entry["slope_ci"][0] < entry["slope"] < entry["slope_ci"][1]
    assert {"p", "f", "common_slope"} <= set(law["pooled"]["interaction_test"])
    # The synthetic sweep was drawn with slopes 0.8 (qwen3) and 0.6 (olmo3) on the true gaps.
    assert law["families"]["qwen3"]["slope"] == pytest.approx(0.8, abs=0.1)
    assert law["families"]["olmo3"]["slope"] == pytest.approx(0.6, abs=0.15)
    # The same numbers as the API on the same trials.
    trials = completed_trials(load_results(results)[0])
    api = fit_law(trials).law.to_dict()
    assert law["families"]["qwen3"]["slope"] == pytest.approx(api["families"]["qwen3"]["slope"], rel=1e-12)
    report = (out / "report.md").read_text()
    for heading in ("## Verdict", "## Fits", "## Configurations", "## Diagnostics", "## Figures"):
        assert heading in report
    assert "**qwen3: the law holds.**" in report and "Cook's D" in report and "qwen3: λ = " in report
    assert "qwen3: improvement =" in proc.stdout


def test_seed_level_weighted_analysis_without_bootstrap(analyzed):
    _, root, runs = analyzed
    assert runs["seed_weighted"].returncode == 0, runs["seed_weighted"].stderr
    law = json.loads((root / "seed_weighted" / "law.json").read_text())
    assert law["settings"]["unit"] == "seed" and law["settings"]["weighted"] is True
    qwen = law["families"]["qwen3"]
    assert qwen["n_points"] == qwen["n_trials"] == 72 and qwen["bootstrap"] is None


def test_failed_trials_and_extra_columns_are_ignored(tmp_path):
    results = write_synthetic(tmp_path, seed=1)
    raw, steps = load_results(results)
    assert (raw["status"] != "completed").sum() == 1 and "gpu_hours" in raw.columns
    trials = completed_trials(raw)
    assert len(trials) == len(raw) - 1 and "gpu_hours" not in trials.columns
    # A CSV with the same rows gives the same law.
    raw.to_csv(tmp_path / "trials.csv", index=False)
    again = completed_trials(load_results(tmp_path / "trials.csv")[0])
    assert fit_law(again).law.to_dict() == fit_law(trials).law.to_dict()


def test_steps_take_model_and_context_from_trials_through_trial_id(tmp_path):
    results = write_synthetic(tmp_path, seed=2)
    raw, steps = load_results(results)
    assert "model" not in steps.columns
    extra = pd.DataFrame({"trial_id": [raw["trial_id"].iloc[0]], "step": [3], "phase": ["train"],
                          "student_acc": [0.9], "teacher_acc": [0.9]})
    joined = join_steps(pd.concat([steps, extra], ignore_index=True), raw)
    assert set(joined["phase"]) == {"eval"}  # train-phase rows do not enter the dynamics figure
    row = joined[joined["trial_id"] == raw["trial_id"].iloc[5]].iloc[0]
    assert (row["model"], row["context"]) == (raw["model"].iloc[5], raw["context"].iloc[5])
    assert not joined["trial_id"].str.startswith("failed").any()
    assert np.isfinite(joined["student_acc"]).all()


def test_a_guided_sweeps_results_are_fitted_by_their_seed_counts_unless_told_otherwise(tmp_path):
    results = write_synthetic(tmp_path / "results", seed=5)
    trials = pd.read_parquet(results / "trials.parquet")
    # What a guided sweep's collect writes: planned device-hours, and configurations with unequal seeds.
    first = trials.groupby(["model", "context"]).head(1).index
    trials = trials[trials.index.isin(first) | (trials["context"] == trials["context"].iloc[0])]
    trials.assign(planned_hours=2.0).to_parquet(results / "trials.parquet")
    outs = {"": tmp_path / "auto", "--unweighted": tmp_path / "unweighted"}
    runs = {flag: subprocess.run([OPSD, "analyze", str(results), "--out", str(out), "--bootstrap", "0",
                                  *([flag] if flag else [])], capture_output=True, text=True, timeout=300)
            for flag, out in outs.items()}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr[-2000:] for r in runs.values()]
    assert "a guided sweep: configurations weighted by their seed counts" in runs[""].stdout
    assert "a guided sweep" not in runs["--unweighted"].stdout
    laws = {flag: json.loads((out / "law.json").read_text()) for flag, out in outs.items()}
    assert laws[""]["settings"]["by_seeds"] is True and laws["--unweighted"]["settings"]["by_seeds"] is False
    # Independently: WLS of the configuration means with their seed counts as weights, by hand.
    kept = completed_trials(trials)
    for family, rows in kept.groupby("model_family"):
        means = rows.groupby(["model", "context"]).agg(gap=("initial_gap", "mean"), imp=("improvement", "mean"),
                                                       n=("seed", "size"))
        w, x, y = means["n"].to_numpy(float), means["gap"].to_numpy(), means["imp"].to_numpy()
        xb, yb = np.average(x, weights=w), np.average(y, weights=w)
        slope = np.sum(w * (x - xb) * (y - yb)) / np.sum(w * (x - xb) ** 2)
        assert laws[""]["families"][family]["slope"] == pytest.approx(slope, rel=1e-9)
        assert laws["--unweighted"]["families"][family]["slope"] != pytest.approx(slope, rel=1e-6)
