"""The training commands (finetune and the recipes), generated from the command registry (tfl.api.COMMANDS) and
each command's options dataclass: a command offers exactly its options class's fields, minus the ones it does
not use (cls.unused), with the fields' defaults and help."""

from __future__ import annotations

import importlib
import json
import logging

import click

from tfl import api
from tfl.cli.core import call, cli, resume_hint
from tfl.cli.params import OrderedRulesCommand, build_options, options_of


class EchoHandler(logging.Handler):
    """tfl's log records printed as plain lines, the way the command line has always printed them."""

    def __init__(self, err: bool):
        super().__init__(logging.INFO)
        self.err = err

    def emit(self, record):
        click.echo(record.getMessage(), err=self.err)


def run_logged(name: str, opts, err: bool, hint: str | None):
    """api.run with tfl's log printed to stdout (err=False) or stderr for the duration of the command."""
    logger = logging.getLogger("tfl")
    handler, level, propagate = EchoHandler(err), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return call(api.run, name, opts, resume_hint=hint)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def table_of(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def add_command(command: api.Command) -> None:
    cls = command.load("options")

    @cli.command(command.name, cls=OrderedRulesCommand, help=command.help, short_help=command.short_help)
    @options_of(cls, json_what=f"{command.name.replace('-', '_')}.json" if command.table else
                "metrics.json on stdout (the log goes to stderr)")
    def train(as_json, **options):
        opts = build_options(cls, options)
        given = bool(opts.output_dir)
        opts = api.with_run_dir(command.name, opts)
        hint = resume_hint(opts.output_dir, given) if command.resumes else None
        # finetune's log is its result (stdout), unless --json takes stdout; a recipe's log is progress (stderr)
        result = run_logged(command.name, opts, err=as_json or bool(command.table), hint=hint)
        if as_json:
            click.echo(json.dumps(result.metrics, indent=2))
        elif command.table:
            click.echo(table_of(command.table)(result.metrics))


for _command in api.COMMANDS.values():
    add_command(_command)
