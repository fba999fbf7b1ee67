"""analysis: the predictive law from sweep results (Parquet alone; no torch, Ray or vLLM).

The names below are loaded on first use, so `opsd` can register the `analyze` and `screen` commands without
importing statsmodels and matplotlib for every other command.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "AnalysisError": "analysis.errors",
    "load_results": "analysis.results", "completed_trials": "analysis.results", "join_steps": "analysis.results",
    "aggregate_configs": "analysis.aggregate", "fit_points": "analysis.aggregate",
    "fit_law": "analysis.fit", "fit_line": "analysis.fit", "FitResult": "analysis.fit",
    "leave_group_out": "analysis.crossval",
    "bootstrap_draws": "analysis.bootstrap", "attach_bootstrap": "analysis.bootstrap",
    "bootstrap_obstacles": "analysis.bootstrap",
    "Law": "analysis.law", "LineLaw": "analysis.law", "load_law": "analysis.law",
    "predict_improvement": "analysis.predict", "screen": "analysis.predict",
    "fig1_law": "analysis.figures", "fig2_dynamics": "analysis.figures", "fig3_scale": "analysis.figures",
    "run_analysis": "analysis.report",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(_NAMES[name]), name)
