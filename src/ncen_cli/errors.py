"""Errors that the command line turns into one clear line and an exit code.

Exit codes: 2 for usage errors (bad options, bad names, bad paths given by the user), 1 for runtime
failures (a non-finite loss, a corrupt checkpoint, missing data that could not be fetched).
"""


class NcenError(Exception):
    """A failure the user can act on; the message says what to do next. Exit code 1."""

    exit_code = 1


class UsageError(NcenError):
    """The user asked for something invalid (unknown name, bad value or path). Exit code 2."""

    exit_code = 2


class DataUnavailableError(NcenError):
    """A dataset is neither on disk nor downloadable (e.g. offline). Exit code 1."""


class CheckpointError(NcenError):
    """A checkpoint file is missing, corrupt, of a newer schema or inconsistent. Exit code 1."""


class NonFiniteLossError(NcenError):
    """Training produced a NaN or infinite loss term. Exit code 1."""


class InterruptedRun(NcenError):
    """The user pressed Ctrl-C; the last completed epoch is saved. Exit code 130."""

    exit_code = 130


class NonFiniteModelError(NonFiniteLossError):
    """A training step left a parameter or BatchNorm buffer NaN or infinite. Exit code 1."""
