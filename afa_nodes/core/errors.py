"""Typed errors. Every message names the offending file/model/shape and the fix."""


class AFAError(ValueError):
    """Base class of every error this pack raises on purpose."""


class IncompatibleModelsError(AFAError):
    """Experts whose block features do not line up (different architectures)."""


class AggregatorMismatchError(AFAError):
    """An aggregator file that does not fit the ensemble it is applied to."""


class AggregatorFileError(AFAError):
    """A missing, corrupted or unreadable aggregator file."""


class DatasetError(AFAError):
    """A training dataset that cannot be used."""


class TrainingError(AFAError):
    """Training stopped for a reason the user must act on (NaN loss, bad resume)."""


class FileWriteError(AFAError, OSError):
    """A file could not be written (a full disk, no permission); the previous file is intact.
    Also an OSError, as the failure it reports."""


def check_result(check, *args):
    """True when `check(*args)` passes, else its AFAError's message: the answer ComfyUI's
    validate_inputs expects."""
    try:
        check(*args)
    except AFAError as e:
        return str(e)
    return True
