"""Which tf.distribute strategy to train under. The trainer only ever talks to the strategy it is given."""

from __future__ import annotations

import tensorflow as tf

CHOICES = ("auto", "default", "mirrored")


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(CHOICES)}")
