"""The one error type a user can cause.

Anything raised as ``UserError`` reaches the user as a single line (what is wrong, where, how to
fix it) and exit code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""

    exit_code = 2
