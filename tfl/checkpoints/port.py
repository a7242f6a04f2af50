"""Copy a `{name: ndarray}` state dict into Keras layers: one small converter per layer kind, strict by default.

PyTorch stores conv kernels OIHW, depthwise kernels (C, 1, kH, kW) and linear weights (out, in); Keras wants
HWIO, (kH, kW, C, 1) and (in, out). BatchNorm maps weight/bias/running_mean/running_var to
gamma/beta/moving_mean/moving_variance.
"""

from __future__ import annotations

import re

import numpy as np


class PortError(ValueError):
    """A state dict that does not fit the model: the message lists every unexplained name."""


def _conv2d(get):
    weights = [get("weight").transpose(2, 3, 1, 0)]
    bias = get("bias", optional=True)
    return weights + ([bias] if bias is not None else [])


def _depthwise(get):
    return [get("weight").transpose(2, 3, 0, 1)] + _optional_bias(get)


def _dense(get):
    return [get("weight").T] + _optional_bias(get)


def _batch_norm(get):
    return [get("weight"), get("bias"), get("running_mean"), get("running_var")]


def _optional_bias(get):
    bias = get("bias", optional=True)
    return [bias] if bias is not None else []


CONVERTERS = {"conv2d": _conv2d, "depthwise": _depthwise, "dense": _dense, "batch_norm": _batch_norm}


def port_state_dict(model, state: dict, mapping, ignore: str | None = None) -> list[str]:
    """Fill `model`'s layers from `state` following `mapping` [(layer name, key prefix, kind)].

    Strict: every mapped key must exist with the right shape, every layer named must exist, and every key of
    `state` must be used unless `ignore` (a regex, fullmatch) explains it. Returns the keys used.
    """
    used: set[str] = set()
    problems: list[str] = []
    for layer_name, prefix, kind in mapping:
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            problems.append(f"model has no layer {layer_name!r} (mapped from {prefix})")
            continue

        def get(param, optional=False, _prefix=prefix):
            key = f"{_prefix}.{param}"
            if key not in state:
                if optional:
                    return None
                raise KeyError(key)
            used.add(key)
            return np.asarray(state[key], dtype=np.float32)

        try:
            values = CONVERTERS[kind](get)
        except KeyError as missing:
            problems.append(f"missing in source: {missing.args[0]} (for layer {layer_name})")
            continue
        expected = [tuple(w.shape) for w in layer.weights]
        got = [v.shape for v in values]
        if expected != got:
            problems.append(f"shape mismatch for {layer_name} from {prefix}: model {expected}, source {got}")
            continue
        layer.set_weights(values)
    unexpected = [k for k in state if k not in used and not (ignore and re.fullmatch(ignore, k))]
    problems += [f"unexpected in source: {k}" for k in unexpected]
    if problems:
        shown = "\n  ".join(problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise PortError(f"state dict does not fit {model.name} ({len(problems)} problems):\n  {shown}{more}")
    return sorted(used)
