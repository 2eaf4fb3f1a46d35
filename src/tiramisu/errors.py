"""Errors the command line reports as one line, without a traceback."""


class TiramisuError(Exception):
    """A user-facing problem (bad input file, bad configuration); the message names the cause."""


class DataError(TiramisuError):
    """A data file is missing, unreadable or inconsistent; the message names the file."""


class CheckpointError(TiramisuError):
    """A checkpoint or weights file cannot be loaded safely or does not match the model."""
