"""The one exception type for mistakes a user can fix: the CLI prints its message on one line."""


class UserError(Exception):
    """Bad input, a bad flag or a missing file: shown to the user as a one-line error, exit code 2."""


class NotFound(UserError):
    """The named thing does not exist (HTTP 404)."""


class Conflict(UserError):
    """The thing to create exists already (HTTP 409)."""
