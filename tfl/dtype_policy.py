"""Which Keras dtype policy each precision computes in: a table, nothing else, so that building a model
(tfl.models) does not depend on how the precision is chosen (tfl.precision measures train steps, which builds
models)."""

from __future__ import annotations

from tfl.errors import UsageError

# float32 variables either way; "mixed_*" computes in the half precision (Keras' mixed-precision policies).
POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def policy_name(precision: str) -> str:
    """The Keras dtype policy of `precision`; an unknown one is refused, naming the choices."""
    try:
        return POLICY[precision]
    except KeyError:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(POLICY)}") from None
