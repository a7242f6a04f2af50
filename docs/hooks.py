"""MkDocs hook: each `tfl` subcommand as a module attribute, for the mkdocs-click blocks of docs/commands/.

mkdocs-click finds `:command:` with getattr(module, name), so a subcommand must be an attribute of a module;
here the module `tfl_docs_commands` answers `getattr(module, "self-train")` with a docs view of
`tfl.cli.cli.commands["self-train"]`. Read from the group, the pages follow the CLI whatever its functions
are called.

The view is a copy (the CLI itself is untouched) that fixes two things mkdocs-click 0.9 passes through:
- click 8.3 marks an option without a default by a sentinel, which mkdocs-click prints as "Sentinel.UNSET"
  (mkdocs/mkdocs-click#95); `to_info_dict()` turns it into None, shown as "None";
- help texts are inserted as Markdown, so `<class>`, `*`, `|` or `{a,b}` in them would become HTML tags,
  emphasis or table columns; outside `code spans` they are written as HTML entities.
"""
import copy
import re
import sys
import types

ENTITIES = {"<": "&lt;", ">": "&gt;", "*": "&#42;", "|": "&#124;", "{": "&#123;", "}": "&#125;", "_": "&#95;"}
CODE_SPAN = re.compile(r"(`[^`]*`)")


def as_markdown(text):
    """Plain help text as Markdown that shows the same characters; `code spans` are kept as they are."""
    if not text:
        return text
    parts = CODE_SPAN.split(text)
    return "".join(part if CODE_SPAN.fullmatch(part) else re.sub(r"[<>*|{}_]", lambda m: ENTITIES[m[0]], part)
                   for part in parts)


def param_view(param):
    param = copy.copy(param)
    param.default = param.to_info_dict()["default"]
    if getattr(param, "help", None):
        param.help = as_markdown(param.help)
    return param


def docs_view(command):
    view = copy.copy(command)
    view.help = as_markdown(command.help)
    view.short_help = as_markdown(command.short_help)
    view.params = [param_view(param) for param in command.params]

    def get_help_option(ctx):  # click makes --help per context, outside command.params
        option = command.get_help_option(ctx)
        return option and param_view(option)

    view.get_help_option = get_help_option
    return view


def _command(name):
    from tfl.cli import cli

    command = cli.commands.get(name) or cli.commands.get(name.replace("_", "-"))
    if command is None:
        raise AttributeError(f"tfl has no command {name!r}; `tfl --help` lists them")
    return docs_view(command)


commands = types.ModuleType("tfl_docs_commands", "The tfl subcommands, by name, as mkdocs-click reads them.")
commands.__getattr__ = _command
sys.modules[commands.__name__] = commands
