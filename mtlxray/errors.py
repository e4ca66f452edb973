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


class CheckpointError(MtlxError):
    """A checkpoint that is missing, incomplete or incompatible."""


class NonFiniteLossError(MtlxError):
    """The training loss became NaN or inf."""


# Exit code of a run that saved its state on SIGUSR1/SIGTERM and wants to be requeued
# (EX_TEMPFAIL). The sbatch scripts and the submitit trainer map it to a requeue.
EXIT_REQUEUE = 75
