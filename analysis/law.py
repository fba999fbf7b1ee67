"""The law file (law.json): what `opsd analyze` found and everything `opsd screen` needs to predict.

Schema (version 1); intervals are [lo, hi] lists, missing values are null:
{
  "schema_version": 1,
  "settings": {"unit": "configuration"|"seed", "weighted": bool, "by_seeds": bool, "confidence": 0.95,
               "bootstrap": N, "seed": S},
  "families": {FAMILY: LAW, ...},
  "pooled": LAW + {"families": [...], "leave_one_family_out": CV|null, "interaction_test": {...}|null},
  "skipped": {FAMILY: "reason it has no law", ...}
}
LAW = {slope, intercept, slope_ci, intercept_ci, slope_se, intercept_se, slope_p, intercept_p, r2,
       loo_r2, loo_rmse, n_configs, n_trials, n_points, df_resid, residual_var,
       coef_cov ([[var a, cov], [cov, var b]], order intercept, slope), x_mean, x_min, x_max, sizes,
       leave_one_size_out: CV|null, bootstrap: {n_resamples, n_failed, slope_ci, intercept_ci, loo_r2_ci,
       loo_rmse_ci}|null, not_computed: {CHECK: "why it could not be computed", ...}}
CV = {"r2", "rmse", "n_groups"}.
A line on 2 configurations is the line through their two means: slope, intercept, n_*, x_* and sizes only;
slope_ci, intercept_ci, slope_se, intercept_se, slope_p, intercept_p, r2, loo_r2, loo_rmse, residual_var and
coef_cov are null, df_resid is 0, and not_computed says why (CHECK is one of intervals, loo,
leave_one_size_out, leave_one_family_out, interaction_test, bootstrap).
A prediction for gap g: mean = intercept + slope·g, its variance x₀ᵀ·coef_cov·x₀ with x₀ = (1, g); a new
configuration adds residual_var; the interval uses Student's t with df_resid degrees of freedom. A line
without coef_cov has no interval and does not predict (predict.py refuses it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analysis.errors import AnalysisError

SCHEMA_VERSION = 1

# How many configurations (model × context) a fit needs, and what each count allows:
MIN_LINE_CONFIGS = 2  # a line: with 2, the line through the two configuration means, and nothing else
MIN_CONFIGS = 3  # two points always lie on a line; a third is the least that can disagree with it: intervals,
#                  p-values and leave-one-out start here
FEW_CONFIGS = 5  # below this (3 or 4) a fit has few degrees of freedom: the report calls it weak
PAPER_CONTEXTS = 6  # contexts per model in the papers' sweeps
NEEDS = (f"a line needs at least {MIN_LINE_CONFIGS} configurations of different gaps, intervals and "
         f"leave-one-out at least {MIN_CONFIGS}, and a fit on fewer than {FEW_CONFIGS} is weak; "
         f"the papers use {PAPER_CONTEXTS} contexts per model")


@dataclass(frozen=True)
class LineLaw:
    """One fitted line improvement = intercept + slope·gap, with what intervals and predictions need.

    The interval fields are None on a line through two configurations (see `has_intervals`)."""

    slope: float
    intercept: float
    slope_ci: tuple[float, float] | None
    intercept_ci: tuple[float, float] | None
    slope_se: float | None
    intercept_se: float | None
    slope_p: float | None
    intercept_p: float | None
    r2: float | None
    loo_r2: float | None
    loo_rmse: float | None
    n_configs: int
    n_trials: int
    n_points: int
    df_resid: float
    residual_var: float | None
    coef_cov: tuple[tuple[float, float], tuple[float, float]] | None
    x_mean: float
    x_min: float
    x_max: float
    sizes: tuple[float, ...] = ()
    leave_one_size_out: dict[str, Any] | None = None
    bootstrap: dict[str, Any] | None = None
    # Only on the pooled law:
    families: tuple[str, ...] | None = None
    leave_one_family_out: dict[str, Any] | None = None
    interaction_test: dict[str, Any] | None = None
    # What could not be computed for this line, and why: {check: reason} (see the module docstring).
    not_computed: dict[str, str] = field(default_factory=dict)

    @property
    def has_intervals(self) -> bool:
        """False for a line through two configurations: no intervals, p-values or predictions."""
        return self.slope_ci is not None and self.coef_cov is not None


@dataclass(frozen=True)
class Law:
    settings: dict[str, Any]
    families: dict[str, LineLaw]
    pooled: LineLaw | None
    skipped: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def line(self, family: str) -> LineLaw:
        """The law of `family`, or the pooled law for family "pooled"."""
        if family == "pooled" and self.pooled is not None:
            return self.pooled
        if family in self.families:
            return self.families[family]
        known = ", ".join([*self.families, "pooled"] if self.pooled else self.families)
        why = f" ({self.skipped[family]})" if family in self.skipped else ""
        raise AnalysisError(f"the law has no family {family!r}{why}; it has: {known}")

    def to_dict(self) -> dict[str, Any]:
        def clean(value: Any) -> Any:
            # JSON has no NaN: an undefined metric is null.
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        def line(item: LineLaw) -> dict[str, Any]:
            out = asdict(item)
            if item.families is None:  # the pooled-only keys stay out of family entries
                for key in ("families", "leave_one_family_out", "interaction_test"):
                    out.pop(key)
            return clean(out)

        return {
            "schema_version": self.schema_version,
            "settings": clean(self.settings),
            "families": {name: line(item) for name, item in self.families.items()},
            "pooled": line(self.pooled) if self.pooled else None,
            "skipped": dict(self.skipped),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Law:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise AnalysisError(f"law file has schema_version {data.get('schema_version')!r}; "
                                f"this version reads {SCHEMA_VERSION}")

        def line(name: str, item: dict[str, Any]) -> LineLaw:
            try:
                values = {k: _none_to_nan(k, v) for k, v in item.items() if k in LineLaw.__dataclass_fields__}
                for key in ("slope_ci", "intercept_ci", "sizes", "families"):
                    if values.get(key) is not None:
                        values[key] = tuple(values[key])
                cov = item["coef_cov"]
                values["coef_cov"] = None if cov is None else tuple(tuple(float(v) for v in row) for row in cov)
                values["not_computed"] = dict(values.get("not_computed") or {})
                return LineLaw(**values)
            except (KeyError, TypeError, ValueError) as err:
                raise AnalysisError(f"law file: entry {name!r} is incomplete or malformed ({err})") from err

        if not isinstance(data.get("families"), dict):
            raise AnalysisError("law file has no 'families' object")
        return cls(
            settings=dict(data.get("settings", {})),
            families={name: line(name, item) for name, item in data["families"].items()},
            pooled=line("pooled", data["pooled"]) if data.get("pooled") else None,
            skipped=dict(data.get("skipped", {})),
        )


def _none_to_nan(key: str, value: Any) -> Any:
    numeric = {"loo_r2", "loo_rmse", "slope_p", "intercept_p", "r2"}
    return float("nan") if value is None and key in numeric else value


def load_law(path: str | Path) -> Law:
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"law file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnalysisError(f"law file {path} is not JSON: {err}") from err
    return Law.from_dict(data)
