"""One registry of backbones, keyed by public name. The CLI's choices come from here."""

from __future__ import annotations

from tfl.backbones.catalog import SPECS as _REGISTRY
from tfl.backbones.catalog import register  # noqa: F401 (re-exported; family modules import it from catalog)
from tfl.backbones.spec import BackboneSpec
from tfl.errors import UsageError


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> BackboneSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))} "
            "(see `tfl backbones`)"
        ) from None


def all_specs() -> list[BackboneSpec]:
    _load_all()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


_loaded = False


def _load_all() -> None:
    # Importing the family modules registers their specs; done lazily so `import tfl` stays cheap (not a cycle:
    # they register into tfl.backbones.catalog).
    global _loaded
    if _loaded:
        return
    _loaded = True
    from tfl.backbones import compact_cnn, efficientnet_lite, keras_apps, resnet  # noqa: F401
    from tfl.backbones import convnext_v2, efficientnet_v2  # noqa: F401
    from tfl.backbones import vit  # noqa: F401

