"""The one error type that means "the user can fix this"."""


class UserError(ValueError):
    """Bad input that the user can fix: a missing or foreign file, a bad option or prompt.

    The command-line programs print its message alone (one line) and exit with status 2.
    """


# The exit status of a run stopped by SIGTERM (preemption) after checkpointing its last finished step:
# EX_TEMPFAIL of sysexits.h, "try again later" (with --resume).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """A training run stopped on SIGTERM after saving a checkpoint of its last finished step.

    The command-line programs print its message (one line, how to resume) and exit with
    :data:`EXIT_PREEMPTED`.
    """
