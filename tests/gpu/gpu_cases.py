"""The GPU-only tests, run by scripts/gpu_check.sh: float16 with loss scaling, bfloat16 (compute capability >= 8.0)
and MirroredStrategy over every visible GPU.

Not part of the normal suite: the file name does not match pytest's test_*.py, and this folder has no conftest, so
`pytest tests` never collects it; the check passes the file by name. `scripts/gpu_check.sh --cpu` runs the same
tests on the CPU (TFL_GPU_CHECK_DEVICE=cpu: bfloat16 on the CPU, the mirrored strategy over two logical CPUs that
the check splits off before TensorFlow starts), which is how the normal suite covers this file.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import keras
from tfl import models
from tfl.training import strategy as strategies
from tfl.training.trainer import ParamGroup, TrainConfig, Trainer

ON_CPU = os.environ.get("TFL_GPU_CHECK_DEVICE") == "cpu"
CPU_REPLICAS = 2  # the logical CPUs scripts/gpu_check.py splits off with --cpu
quiet = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def gpus():
    found = tf.config.list_physical_devices("GPU")
    if not ON_CPU and not found:
        pytest.fail("no GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') is empty); "
                    "run scripts/gpu_check.sh --cpu for the CPU path")
    return [] if ON_CPU else found


def device_name(gpus) -> str:
    return "/cpu:0" if not gpus else "/gpu:0"


def tiny_data(batch: int = 8, steps: int = 2, size: int = 32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * steps, size, size, 3)).astype(np.float32)
    labels = (images.mean(axis=(1, 2, 3)) > 127.5).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(batch)


def train_two_steps(precision: str, loss_scale: bool, gpus, batch: int = 2, size: int = 32):
    """compact_cnn in `precision` on the check's device, two steps of `batch` images (few: a CPU emulates float16,
    slowly): the model, the trainer, its weights before and after."""
    keras.utils.set_random_seed(0)
    with tf.device(device_name(gpus)):
        model = models.build_classifier("compact_cnn", 2, size, "none", precision=precision)
        trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(loss_scale=loss_scale), log=quiet)
        head, body = model.get_layer("logits").trainable_weights, models.backbone_of(model).trainable_weights
        before = [w.numpy().copy() for w in head + body]
        data = tiny_data(batch=batch, size=size)
        trainer.run_stage("finetune", model, [ParamGroup("backbone", body, 1e-3), ParamGroup("head", head, 1e-3)],
                          1, data, data, steps_per_epoch=2, global_batch=batch)
    after = [w.numpy() for w in head + body]
    return model, trainer, before, after


def assert_trained(trainer, before, after):
    assert all(np.isfinite(h.train_loss) for h in trainer.history)
    assert all(np.isfinite(a).all() for a in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(after, before)) >= len(before) // 2  # both groups stepped


def test_float16_trains_with_dynamic_loss_scaling(gpus):
    model, trainer, before, after = train_two_steps("float16", True, gpus)
    assert models.backbone_of(model).compute_dtype == "float16" and model.get_layer("logits").compute_dtype == "float32"
    optimizers = [live.optimizer for live in trainer._optimizers.values()]
    assert optimizers and all(isinstance(o, keras.optimizers.LossScaleOptimizer) for o in optimizers)
    assert_trained(trainer, before, after)
    if gpus:
        assert "GPU" in model.get_layer("logits").kernel.value.device.upper()


def test_bfloat16_trains_on_compute_capability_8_or_more(gpus):
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0)
        if tuple(capability) < (8, 0):
            pytest.skip(f"bfloat16 needs compute capability >= 8.0 (Ampere); GPU 0 has {capability}")
    model, trainer, before, after = train_two_steps("bfloat16", False, gpus)
    assert models.backbone_of(model).compute_dtype == "bfloat16" and model.get_layer("logits").compute_dtype == "float32"
    optimizers = [live.optimizer for live in trainer._optimizers.values()]
    assert not any(isinstance(o, keras.optimizers.LossScaleOptimizer) for o in optimizers)  # float32's exponent
    assert_trained(trainer, before, after)


def test_mirrored_over_every_device_steps_as_one_device_on_the_global_batch(gpus):
    """Two steps on a global batch of 8 split over every replica give the weights one device gets on the whole
    batch (no BatchNormalization, whose per-replica statistics would differ)."""
    mirrored = strategies.make_strategy("mirrored", None if gpus else CPU_REPLICAS)
    replicas = mirrored.num_replicas_in_sync
    assert replicas == (len(gpus) if gpus else CPU_REPLICAS)

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                                 keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, name="logits")])

    batch = 8 * replicas  # every replica gets 8
    weights = {}
    for name, strategy in (("one", tf.distribute.get_strategy()), ("mirrored", mirrored)):
        with strategy.scope():
            model = build()
        trainer = Trainer(strategy, model, 2, TrainConfig(), log=quiet)
        data = tiny_data(batch=batch)
        trainer.run_stage("head", model, [ParamGroup("all", model.trainable_weights, 1e-2)], 1, data, data,
                          steps_per_epoch=2, global_batch=batch)
        assert all(np.isfinite(h.train_loss) for h in trainer.history)
        weights[name] = [w.numpy() for w in model.weights]
    for one, mirrored_weight in zip(weights["one"], weights["mirrored"]):
        np.testing.assert_allclose(mirrored_weight, one, rtol=1e-4, atol=1e-5)
    assert any(not np.allclose(w, build().weights[i].numpy()) for i, w in enumerate(weights["one"]))  # it trained
