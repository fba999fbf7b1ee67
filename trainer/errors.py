"""The trainer's errors, in one leaf module (it imports nothing from the project), so that any module can
raise them without importing another's machinery.

Errors about what a user wrote (settings, files, models, checkpoints) have `user_facing = True`: the
`opsd` command line prints them as one line and exits 2. The others are failures of a running trial.
"""

from __future__ import annotations


class TrialConfigError(ValueError):
    """A trial file or trial setting that cannot be used; the message names the field."""

    user_facing = True


class ContextError(ValueError):
    """A context setting or template that cannot be used; the message names the field."""

    user_facing = True


class DataError(ValueError):
    """Data settings or files that cannot be used; the message says which and why."""

    user_facing = True


class PromptTooLongError(DataError):
    """A prompt longer than the configured token budget that cannot be shortened."""


class HintsError(DataError):
    """A hints file that cannot be used, or a problem without a hint."""


class ModelError(ValueError):
    """A model path or file that cannot be used; the message names it."""

    user_facing = True


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or restored."""

    user_facing = True


class StudentError(RuntimeError):
    """The student cannot be built, stepped or restored as asked."""


class TeacherError(RuntimeError):
    """The teacher cannot be built, updated or restored as asked."""


class RolloutError(RuntimeError):
    """The rollout engine failed or was used after close()."""


class DistributedError(RuntimeError):
    """A rank failed, or torch.distributed could not be set up."""
