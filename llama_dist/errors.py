"""The one exception type for expected user mistakes: printed as one line, no traceback."""


class UserError(Exception):
    """A mistake in input, config or environment that the user can fix; the message says how."""
