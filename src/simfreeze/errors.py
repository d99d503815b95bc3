"""The errors a user can fix (``UserError``): a setting (``ConfigError``: the message names the key, the
value and what is allowed) or how a run went (``RunError``: its directory, its training, the disk).

They sit at the bottom of the package so that every layer can raise them; ``python -m train``
prints any of them as one ``error:`` line (exit status 2) instead of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: ``python -m train`` prints it as one ``error:`` line (exit status 2),
    a sweep records it for the job and goes on."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work. The message names the key, the value and what is allowed."""


class DataConfigError(ConfigError):
    """A task or data setting that cannot work (classes, split sizes, data root, unreadable images)."""


class WeightsError(ConfigError):
    """Initial weights that cannot be used; the message says which and why."""


class RunError(UserError):
    """Not a setting, but how a run went: its directory, its training, the disk. Its directory and
    ``train.log`` are kept (a log worth reading, or another run's)."""


class RunDirInUse(RunError):
    """The run directory holds another run's outputs."""


class TrainingDiverged(RunError):
    """The loss became NaN or infinite: the run is failed, never reported ``ok`` (a setting, most
    often the learning rate, is the usual cause)."""


class RunWithoutResult(RunError):
    """The fit trained no step or never validated (a trainer limit below one batch, say): there is
    no result to report, so the run is failed, never ``ok``."""


class SourceFailed(RunError):
    """A source stage (a source task, a base) diverged or trained to no result: its own settings are the
    ones to fix (``source.recipe``, the base's), not the target's; a learning-rate search of the target
    must not count it as an answer for one of its rates."""


class DiskFull(RunError):
    """No space left on the device a checkpoint is written to: not a setting, but the user's to fix
    (free space, or another folder), so it ends in one ``error:`` line too. The previous checkpoint
    is kept (``simfreeze.runs.resume.AtomicCheckpointIO``)."""
