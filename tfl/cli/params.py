"""Click options generated from a command's options dataclass (tfl.options.option metadata), so a flag's default,
help, choices and checks are written once, on the field.

    @options_of(CompareOptions)     # the command's own fields, then the shared groups, minus cls.unused
    def compare(**options): ...     # options -> CompareOptions(**options) (build_options)
"""

from __future__ import annotations

import dataclasses
import types
import typing

import click

from tfl.cli.core import UsageFailure
from tfl.errors import UsageError
from tfl.options import GROUPS, check_value, flag_of

RULE_HELP = {
    "freeze": "Freeze layers whose name fully matches REGEX. Repeatable; --freeze/--unfreeze rules apply in "
              "command-line order and the last matching rule wins (e.g. --freeze 'hidden[12]').",
    "unfreeze": "Unfreeze layers whose name fully matches REGEX (see --freeze).",
}


SECTIONS = {None: "Options", "data": "Data", "model": "Model and freezing", "train": "Training",
            "distribution": "Distribution", "run": "Run directory"}


class OrderedRulesCommand(click.Command):
    """Lists options in sections (the command's own, then data, model, ...), and remembers the command-line order of
    --freeze/--unfreeze, since the last matching rule wins."""

    def format_options(self, ctx, formatter):
        sections: dict = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                sections.setdefault(getattr(param, "tfl_group", None), []).append(record)
        for group, title in SECTIONS.items():
            if sections.get(group):
                with formatter.section(title if group is None else f"{title} options"):
                    formatter.write_dl(sections[group])

    def parse_args(self, ctx, args):
        rules, i = [], 0
        while i < len(args) and args[i] != "--":
            for action in RULE_HELP:
                opt = "--" + action
                if args[i] == opt and i + 1 < len(args):
                    rules.append((action, args[i + 1]))
                    i += 1
                elif args[i].startswith(opt + "="):
                    rules.append((action, args[i][len(opt) + 1:]))
            i += 1
        ctx.meta["tfl_rules"] = tuple(rules)
        return super().parse_args(ctx, args)


def rule_options() -> list[click.Option]:
    """--freeze / --unfreeze: collected in order by OrderedRulesCommand into the options' `rules`."""
    options = [click.Option([f"--{action}", f"{action}_rules"], multiple=True, metavar="REGEX", help=text)
               for action, text in RULE_HELP.items()]
    for option in options:
        option.tfl_group = "model"
    return options


def json_option(what: str = "the result") -> click.Option:
    return click.Option(["--json", "as_json"], is_flag=True, help=f"Print {what} instead of the table.")


# -- parsing the command line's text where the field's type does not say how ---------------------------------------
def _hidden(text):
    return tuple(int(v) for v in text.split(",") if v.strip()) if text else ()


def _rename(value):
    src, sep, dst = value.rpartition("=")  # the last '=': a regex may hold one ((?=...)), a layer name won't
    if not sep or not src:
        raise UsageError(f"--rename {value!r} is not SRC=DST, e.g. '(.*)/weights=\\1/kernel'")
    return src, dst


def _hosts(text):
    hosts = tuple(h.strip() for h in text.split(",") if h.strip()) if text else ()
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise UsageError(f"{host!r} is not HOST:PORT; list every worker, e.g. localhost:2222,localhost:2223")
    return hosts


def _size(text):
    from tfl.cache import parse_size

    if text is not None:
        parse_size(text)
    return text


def _disk_size(text):
    from tfl.cache import parse_disk_limit

    if text is not None:
        parse_disk_limit(text)
    return text


def _task_weight(value):
    name, sep, number = value.rpartition("=")
    try:
        weight = float(number)
    except ValueError:
        weight = None
    if not sep or not name or weight is None or not weight >= 0:
        raise UsageError(f"--task-weight {value!r} is not TASK=WEIGHT with a weight >= 0, e.g. coarse=0.5")
    return name, weight


def _number_or_word(kind, words: tuple):
    """A number field that also takes a word (--lr find)."""
    def parse(text):
        if text in words:
            return text
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"{text!r} is not a number or {' or '.join(words)}") from None
    return parse


# parse name -> (function of one command-line value, applies to each value of a repeatable flag)
PARSERS = {"hidden": _hidden, "renames": _rename, "hosts": _hosts, "size": _size, "disk_size": _disk_size,
           "task_weights": _task_weight}


def _list_of(kind):
    def parse(text):
        try:
            return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise UsageError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None
    return parse


def _plain(hint):
    """int | None -> int; tuple[float, ...] -> (tuple, float)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return tuple, args[0]
    return hint, None


def field_option(field: dataclasses.Field, hint, help_text: str | None = None) -> click.Option:
    """The click option of one options field."""
    meta = field.metadata
    kind, item = _plain(hint)
    flag = meta.get("flag") or "--" + field.name.replace("_", "-")
    attrs = {"help": help_text or meta.get("help", ""), "metavar": meta.get("metavar"),
             "show_default": meta.get("show_default", True), "required": meta.get("required", False)}
    default = field.default if field.default is not dataclasses.MISSING else None
    parse = PARSERS.get(meta.get("parse"))
    if meta.get("words"):
        parse = _number_or_word(kind, meta["words"])
    if kind is bool:
        decls = [flag, field.name]
        attrs.update(default=default, **({} if "/" in flag else {"is_flag": True}))
        option = click.Option(decls, **attrs)
        option.tfl_group = meta.get("group")
        return option
    if meta.get("repeat"):
        attrs.update(multiple=True, default=default)
    elif kind is tuple and not parse:
        parse = _list_of(item)
        attrs["default"] = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    elif parse:
        attrs["default"] = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if meta.get("words"):
            attrs["type"] = str  # the parser reads the text (click would take the number default's type)
    else:
        attrs["default"] = None if meta.get("required") else default
        attrs["type"] = click.Choice(meta["choices"]) if meta.get("choices") else kind
        if meta.get("bare") is not None:  # the flag alone means this value (click: an optional value)
            attrs.update(is_flag=False, flag_value=meta["bare"])
    if meta.get("choices") and kind is tuple:
        attrs["help"] += "  [choices: " + ", ".join(meta["choices"]) + "]"

    def callback(ctx, param, value):
        try:
            if parse and value is not None:
                value = tuple(map(parse, value)) if meta.get("repeat") else parse(value)
        except ValueError as err:
            raise UsageFailure(f"Invalid value for '{flag.split('/')[0]}': {err}") from None
        problem = None if isinstance(value, tuple) else check_value(field, value)  # lists: the library's check
        if problem:
            raise UsageFailure(f"Invalid value for '{flag.split('/')[0]}': {problem}")
        return value

    option = click.Option([flag, field.name], callback=callback, **attrs)
    option.tfl_group = meta.get("group")
    return option


def options_of(cls, json_what: str | None = None):
    """A decorator adding cls's options (its own fields first, then the shared groups, none of cls.unused) and, with
    json_what, --json."""
    hints = typing.get_type_hints(cls)
    unused = set(getattr(cls, "unused", ()))
    overrides = getattr(cls, "option_help", {})
    fields = [f for f in dataclasses.fields(cls) if f.name not in unused]
    ordered = [f for f in fields if f.metadata.get("group") is None] + [
        f for group in GROUPS for f in fields if f.metadata.get("group") == group]
    params = []
    for field in ordered:
        if field.metadata.get("cli", True):
            params.append(field_option(field, hints[field.name], overrides.get(field.name)))
        elif field.name == "rules":
            params += rule_options()
    if json_what:
        params.append(json_option(json_what))

    def decorate(f):
        f.__click_params__ = getattr(f, "__click_params__", []) + list(reversed(params))  # click reverses them
        return f
    return decorate


def build_options(cls, options: dict):
    """The options object of a command from its parsed click options (rules in command-line order)."""
    values = {k: v for k, v in options.items() if k not in ("freeze_rules", "unfreeze_rules", "as_json")}
    if "freeze_rules" in options:
        values["rules"] = click.get_current_context().meta.get("tfl_rules", ())
    return cls(**values)


def described_flags(cls) -> set[str]:
    """Every flag the command line offers for cls (for tests and docs)."""
    unused = set(getattr(cls, "unused", ()))
    return {flag_of(f) for f in dataclasses.fields(cls) if f.name not in unused and f.metadata.get("cli", True)}


def positive(ctx, param, value):
    """A click callback for the options of commands without an options class (inspect, export, ...)."""
    if value is not None and value <= 0:
        raise click.BadParameter(f"{value} must be > 0")
    return value


# --batch-size of the commands that only evaluate (evaluate, report, calibrate, wise-ft, soup): one decorator.
eval_batch_size = click.option("--batch-size", default=64, show_default=True, callback=positive,
                               help="Images per evaluation batch.")


def non_negative(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter(f"{value} must be >= 0")
    return value
