"""How the training step uses the device it runs on: op determinism, XLA, how often the step's numbers come back
to the host, and batches prefetched onto the device.

Each is a choice per device kind of the strategy's replicas ("cpu", "gpu", "tpu"); a value of None ("auto") takes
that kind's default from tfl.options (*_BY_DEVICE; measured where this machine could: docs/concepts/training.md,
"The step on a device"). What a run chose is recorded in its config.json.
"""

from __future__ import annotations

import tensorflow as tf

from tfl.errors import UsageError
from tfl.options import DETERMINISTIC_BY_DEVICE, JIT_BY_DEVICE, READBACK_BY_DEVICE

PREFETCH_BATCHES = 2  # batches waiting on each replica's device while it runs a step

# The step's running totals, kept on the device: one vector, so that an epoch's first step (no totals yet) and every
# later one share a single trace of the step function. Slots: steps so far, the first step whose loss was not finite
# (0: none) and that loss, then the step's sums in the order the step function names them (Totals.keys).
STEPS, NONFINITE_STEP, NONFINITE_LOSS, FIRST_SUM = 0, 1, 2, 3
SLOTS = 32


def device_kind(strategy) -> str:
    """"cpu", "gpu" or "tpu": what the strategy's replicas run on (the default strategy: the first GPU when there
    is one, where TensorFlow places the ops)."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy has no devices of its own ("worker_devices() method unsupported")
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    kinds = {tf.DeviceSpec.from_string(d).device_type or "CPU" for d in devices}
    return "tpu" if "TPU" in kinds else "gpu" if "GPU" in kinds else "cpu"


def _choice(value, name: str):
    if value is None or value == "auto":
        return None
    if not isinstance(value, bool):
        raise UsageError(f"--{name} {value!r}: give True (--{name}), False (--no-{name}) or None (auto: the "
                         "default of the device kind)")
    return value


def resolve_deterministic(requested, kind: str) -> bool:
    choice = _choice(requested, "deterministic")
    return DETERMINISTIC_BY_DEVICE[kind] if choice is None else choice


def resolve_jit(requested, kind: str, deterministic: bool) -> bool:
    choice = _choice(requested, "jit")
    return JIT_BY_DEVICE[kind] and not deterministic if choice is None else choice


def resolve_readback(requested, kind: str) -> int:
    if requested is None:
        return READBACK_BY_DEVICE[kind]
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise UsageError(f"--readback-every {requested!r}: give a whole number of steps >= 1 (1: every step)")
    return requested


def op_determinism() -> bool:
    """Whether op determinism is on in this process (TensorFlow has no public function saying so)."""
    from tensorflow.python.framework import config

    return config.is_op_determinism_enabled()


def set_op_determinism(on: bool) -> None:
    """Op determinism on or off for this process. TensorFlow's public API only turns it on
    (tf.config.experimental.enable_op_determinism); turning it off uses the function that tf.config's own module
    defines beside it (tensorflow.python.framework.config.disable_op_determinism), so that a later run in the same
    process (a notebook, a sweep, the tests) gets what it asks for. Ops and datasets built while it was on keep their
    deterministic kernels."""
    if on:
        tf.config.experimental.enable_op_determinism()
    elif op_determinism():
        from tensorflow.python.framework import config

        config.disable_op_determinism()


def input_options() -> tf.distribute.InputOptions:
    """A distributed dataset's batches prefetched into each replica's device memory."""
    return tf.distribute.InputOptions(experimental_fetch_to_device=True,
                                      experimental_per_replica_buffer_size=PREFETCH_BATCHES)


def prefetch_to_gpu(dataset: tf.data.Dataset, strategy) -> tf.data.Dataset:
    """The default strategy hands batches over as they are; on a GPU they are copied onto it ahead of the step
    (tf.data.experimental.prefetch_to_device, the last transformation as it must be). Elsewhere: the dataset."""
    if strategy is not tf.distribute.get_strategy() or tf.distribute.has_strategy() or device_kind(strategy) != "gpu":
        return dataset
    return dataset.apply(tf.data.experimental.prefetch_to_device("/gpu:0", PREFETCH_BATCHES))


class Totals:
    """A step's sums added up on the device (inside the step function), read back to the host only when asked.

    `add(totals, sums)` runs in the traced step and names the sums' slots (keys); `zeros()` starts an epoch;
    `read(totals)` is one transfer: ({sum name: value}, steps, first non-finite step (0: none), its loss). Sums are
    added in float64, as the host added the per-step float32 values before, so the epoch's numbers are bit-identical
    to reading every step back (TPUs have no float64: float32 there)."""

    def __init__(self, kind: str = "cpu"):
        self.dtype = tf.float32 if kind == "tpu" else tf.float64
        self.keys: list[str] = []

    def zeros(self):
        return tf.zeros([SLOTS], self.dtype)

    def add(self, totals, sums: dict):
        keys = list(sums)
        if FIRST_SUM + len(keys) > SLOTS:
            raise UsageError(f"the step reports {len(keys)} sums ({', '.join(keys)}); at most {SLOTS - FIRST_SUM} "
                             "fit its totals: return fewer metrics from the metrics hook")
        self.keys = keys
        values = tf.stack([tf.cast(sums[k], self.dtype) for k in keys])
        steps = totals[STEPS] + 1
        loss = tf.cast(sums["loss"], self.dtype)
        first = tf.logical_and(tf.equal(totals[NONFINITE_STEP], 0), tf.logical_not(tf.math.is_finite(loss)))
        control = tf.stack([steps, tf.where(first, steps, totals[NONFINITE_STEP]),
                            tf.where(first, loss, totals[NONFINITE_LOSS])])
        end = FIRST_SUM + len(keys)
        return tf.concat([control, totals[FIRST_SUM:end] + values, totals[end:]], 0), values

    def sums(self, values) -> dict:
        """{name: value} of one step's `values` (add's second output), on the host."""
        array = values.numpy()
        return {k: float(array[i]) for i, k in enumerate(self.keys)}

    def read(self, totals) -> tuple[dict, int, int, float]:
        array = totals.numpy()
        sums = {k: float(array[FIRST_SUM + i]) for i, k in enumerate(self.keys)}
        return sums, int(array[STEPS]), int(array[NONFINITE_STEP]), float(array[NONFINITE_LOSS])
