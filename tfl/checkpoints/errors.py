"""The one error type every checkpoint reader raises for a file it cannot or will not read."""


class CheckpointError(ValueError):
    """A checkpoint is malformed, truncated, of an unsupported kind, or asks to run code.

    Subclasses ValueError so callers validating user input can catch both alike; the message
    always names the file and the field or global that is wrong.
    """
