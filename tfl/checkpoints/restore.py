"""Restore chosen weights of a Keras model from a checkpoint by name, all or nothing, with a report.

Names are canonical (`<leaf layer>/<weight>`, see notes in tfl/checkpoints/read.py): a model weight's name is its
`variable.path`, also inside nested models; a source may also say `<layer>/vars/<i>` (the layer's i-th weight).

Order of operations, as in big_vision's partial restore:
1. the source becomes {name: array} (a raw PyTorch-style state goes through `mapping` first);
2. `rename` rules [(regex, replacement)] rewrite source names, in order, each rule applied to the result of
   the previous one (fullmatch, then `match.expand`, so `hidden(\\d)/weights` -> `hidden\\1/kernel` works);
3. each name is selected by the first `include` pattern that fully matches it or its layer name (so
   `hidden[123]` selects every weight of those layers), unless an `exclude` pattern matches;
4. everything is validated — shapes, names on one side only, patterns that match nothing — and only then
   assigned. In strict mode any unexplained name fails the whole restore and nothing changes.

The layers named in `classifier` may differ in class count or be absent on one side: they are skipped and
reported ("classifier: 1000 classes in source, 10 in model"), which is how a backbone's ImageNet top gives way
to a new head.

Generic over Keras models; restoring into a tfl classifier (which names its head) is tfl.reuse.
"""

from __future__ import annotations

from tfl.errors import UsageError
import collections
import dataclasses
import os
import re
from typing import Callable, Iterable, Sequence

import numpy as np

from tfl.checkpoints.mappings import to_keras
from tfl.checkpoints.read import read_checkpoint

# Sources whose names are raw PyTorch state-dict keys: a family mapping turns them into Keras names.
TORCH_STYLE_FORMATS = ("pytorch_zip", "pytorch_legacy", "safetensors")
_VARS_NAME = re.compile(r"(?P<layer>[^/]+)/vars/(?P<index>\d+)")


class RestoreError(UsageError):
    """A restore that does not validate; `.report` says what matched and what did not."""

    def __init__(self, message: str, report: "RestoreReport"):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class RestoreReport:
    source: str
    format: str
    strict: bool
    loaded: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (target, the file's key)
    matched_by: dict[str, str | None] = dataclasses.field(default_factory=dict)  # target -> include (None: auto)
    renamed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file key, name) by rename rules
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)
    missing_in_source: list[str] = dataclasses.field(default_factory=list)
    unexpected_in_source: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    classifier_skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unused_patterns: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)  # non-weight entries: optimizer slots, counters
    values_loaded: int = 0

    def problems(self) -> list[str]:
        """Every unexplained name, one phrase each; a strict restore fails when this is not empty."""
        return ([f"missing in source: {n}" for n in self.missing_in_source]
                + [f"unexpected in source: {n}" for n in self.unexpected_in_source]
                + [f"shape mismatch: {n} (model {tuple(m)}, source {tuple(s)})" for n, m, s in self.shape_mismatches]
                + [f"matches nothing: {p}" for p in self.unused_patterns])

    def summary(self) -> str:
        lines = [f"restore from {self.source} ({self.format}): {len(self.loaded)} tensors loaded "
                 f"({self.values_loaded:,} values), {len(self.skipped) + len(self.classifier_skipped)} skipped, "
                 f"{_plural(len(self.problems()), 'problem')}"]
        for pattern, count in collections.Counter(self.matched_by[t] for t, _ in self.loaded).items():
            lines.append(f"  loaded by {pattern!r}: {count}" if pattern else f"  loaded (all the source has): {count}")
        if self.renamed:
            lines.append("  renamed: " + _shorten([f"{old} -> {new}" for old, new in self.renamed]))
        by_reason = collections.defaultdict(list)
        for name, reason in self.skipped + self.classifier_skipped:
            by_reason[reason].append(name)
        for reason, names in by_reason.items():
            lines.append(f"  {reason}: {_shorten(names)}")
        for kind, names in _grouped(self.problems()).items():
            lines.append(f"  PROBLEM {kind}: {_shorten(names)}")
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} non-weight entries (optimizer slots, counters): "
                         + _shorten(self.ignored))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "strict": self.strict,
            "counts": {"loaded": len(self.loaded), "values_loaded": self.values_loaded,
                       "skipped": len(self.skipped), "classifier_skipped": len(self.classifier_skipped),
                       "problems": len(self.problems())},
            "loaded": [{"target": t, "source": s, "pattern": self.matched_by[t]} for t, s in self.loaded],
            "renamed": [{"source": old, "name": new} for old, new in self.renamed],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "classifier_skipped": [{"name": n, "reason": r} for n, r in self.classifier_skipped],
            "missing_in_source": list(self.missing_in_source),
            "unexpected_in_source": list(self.unexpected_in_source),
            "shape_mismatches": [{"name": n, "model_shape": list(m), "source_shape": list(s)}
                                 for n, m, s in self.shape_mismatches],
            "unused_patterns": list(self.unused_patterns),
            "ignored": list(self.ignored),
        }


def _grouped(problems: Sequence[str]) -> dict[str, list[str]]:
    """"kind: name" phrases -> {kind: [names]}, so a message says each kind once."""
    groups = collections.defaultdict(list)
    for problem in problems:
        kind, _, name = problem.partition(": ")
        groups[kind].append(name)
    return groups


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _shorten(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@dataclasses.dataclass
class Target:
    name: str
    layer: str
    variable: object


def _leaf_layers(layer) -> list:
    import keras

    if not isinstance(layer, keras.Model):
        return [layer]
    return [leaf for inner in layer.layers for leaf in _leaf_layers(inner)]


def model_targets(model) -> dict[str, Target]:
    """Every weight of `model` by canonical name, descending into nested models down to the leaf layers."""
    from tfl.checkpoints.keras_files import short_name  # h5py loads with it: only when a model is restored

    # Named as the readers name a file's weights: the last two parts of the variable path (Keras gives a freshly
    # built nested Sequential `backbone/conv1/kernel` but the same model reloaded `conv1/kernel`); full path
    # only where two weights share the short name.
    items = [(layer, variable) for layer in _leaf_layers(model) for variable in layer.weights]
    counts: dict[str, int] = {}
    for _, variable in items:
        counts[short_name(variable.path)] = counts.get(short_name(variable.path), 0) + 1
    targets: dict[str, Target] = {}
    duplicates: set[str] = set()
    for layer, variable in items:
        name = short_name(variable.path) if counts[short_name(variable.path)] == 1 else variable.path
        if name in targets:
            duplicates.add(name)
        targets[name] = Target(name, layer.name, variable)
    if duplicates:
        raise UsageError(f"model {model.name} has several weights named {', '.join(sorted(duplicates))}; "
                         "give its layers unique names so a checkpoint can address them")
    return targets


def compile_patterns(patterns: Iterable[str], what: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise UsageError(f"{what} {pattern!r} is not a valid regular expression: {err}") from None
    return compiled


def compile_renames(rename: Iterable[tuple[str, str]], what: str = "rename") -> list[tuple[re.Pattern, str]]:
    rules = []
    for src, dst in rename:
        (pattern,) = compile_patterns([src], what)
        try:
            pattern.sub(dst, "")  # a replacement naming a group the regex lacks fails here, not mid-restore
        except (re.error, IndexError) as err:
            raise UsageError(f"{what} {src!r} -> {dst!r}: bad replacement: {err}") from None
        rules.append((pattern, dst))
    return rules


def _read(source, mapping) -> tuple[str, str, dict, dict, list[str]]:
    """(description, format, tensors, {name: the file's own key}, ignored keys) of a path, Checkpoint or dict."""
    if isinstance(source, (str, os.PathLike)):
        source = read_checkpoint(os.fspath(source))
    if isinstance(source, dict):
        where, fmt, tensors, ignored = "a dict", "dict", dict(source), []
    else:  # a tfl.checkpoints.read.Checkpoint
        where, fmt, tensors, ignored = source.path, source.format, dict(source.tensors), sorted(source.extra)
    keys = {name: name for name in tensors}
    if mapping is not None and (fmt == "dict" or fmt in TORCH_STYLE_FORMATS):
        keys = {}
        raw = tensors
        tensors = to_keras(raw, mapping, keys)
        ignored += sorted(set(raw) - set(keys.values()))  # what the mapping drops on purpose (BN counters)
    return where, fmt, tensors, keys, ignored


def _first_match(patterns: Sequence[re.Pattern], name: str) -> re.Pattern | None:
    layer = name.split("/", 1)[0]
    for pattern in patterns:
        if pattern.fullmatch(name) or pattern.fullmatch(layer):
            return pattern
    return None


def _classes(shape: tuple) -> str:
    return str(shape[-1]) if shape else "?"


def restore(
    model,
    source,
    include: Sequence[str] | None = (".*",),
    exclude: Sequence[str] = (),
    rename: Sequence[tuple[str, str]] = (),
    strict: bool = True,
    mapping=None,
    classifier: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> RestoreReport:
    """Copy weights from `source` into `model` by name; returns what happened, raises RestoreError if strict fails.

    source: a checkpoint path (read with tfl.checkpoints.read.read_checkpoint), a Checkpoint, or {name: array}.
    include: regexes (fullmatch) over model weight names and layer names; the first match selects a weight.
      None selects every model weight the source has: weights the source lacks keep their values and are
      reported as "not in source" instead of failing.
    exclude: regexes that drop a selected name. rename: [(src_regex, replacement)] for source names.
    strict: fail, changing nothing, on any name missing in the source, unexpected in the source, of another
      shape, or any pattern that matches nothing. Non-strict: load what fits, report the rest.
    mapping: a tfl.checkpoints.mappings Mapping (or its name) for raw PyTorch-style sources.
    classifier: layer names whose absence or class-count change is expected (a replaced head).
    """
    import keras

    includes = None if include is None else compile_patterns(include, "include pattern")
    excludes = compile_patterns(exclude, "exclude pattern")
    renames = compile_renames(rename)
    where, fmt, tensors, file_keys, ignored = _read(source, mapping)
    report = RestoreReport(source=where, format=fmt, strict=strict, ignored=ignored)
    targets = model_targets(model)
    by_layer = collections.defaultdict(list)
    for target in targets.values():
        by_layer[target.layer].append(target)
    classifier_layers = set(classifier)
    used_patterns: set[re.Pattern] = set()

    # Source name -> model target, after renames; two source tensors for one target is always an error.
    renamed: dict[str, str] = {}
    for name in tensors:
        new = name
        for pattern, dst in renames:
            match = pattern.fullmatch(new)
            if match:
                new = match.expand(dst)
                used_patterns.add(pattern)
        renamed[name] = new
        if new != name:
            report.renamed.append((file_keys[name], new))
    by_target: dict[str, str] = {}
    only_in_source: list[tuple[str, str]] = []  # (renamed name, original name)
    for name, new in renamed.items():
        target = new
        vars_name = _VARS_NAME.fullmatch(new)
        if vars_name and new not in targets and int(vars_name["index"]) < len(by_layer.get(vars_name["layer"], ())):
            target = by_layer[vars_name["layer"]][int(vars_name["index"])].name
        if target not in targets:
            only_in_source.append((new, name))
            continue
        if target in by_target:
            raise UsageError(f"source tensors {file_keys[by_target[target]]!r} and {file_keys[name]!r} in {where} "
                             f"both name model weight {target!r}; rename one of them")
        by_target[target] = name

    def select(name: str) -> tuple[str | None, str | None]:
        """(the include pattern that selects `name` (None: include=None), None) or (None, why not); exclude wins."""
        dropped = _first_match(excludes, name)
        if dropped is not None:
            used_patterns.add(dropped)
            return None, f"excluded by {dropped.pattern!r}"
        if includes is None:
            return None, None
        chosen = _first_match(includes, name)
        if chosen is None:
            return None, "not selected"
        used_patterns.add(chosen)
        return chosen.pattern, None

    assignments = []
    for target in targets.values():
        pattern, reason = select(target.name)
        if reason is not None:
            report.skipped.append((target.name, reason))
            continue
        is_classifier = target.layer in classifier_layers
        if target.name not in by_target:
            if is_classifier:
                report.classifier_skipped.append((target.name, "classifier: not in source, keeps its initialisation"))
            elif includes is None:
                report.skipped.append((target.name, "not in source"))
            else:
                report.missing_in_source.append(target.name)
            continue
        source_name = by_target[target.name]
        value = np.asarray(tensors[source_name])
        model_shape = tuple(target.variable.shape)
        if value.shape != model_shape:
            if is_classifier:
                reason = (f"classifier: {_classes(value.shape)} classes in source, {_classes(model_shape)} in model"
                          if value.shape[-1:] != model_shape[-1:] else
                          f"classifier: shape {value.shape} in source, {model_shape} in model")
                report.classifier_skipped.append((target.name, reason))
            else:
                report.shape_mismatches.append((target.name, model_shape, value.shape))
            continue
        if value.dtype.kind not in "biuf":
            raise UsageError(f"source tensor {source_name!r} in {where} has dtype {value.dtype}, not a number")
        report.matched_by[target.name] = pattern
        assignments.append((target, source_name, value))

    for new, name in only_in_source:
        pattern, reason = select(new)
        label = new if new == file_keys[name] else f"{file_keys[name]} (as {new})"
        if reason is not None:
            report.skipped.append((label, f"{reason}; only in source" if reason == "not selected" else reason))
        elif new.split("/", 1)[0] in classifier_layers:
            shape = np.shape(tensors[name])
            report.classifier_skipped.append((label, f"classifier: only in source ({_classes(shape)} classes)"))
        else:
            report.unexpected_in_source.append(label)
    all_patterns = [*(includes or []), *excludes, *(p for p, _ in renames)]
    report.unused_patterns = [p.pattern for p in all_patterns if p not in used_patterns]

    problems = report.problems()
    if strict and problems:
        raise RestoreError(
            f"{where} does not fit model {model.name} ({_plural(len(problems), 'problem')}, nothing was restored): "
            + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in _grouped(problems).items())
            + ". Select layers with include/exclude (--reuse/--reuse-exclude), map names with rename (--rename), "
            "or restore non-strictly", report)

    # Everything validated: convert first so a failing conversion cannot leave the model half restored.
    converted = [(t, s, keras.ops.convert_to_tensor(v, dtype=t.variable.dtype)) for t, s, v in assignments]
    for target, source_name, value in converted:
        target.variable.assign(value)
        report.loaded.append((target.name, file_keys[source_name]))
        report.values_loaded += int(np.prod(target.variable.shape))
    if log is not None:
        log(report.summary())
    return report
