"""Domain errors. Anything a user can cause raises one of these; the CLI turns it into one line."""


class Ssl3dError(Exception):
    """Base class: the message names the file or value at fault and what to do about it."""

    exit_code = 2


class InputDataError(Ssl3dError):
    """A dataset, scan or label file is missing, unreadable or inconsistent."""


class ConfigError(Ssl3dError):
    """An option value is invalid or inconsistent with another option or artefact."""


class CheckpointError(Ssl3dError):
    """A checkpoint file is missing, of the wrong kind, or from a different configuration."""


class DeviceError(Ssl3dError):
    """The requested device is unavailable or ran out of memory."""


class StopRequested(Ssl3dError):
    """SIGTERM/SIGUSR1 arrived (SLURM's warning before the time limit); the training state was saved.

    Exit 75 (EX_TEMPFAIL): rerunning with ``--resume`` continues where it stopped.
    """

    exit_code = 75


class CasesFailed(Ssl3dError):
    """``--skip-bad``: some cases of a batch failed (each listed with its reason in the result); every other case was done.

    Exit 4, raised by the CLI after the result was printed, so scripts can tell "some scans were bad" from a run that
    stopped (2) and from a complete one (0).
    """

    exit_code = 4
