"""The one error class of `analysis`: bad input a user can fix, reported by the CLI in one line (exit 2)."""

from __future__ import annotations


class AnalysisError(ValueError):
    """Results, a law file or a setting that the analysis cannot use; the message says what to fix."""

    user_facing = True
