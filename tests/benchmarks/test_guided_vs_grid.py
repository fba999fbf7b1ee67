"""The guided benchmark's bound: the least slope SD a design of the grid's trials can have."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import guided_vs_grid as bench  # noqa: E402

from analysis.synthetic import CONTEXT_GAPS, LAWS, MODELS  # noqa: E402

NOISE = {"improvement_noise": 0.015, "gap_noise": 0.01}


def test_the_full_grid_is_its_own_best_design_with_the_textbook_slope_variance():
    # Equal seeds n on every context: the slope's variance is σ²/(n·Σ(x − x̄)²), σ² the per-seed noise.
    size = next(m[2] for m in MODELS if m[0] == "Qwen3-8B")
    x = np.array(list(CONTEXT_GAPS.values())) * (1 + 0.1 * np.log2(size + 1))
    sigma2 = 0.015 ** 2 + LAWS["qwen3"][1] ** 2 * 0.01 ** 2
    sd, seeds = bench.best_design("qwen3", 18, **NOISE)
    assert seeds == (3,) * 6
    assert sd == pytest.approx(np.sqrt(sigma2 / (3 * np.sum((x - x.mean()) ** 2))), rel=1e-12)


def test_half_the_trials_cannot_match_the_full_grid_unless_more_seeds_are_offered():
    full = bench.best_design("qwen3", 18, **NOISE)[0]
    half, seeds = bench.best_design("qwen3", 9, **NOISE)
    assert half > full and sum(seeds) <= 9 and max(seeds) <= 3
    wider, wider_seeds = bench.best_design("qwen3", 9, max_seeds=6, **NOISE)
    assert wider < half and max(wider_seeds) > 3
    # ... and then only with the trials at the ends of the gap range (the first and last contexts).
    assert wider_seeds[0] + wider_seeds[-1] >= 8
