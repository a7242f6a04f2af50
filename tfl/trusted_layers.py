"""The Keras classes of tfl's own that a .keras file may rebuild, beside Keras' built-ins: one list, read by
every loader of a .keras file (tfl.reuse for --init-from and `tfl convert`, tfl.training.rundir for a run's
model.keras). Importing this module also registers those classes for deserialisation."""

from __future__ import annotations

import keras

from tfl.backbones.keras_layers import GlobalResponseNorm
from tfl.backbones.vit_layers import LayerScale, PositionalTokens, TokenPool, ViTAttention
from tfl.freezing import StopGradient
from tfl.models import ImagePreprocessing
from tfl.training.schedules import WarmupSchedule

# Listed, not collected from Keras' registry: what a file may rebuild is decided here, not by import order.
TRUSTED = (ImagePreprocessing, StopGradient, WarmupSchedule, GlobalResponseNorm, PositionalTokens, ViTAttention,
           LayerScale, TokenPool)


def custom_objects() -> dict[str, type]:
    """tfl's own Keras classes by registered name: the ones a .keras file tfl wrote may name."""
    return {keras.saving.get_registered_name(cls): cls for cls in TRUSTED}
