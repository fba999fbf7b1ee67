"""The errors the sweep commands raise; bad input is printed as one line and `opsd` exits CONFIG_ERROR_EXIT."""

from __future__ import annotations

# The exit code of `opsd` for bad input (a user-facing error: settings, files, models): a trial that exits with
# it would fail the same way again, so the sweep does not retry it.
CONFIG_ERROR_EXIT = 2


class SweepError(ValueError):
    """A sweep file, sweep folder or cluster that cannot be used; the message names the field or path."""

    user_facing = True


class TrialFailed(RuntimeError):
    """A trial's process ended without finishing; Ray Tune retries the trial (FailureConfig)."""


class SweepStopped(RuntimeError):
    """Ray Tune's driver itself failed (not one trial); the message says where the traceback is and how to
    continue."""

    user_facing = True
