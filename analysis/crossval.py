"""Out-of-sample checks of a line: hold out a group of points, fit the rest, predict the held-out points.

Groups are configurations (leave-one-configuration-out, the LOO of METHOD.md §5), families or model sizes.
Each fold's line is a closed-form weighted least-squares fit, vectorised over folds so that the bootstrap can
repeat the whole cross-validation hundreds of times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CrossVal:
    """Held-out predictions and their summary. r2 = 1 − PRESS/SS_tot (SS_tot about the mean of all points);
    rmse = sqrt(PRESS/n). Both are unweighted, over every point. NaN when some fold cannot fit a line."""

    predictions: np.ndarray  # (n,) prediction of each point by the fold that held it out
    r2: float
    rmse: float
    n_groups: int


def fold_lines(x: np.ndarray, y: np.ndarray, w: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares lines, one per row of `train`.

    x, y, w: (n,); train: (F, n) of 0/1 (which points each fold fits on). Returns (intercepts, slopes), each
    (F,); NaN where a fold has fewer than two distinct x values.
    """
    tw = train * w
    sw = tw.sum(axis=1)
    xm = (tw @ x) / sw
    ym = (tw @ y) / sw
    dx = x[None, :] - xm[:, None]
    sxx = (tw * dx * dx).sum(axis=1)
    sxy = (tw * dx * (y[None, :] - ym[:, None])).sum(axis=1)
    scale = np.maximum((tw * x * x).sum(axis=1), 1e-300)
    degenerate = ~(sxx > 1e-12 * scale)
    slopes = np.where(degenerate, np.nan, sxy / np.where(degenerate, 1.0, sxx))
    return ym - slopes * xm, slopes


def leave_group_out(x, y, groups, weights=None) -> CrossVal:
    """Hold out each group in turn (all its points), fit a line on the rest, predict the held-out points.

    x, y, groups, weights: (n,) arrays; weights default to 1.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    labels, codes = np.unique(np.asarray(groups), return_inverse=True)
    held = codes[None, :] == np.arange(len(labels))[:, None]  # (G, n)
    intercepts, slopes = fold_lines(x, y, w, (~held).astype(float))
    predictions = intercepts[codes] + slopes[codes] * x
    press = float(np.sum((y - predictions) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - press / ss_tot if ss_tot > 0 else float("nan")
    return CrossVal(predictions=predictions, r2=r2, rmse=float(np.sqrt(press / len(y))), n_groups=len(labels))
