"""Named errors. The CLI prints their message on one line and exits non-zero, without a traceback."""


class MtlxError(Exception):
    """Base class for errors caused by input (config, data, checkpoints), not by bugs."""

    exit_code = 1


class ConfigError(MtlxError, ValueError):
    """A config file or override that does not match the schema."""

    exit_code = 2


class DataError(MtlxError):
    """Input data that cannot be used: a bad image, a mismatched mask, an unknown layout."""


class ShardError(DataError):
    """A shard set that is missing, empty, or fails verification."""


class ShardsNotFoundError(ShardError):
    """A shard root with no manifest.json: a path named in a config or on the command line that
    holds no shard set. A usage error (exit 2) in every command, as a missing `data.shards` folder
    is in `train`."""

    exit_code = 2


class CheckpointError(MtlxError):
    """A checkpoint that is missing, incomplete or incompatible."""


class NonFiniteLossError(MtlxError):
    """The training loss became NaN or inf."""


# Exit code of a run that saved its state on SIGUSR2, SIGUSR1 or SIGTERM and wants to be requeued
# (EX_TEMPFAIL). The sbatch scripts and the submitit trainer map it to a requeue.
EXIT_REQUEUE = 75


def error_line(error: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an exception's message (library errors span many lines), or
    `default` (the exception's type name when None) for an empty message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(error).__name__ if default is None else default


def unwrap_worker_error(error: BaseException) -> BaseException:
    """A named error re-raised by a DataLoader worker, with its message back to one line.

    torch re-raises a worker's exception as the same type whose message is "Caught X in
    DataLoader worker process N" followed by the worker's whole traceback; the error's own
    message is the traceback's last line. Other exceptions are returned unchanged."""
    text = str(error)
    if not isinstance(error, MtlxError) or "Original Traceback" not in text:
        return error
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return type(error)(last[len(prefix):] if last.startswith(prefix) else last)
