"""--mixed-precision auto|on|off: which precision a run computes in, chosen by measuring it.

A run computes either in float32, or in the half precision its device is fast at with float32 variables (Keras'
`mixed_bfloat16` / `mixed_float16` policies); the logits, softmax and losses stay float32 either way
(tfl.models.build_classifier), and float16 trains with Keras' dynamic loss scaling (the trainer wraps each optimizer
in a LossScaleOptimizer), bfloat16 needs none (it has float32's exponent range).

- The fast half precision of a device (`device_half`): bfloat16 on CPUs with `avx512_bf16` or `amx_bf16`; on GPUs by
  compute capability: bfloat16 from 8.0 (Ampere), float16 from 7.0 (Volta, Turing); none otherwise.
- `off`: float32. `on`: the device's half precision (bfloat16 when it has none, with a warning: it is emulated).
- `auto` (the default): float32 where the device has no fast half precision; otherwise a few train steps of the
  run's own model (backbone, input size, freeze boundary, batch) are timed in float32 and in half precision and the
  faster is kept. The choice is remembered per machine + backbone + size + boundary + batch in `precision.json`
  in the cache directory, so the timing is paid once; a resumed run keeps the precision it started with.
  `TFL_MIXED_PRECISION=auto|on|off` sets what `auto` means for a whole environment (the test suite sets `off`, so
  no test's result depends on a timing).

Depthwise-convolution networks (EfficientNet-Lite, MobileNet) gain nothing from bfloat16 on AVX-512 CPUs, while
dense convolutions (ResNet) run about 2x faster: measuring is the only honest way to choose.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state
from keras.src.random import seed_generator

from tfl import freezing, models
from tfl.backbones import registry
from tfl.cache import default_cache_dir
from tfl.checkpoints.json_limits import loads_bounded
from tfl.dtype_policy import POLICY  # noqa: F401 (re-exported: the table moved there so tfl.models need not import this)
from tfl.durable import write_json
from tfl.errors import UsageError
from tfl.options import MIXED_PRECISION, PRECISIONS

MEMORY = "precision.json"  # in the cache directory
ENV = "TFL_MIXED_PRECISION"
TIMED_STEPS = 3  # best of this many train steps, after a traced and a warm-up step


@dataclasses.dataclass
class Choice:
    precision: str  # one of PRECISIONS
    requested: str  # auto | on | off (after TFL_MIXED_PRECISION)
    reason: str
    seconds_per_step: dict = dataclasses.field(default_factory=dict)  # precision -> measured seconds
    remembered: bool = False  # taken from precision.json (or the resumed run's config), not measured now

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        timings = ", ".join(f"{p} {s * 1000:.0f} ms/step" for p, s in self.seconds_per_step.items())
        return (f"precision: {self.precision} ({self.reason}" + (f"; {timings}" if timings else "")
                + (", remembered" if self.remembered else "") + ")")


# -- the device --------------------------------------------------------------------------------------------------------
def cpu_info() -> dict:
    """{"model", "flags" (sorted), "cores"} of this machine's CPU, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": sorted(flags), "cores": os.cpu_count()}


def cpu_half(flags) -> str | None:
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else None


def gpu_half(compute_capability) -> str | None:
    if not compute_capability:
        return None
    major_minor = tuple(compute_capability)
    if major_minor >= (8, 0):
        return "bfloat16"
    if major_minor >= (7, 0):
        return "float16"
    return None


def device() -> dict:
    """What trains here: {"kind": "gpu"|"cpu", "name", "half", "why"} ("half": the fast half precision or None)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        cc = details.get("compute_capability")
        half = gpu_half(cc)
        name = details.get("device_name", "GPU")
        why = f"{name}, compute capability {'.'.join(map(str, cc)) if cc else 'unknown'}"
        return {"kind": "gpu", "name": name, "half": half, "why": why, "compute_capability": cc}
    cpu = cpu_info()
    half = cpu_half(cpu["flags"])
    why = ("CPU has " + "/".join(f for f in ("avx512_bf16", "amx_bf16") if f in cpu["flags"]) if half
           else "CPU has neither avx512_bf16 nor amx_bf16")
    return {"kind": "cpu", "name": cpu["model"], "half": half, "why": why}


# -- choosing ----------------------------------------------------------------------------------------------------------
def requested_mode(mode: str) -> str:
    if mode not in MIXED_PRECISION:
        raise UsageError(f"--mixed-precision {mode!r}: choose one of {', '.join(MIXED_PRECISION)}")
    env = os.environ.get(ENV)
    if mode == "auto" and env:
        if env not in MIXED_PRECISION:
            raise UsageError(f"{ENV}={env!r}: choose one of {', '.join(MIXED_PRECISION)}, or unset it")
        return env
    return mode


def resolve(mode: str, key: dict, measure: Callable[[str], float], cache_dir: str | None,
            saved: str | None = None, log: Callable = print) -> Choice:
    """The precision to run in. key: what the speed depends on besides the machine (backbone, image size, boundary,
    batch); measure(precision) -> seconds per train step; saved: the precision a resumed run started with."""
    requested = requested_mode(mode)
    dev = device()
    if requested == "off":
        return Choice("float32", requested, "--mixed-precision off")
    if requested == "on":
        if dev["half"] is None:
            log(f"warning: --mixed-precision on: {dev['why']}, so bfloat16 is emulated and usually slower than "
                "float32 here")
        return Choice(dev["half"] or "bfloat16", requested, f"--mixed-precision on; {dev['why']}")
    if saved is not None:  # auto on resume: the precision the run started with, whatever a new timing would say
        return Choice(saved, requested, "the resumed run's precision", remembered=True)
    if dev["half"] is None:
        return Choice("float32", requested, dev["why"])
    full_key = {**key, "device": dev["name"], "kind": dev["kind"], "cores": os.cpu_count(),
                "versions": _versions()}
    memory = _memory_path(cache_dir)
    known = _recall(memory, full_key)
    if known:
        return Choice(known["precision"], requested, known["reason"], known["seconds_per_step"], remembered=True)
    log(f"precision: timing {TIMED_STEPS} train steps in float32 and {dev['half']} ({dev['why']}) ...")
    seconds = {p: measure(p) for p in ("float32", dev["half"])}
    best = min(seconds, key=seconds.get)
    other = dev["half"] if best == "float32" else "float32"
    reason = f"{best} measured {seconds[other] / seconds[best]:.2f}x faster than {other}; {dev['why']}"
    choice = Choice(best, requested, reason, {p: round(s, 5) for p, s in seconds.items()})
    _remember(memory, full_key, choice, log)
    return choice


def _versions() -> dict:
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


def _memory_path(cache_dir: str | None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), MEMORY)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
        data = loads_bounded(raw, 16)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing, unreadable or damaged: measure again (and rewrite it)


def _recall(path: str, key: dict) -> dict | None:
    entry = _read(path).get(_digest(key))
    if (isinstance(entry, dict) and entry.get("precision") in PRECISIONS
            and isinstance(entry.get("seconds_per_step"), dict)):
        return entry
    return None


def _remember(path: str, key: dict, choice: Choice, log) -> None:
    entries = _read(path)
    entries[_digest(key)] = {"key": key, "precision": choice.precision, "reason": choice.reason,
                             "seconds_per_step": choice.seconds_per_step,
                             "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, entries, indent=1, sort_keys=True)
    except OSError as err:
        log(f"warning: could not remember the precision choice in {path} ({err.strerror}); the next run times again")


# -- measuring ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def untouched_random_state():
    """Building and training throw-away models must not move the random state the run's own model is initialised
    from (runs repeat exactly under the same --seed whether or not this run measured), nor Keras' layer-name
    counters."""
    py, np_state = random.getstate(), np.random.get_state()
    gen = global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)
    names = global_state.get_global_attribute("object_name_uids")
    names = dict(names) if names is not None else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, gen)
        if names is not None:
            global_state.set_global_attribute("object_name_uids", collections.defaultdict(int, names))


def time_train_steps(backbone: str, num_classes: int, image_size: int, freeze_up_to: str | None, batch_size: int,
                     precision: str, steps: int = TIMED_STEPS) -> float:
    """Seconds per train step (best of `steps`) of the classifier, frozen up to `freeze_up_to` and computing in
    `precision`: forward through the frozen layers, forward and backward through the rest, an Adam update (with
    loss scaling for float16). Random weights and images: the speed does not depend on their values."""
    with untouched_random_state():
        model = models.build_classifier(backbone, num_classes, image_size, "none", precision=precision)
        plan = freezing.make_plan(registry.get(backbone), model, freeze_up_to)
        graph = freezing.training_graph(model, plan)
        variables = [v for group in graph.variables.values() for v in group]
        optimizer = keras.optimizers.Adam(1e-4)
        if precision == "float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        rng = np.random.default_rng(0)
        images = tf.constant(rng.integers(0, 256, (batch_size, image_size, image_size, 3)).astype(np.float32))
        labels = tf.constant(rng.integers(0, num_classes, batch_size).astype(np.int32))

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                logits = graph.model(images, training=True)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32)))
                scaled = optimizer.scale_loss(loss) if precision == "float16" else loss
            optimizer.apply(tape.gradient(scaled, variables), variables)
            return loss

        step().numpy()  # traces
        step().numpy()  # warms up
        best = float("inf")
        for _ in range(steps):
            start = time.perf_counter()
            step().numpy()
            best = min(best, time.perf_counter() - start)
        return best
