"""The two kinds of failure tfl reports without a traceback; anything else is a bug in tfl.

UsageError: the input is wrong (an option value, a file, a dataset, a checkpoint); the message names the value and
the fix. The command line prints it as one line and exits 2.
Unavailable: the environment cannot do what was asked (no network for a download, a device, a locked run
directory, a full disk, a run that diverged). The command line prints one line and exits 1.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input to tfl. A ValueError, so code validating user input catches both alike."""


class Unavailable(RuntimeError):
    """The machine, the network or the run cannot do what was asked; nothing is wrong with the input."""


def check_batch_size(batch_size) -> None:
    """The Python API's check of batch_size= (the CLI's click type does the same): a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size {batch_size!r}: must be a positive integer")
