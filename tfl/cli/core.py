"""The `tfl` group and what every command shares: calling the library, turning its failures into one line and an
exit code, printing results.

Exit codes: 0 done; 2 a usage error (tfl.UsageError or click's own: the input is wrong, the message says how);
1 the environment (tfl.Unavailable, a file-system error: no network, a full disk, a locked run directory) or a bug
in tfl (one line naming the file its traceback went to; TFL_DEBUG=1 prints it); 130 interrupted (Ctrl-C); 143
a training command stopped by SIGTERM (what a cluster scheduler sends before preemption: handled like Ctrl-C, see
tfl.training.stopping).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import tempfile
import traceback

import click

from tfl.errors import Unavailable, UsageError
from tfl.training import stopping


class UsageFailure(click.ClickException):
    """Bad input from the user: one line on stderr, exit code 2, no traceback."""

    exit_code = 2


class Interrupted(click.ClickException):
    """Ctrl-C during training: say how to resume instead of click's bare "Aborted!"; 130 is the shell's code."""

    exit_code = 130


class Terminated(Interrupted):
    """SIGTERM during training: the same message as Ctrl-C's; 143 (128 + 15) is the shell's code for SIGTERM."""

    exit_code = 143


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="tfl", message="tfl %(version)s")
def cli():
    """tfl: take a pretrained backbone, freeze what should stay frozen, fine-tune, ship.

    Start with `tfl finetune` (EfficientNet-Lite0 with its ImageNet weights on Fashion-MNIST, offline),
    `tfl backbones` to see what is available and `tfl inspect BACKBONE` to see the freeze plan finetune would
    use before training. `tfl report --run DIR` shows where a run errs; `tfl compare` trains scratch,
    linear-probe and fine-tuning arms on one budget. Every command is also a Python function: tfl.finetune(...).
    """


def call(fn, *args, resume_hint: str | None = None, **kwargs):
    """Call into tfl and map what it raises to one line and an exit code (see the module's docstring).

    resume_hint: how to resume (resume_hint()) when Ctrl-C or SIGTERM stops a training command; given, SIGTERM
    stops the command as Ctrl-C does (tfl.training.stopping), else it keeps its default (the process ends).
    """
    try:
        if resume_hint is None:
            return fn(*args, **kwargs)
        with stopping.sigterm_stops():
            return fn(*args, **kwargs)
    except click.ClickException:
        raise
    except UsageError as err:
        raise UsageFailure(str(err)) from None
    except Unavailable as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:  # a full or read-only disk, a missing permission: the environment, exit 1
        raise click.ClickException(describe_os_error(err, output_places())) from None
    except stopping.Terminated:
        if resume_hint is None:
            raise
        raise Terminated(f"stopped by SIGTERM. {resume_hint}") from None
    except KeyboardInterrupt:
        if resume_hint is None:
            raise
        raise Interrupted(f"interrupted. {resume_hint}") from None
    except Exception as err:  # noqa: BLE001 (anything else is a bug in tfl: say so, keep the traceback)
        if os.environ.get("TFL_DEBUG") == "1":
            raise
        raise click.ClickException(bug_report(err)) from None


def resume_hint(output_dir: str, given: bool) -> str:
    """How to resume when Ctrl-C or SIGTERM stops a training run writing into output_dir (given: the user named
    it); call() says which of them it was first."""
    if given:
        return f"Run the same command again to resume {output_dir} after its last finished epoch."
    return f"To resume after the last finished epoch, run the same command again with --output-dir {output_dir}"


def bug_report(err: BaseException) -> str:
    """One line for an unexpected exception: it is a bug in tfl, and where the full traceback was written."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    fd, path = tempfile.mkstemp(prefix=f"tfl-bug-{stamp}-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return (f"a bug in tfl: {type(err).__name__}{': ' + first if first else ''}. The traceback is in {path} "
            "(TFL_DEBUG=1 prints it); please report it with the command you ran.")


def describe_os_error(err: OSError, places: tuple[str, ...] = ("--output-dir", "--cache-dir")) -> str:
    """One line for a file-system failure: what, where, and what to do. `places`: the options of the command
    that choose where it writes (output_places())."""
    where = f" {err.filename}" if err.filename else ""
    what = err.strerror or str(err)
    elsewhere = f"choose another {' / '.join(places)}" if places else "write somewhere else"
    advice = {errno.ENOSPC: f"free some space or {elsewhere}",
              errno.EDQUOT: f"free some space or {elsewhere}",
              errno.EFBIG: "the file-size limit (ulimit -f) is too low for this file",
              errno.EROFS: f"that file system is read-only; {elsewhere}",
              errno.EACCES: "no permission; choose a directory you can write",
              errno.EPERM: "no permission; choose a directory you can write"}.get(err.errno)
    return (f"cannot use{where}: {what}" if where else f"a file could not be written: {what}") + (
        f"; {advice}" if advice else "")


def output_places() -> tuple[str, ...]:
    """The running command's options that choose where it writes (--output-dir, --output, --cache-dir)."""
    context = click.get_current_context(silent=True)
    names = {p.name for p in context.command.params} if context else set()
    return tuple(f"--{n.replace('_', '-')}" for n in ("output_dir", "output", "cache_dir") if n in names)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def echo_err(message) -> None:
    click.echo(message, err=True)
