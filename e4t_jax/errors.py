"""The one error type that means "the user can fix this"."""


class UserError(ValueError):
    """Bad input that the user can fix: a missing or foreign file, a bad option or prompt.

    The command-line programs print its message alone (one line) and exit with status 2.
    """
