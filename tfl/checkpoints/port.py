"""Fill a Keras model from canonical `{"<layer>/<weight>": ndarray}` tensors, strictly.

Renames and transposes from PyTorch layout live in tfl.checkpoints.mappings (one converter per layer kind);
`port_state_dict` is that mapping followed by `assign`.
"""

from __future__ import annotations

import numpy as np

from tfl.checkpoints.mappings import Mapping, to_keras


class PortError(ValueError):
    """Tensors that do not fit the model: the message lists every unexplained name."""


def assign(model, tensors: dict, classifier=(), sources: dict | None = None) -> list[str]:
    """Set every weight of `model` (by `variable.path`) from `tensors`; returns the names loaded.

    Strict: every model weight must be in `tensors` with the same shape, and every tensor must be used,
    except those of `classifier` layers the model does not have (a source's own ImageNet classifier when
    the model was built without it). `sources` ({name: the file's key}) makes messages name the file's keys.
    Nothing is assigned unless everything fits.
    """
    sources = sources or {}
    targets = {variable.path: variable for variable in model.weights}
    layers = {layer.name for layer in model.layers}
    problems: list[str] = []

    def named(name: str) -> str:
        return f"{name} (from {sources[name]})" if name in sources and sources[name] != name else name

    updates = []
    for name, variable in targets.items():
        if name not in tensors:
            problems.append(f"missing in source: {name}")
            continue
        value = np.asarray(tensors[name])
        if tuple(value.shape) != tuple(variable.shape):
            problems.append(
                f"shape mismatch for {named(name)}: model {tuple(variable.shape)}, source {tuple(value.shape)}"
            )
            continue
        updates.append((variable, value))
    for name in tensors:
        if name not in targets and not (name.split("/")[0] in classifier and name.split("/")[0] not in layers):
            problems.append(f"unexpected in source: {named(name)}")
    if problems:
        shown = "\n  ".join(problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise PortError(f"weights do not fit {model.name} ({len(problems)} problems):\n  {shown}{more}")
    for variable, value in updates:
        variable.assign(value.astype(variable.dtype))
    return sorted(targets)


def port_state_dict(model, state: dict, mapping: str | Mapping, classifier=()) -> list[str]:
    """Load a raw PyTorch-style state dict into `model` through a family mapping; strict as `assign`."""
    sources: dict[str, str] = {}
    return assign(model, to_keras(state, mapping, sources), classifier, sources)
