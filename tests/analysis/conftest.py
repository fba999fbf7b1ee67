"""Shared builders of trials tables for the analysis tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def trials_from(points, *, family="fam", size=1.0, model=None, seeds_per_config=None) -> pd.DataFrame:
    """Trials table from (context, [gaps per seed], [improvements per seed]) or (context, gap, improvement)."""
    rows = []
    for i, (context, gaps, improvements) in enumerate(points):
        gaps, improvements = np.atleast_1d(gaps), np.atleast_1d(improvements)
        for seed, (g, d) in enumerate(zip(gaps, improvements)):
            rows.append({
                "trial_id": f"{model or family}/{context}/{seed}", "model": model or f"{family}-{size:g}b",
                "model_family": family, "model_size_b": size, "context": context, "seed": seed,
                "initial_student_acc": 0.3, "initial_teacher_acc": 0.3 + g, "initial_gap": float(g),
                "final_student_acc": 0.3 + d, "improvement": float(d), "status": "completed",
            })
    return pd.DataFrame(rows)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def noisy_trials(rng, *, families=(("fam_a", 1.0, 0.8, 0.0), ("fam_b", 7.0, 0.5, 0.02)), n_contexts=7,
                 n_seeds=3, sizes_per_family=1) -> pd.DataFrame:
    """Trials of several families (name, size, slope, intercept) with seed noise on both axes."""
    frames = []
    for family, size, slope, intercept in families:
        for k in range(sizes_per_family):
            s = size * (k + 1)
            points = []
            for c in range(n_contexts):
                true_gap = rng.uniform(0, 0.3)
                gaps = true_gap + rng.normal(0, 0.01, n_seeds)
                points.append((f"ctx{c}", gaps, intercept + slope * gaps + rng.normal(0, 0.02, n_seeds)))
            frames.append(trials_from(points, family=family, size=s))
    return pd.concat(frames, ignore_index=True)
