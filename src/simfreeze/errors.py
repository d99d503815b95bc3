"""The errors a user can fix: each message names the key, the value and what is allowed.

They sit at the bottom of the package so that every layer can raise them; ``python -m train``
prints any of them as one ``error:`` line (exit status 2) instead of a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work. The message names the key, the value and what is allowed."""


class DataConfigError(ConfigError):
    """A task or data setting that cannot work (classes, split sizes, data root, unreadable images)."""


class WeightsError(ConfigError):
    """Initial weights that cannot be used; the message says which and why."""


class RunDirInUse(ConfigError):
    """The run directory holds another run's outputs."""


class TrainingDiverged(ConfigError):
    """The loss became NaN or infinite: the run is failed, never reported ``ok`` (a setting, most
    often the learning rate, is the usual cause)."""


class RunWithoutResult(ConfigError):
    """The fit trained no step or never validated (a trainer limit below one batch, say): there is
    no result to report, so the run is failed, never ``ok``."""


class SourceFailed(ConfigError):
    """A source stage (a source task, a base) diverged or trained to no result: its own settings are the
    ones to fix (``source.recipe``, the base's), not the target's; a learning-rate search of the target
    must not count it as an answer for one of its rates."""


class DiskFull(ConfigError):
    """No space left on the device a checkpoint is written to: not a setting, but the user's to fix
    (free space, or another folder), so it ends in one ``error:`` line too. The previous checkpoint
    is kept (``simfreeze.runs.resume.AtomicCheckpointIO``)."""
