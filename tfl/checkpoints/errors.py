"""The one error type every checkpoint reader raises for a file it cannot or will not read."""

from tfl.errors import UsageError


class CheckpointError(UsageError):
    """A checkpoint is malformed, truncated, of an unsupported kind, or asks to run code.

    A UsageError (so a ValueError): callers validating user input catch both alike; the message
    always names the file and the field or global that is wrong.
    """

