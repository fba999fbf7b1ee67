"""Figures on synthetic results: files exist and are not blank, and what is drawn is what was fitted."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.figures import fig1_law, fig2_dynamics, fig3_scale
from analysis.fit import fit_law
from analysis.results import completed_trials, join_steps
from analysis.synthetic import make_steps, make_trials


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    rng = np.random.default_rng(7)
    raw = make_trials(rng)
    steps = make_steps(raw, rng)  # only trial_id and metrics: model and context come by the join
    trials = completed_trials(raw)
    fit = fit_law(trials)
    joined = join_steps(steps, raw)
    return {"out": out, "fit": fit, "steps": joined, "trials": trials,
            "fig1": fig1_law(fit, out), "fig2": fig2_dynamics(joined, out), "fig3": fig3_scale(fit, out)}


@pytest.mark.parametrize("stem", ["fig1_law", "fig2_dynamics", "fig3_scale"])
def test_png_and_pdf_are_written_and_not_blank(drawn, stem):
    from matplotlib.image import imread

    png, pdf = drawn["out"] / f"{stem}.png", drawn["out"] / f"{stem}.pdf"
    assert pdf.stat().st_size > 5_000 and pdf.read_bytes().startswith(b"%PDF")
    image = imread(png)
    height, width = image.shape[:2]
    # Paper size at 300 dpi: a double column is 7 in wide (tight bounding box trims a little).
    assert 1500 < width <= 2200 and height > 500
    ink = (image[..., :3].mean(axis=2) < 0.9).mean()
    assert 0.02 < ink < 0.6  # something is drawn, and it is not a filled rectangle


def test_fig1_draws_each_family_line_with_the_fitted_slope_and_a_band_around_it(drawn):
    law = drawn["fit"].law
    for family, line in law.families.items():
        d = drawn["fig1"]["families"][family]
        assert d["slope"] == pytest.approx(line.slope, rel=1e-9)
        assert d["intercept"] == pytest.approx(line.intercept, abs=1e-9)
        assert np.all(d["band_lo"] < d["y"]) and np.all(d["y"] < d["band_hi"])
        assert d["n_points"] == line.n_configs
        assert d["x"].min() < line.x_min and d["x"].max() > line.x_max


def test_fig2_curves_are_seed_means_of_the_step_rows(drawn):
    steps = drawn["steps"]
    curves = drawn["fig2"]["curves"]
    assert set(curves) == set(zip(steps["context"], steps["model"]))
    context, model = "peer_solution_feedback", "Qwen3-8B"
    rows = steps[(steps["context"] == context) & (steps["model"] == model)]
    last = rows[rows["step"] == rows["step"].max()]
    curve = curves[(context, model)]
    assert curve["student_mean"].iloc[-1] == pytest.approx(last["student_acc"].mean())
    assert curve["teacher_sd"].iloc[-1] == pytest.approx(last["teacher_acc"].std(ddof=1))
    # The student closes part of the gap to its self-teacher over training.
    gap = curve["teacher_mean"] - curve["student_mean"]
    assert gap.iloc[-1] < gap.iloc[0]


def test_fig3_fits_one_line_per_model_size(drawn):
    configs = drawn["fit"].configs
    models = drawn["fig3"]["models"]
    assert sorted(v["size"] for v in models.values()) == sorted(configs["model_size_b"].unique())
    for model, d in models.items():
        sub = configs[configs["model"] == model]
        X = np.column_stack([np.ones(len(sub)), sub["gap_mean"]])
        slope = np.linalg.lstsq(X, sub["improvement_mean"].to_numpy(), rcond=None)[0][1]
        assert d["slope"] == pytest.approx(slope, rel=1e-9)
        assert d["line_slope"] == pytest.approx(slope, rel=1e-9)
        assert d["slope_ci"][0] < slope < d["slope_ci"][1]


def test_one_context_per_size_draws_the_family_line_in_a_single_column(tmp_path):
    # The paper's scale design: each size trained with a couple of contexts only, too few for a line per size.
    from matplotlib.image import imread

    from analysis.synthetic import MODELS

    rng = np.random.default_rng(3)
    raw = make_trials(rng, models=MODELS[:4], contexts=("feedback", "peer_solution_feedback"), n_failed=0)
    fit = fit_law(completed_trials(raw))
    drawn = fig3_scale(fit, tmp_path)
    assert drawn["models"] == {} and drawn["family_lines"] == ["qwen3"]
    width = imread(tmp_path / "fig3_scale.png").shape[1]
    assert width == pytest.approx(3.4 * 300, abs=2)
