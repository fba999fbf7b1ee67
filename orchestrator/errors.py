"""The error the sweep commands raise for bad input; the CLI prints it as one line and exits 2."""

from __future__ import annotations


class SweepError(ValueError):
    """A sweep file, sweep folder or cluster that cannot be used; the message names the field or path."""

    user_facing = True


class TrialFailed(RuntimeError):
    """A trial's process ended without finishing; Ray Tune retries the trial (FailureConfig)."""


class SweepStopped(RuntimeError):
    """Ray Tune's driver itself failed (not one trial); the message says where the traceback is and how to
    continue."""

    user_facing = True
