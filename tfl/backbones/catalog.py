"""The table the backbone families register their specs into. A leaf: the family modules import `register` from
here, and tfl.backbones.registry (which imports the families on first use) reads the table, so neither imports
the other in a circle."""

from __future__ import annotations

from tfl.backbones.spec import BackboneSpec
from tfl.errors import UsageError

SPECS: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in SPECS:
        raise UsageError(f"backbone {spec.name!r} is registered twice")
    SPECS[spec.name] = spec
    return spec
