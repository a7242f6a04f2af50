#!/usr/bin/env python
"""Usage: python scripts/lora_step_time.py

Train-step time of the layers above block4 of EfficientNet-Lite0 (112 px, batch 64, 10 classes) on boundary
activations, full fine-tuning vs LoRA r=8, interleaved in one process (ratio under the same load): the frozen
part is computed once by the boundary cache, so these layers are what an epoch of stage 2 costs."""
import time

import keras
import numpy as np
import tensorflow as tf

from tfl import adapters, freezing, models
from tfl.backbones import registry

spec = registry.get("efficientnet_lite0")

def step_fn(lora):
    keras.utils.set_random_seed(0)
    model = models.build_classifier("efficientnet_lite0", 10, 112, "none")
    plan = freezing.make_plan(spec, model, "block4")
    if lora:
        adapters.add_lora(model, plan, 8)
        plan = freezing.make_plan(spec, model, "block4")
    graph = freezing.training_graph(model, plan)
    variables = [v for vs in graph.variables.values() for v in vs]
    backbone = models.backbone_of(model)
    suffix = models.submodel(backbone, start=graph.boundary, name="suffix")
    head = models.head_layers(model)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(variables)
    x = tf.random.normal([64, *suffix.inputs[0].shape[1:]])
    y = tf.random.uniform([64], 0, 10, tf.int32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            h = suffix(x, training=True)
            for layer in head:
                h = layer(h, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, h, from_logits=True))
        grads = tape.gradient(loss, [v.value for v in variables])
        opt.apply(grads, variables)
        return loss
    step()
    return step, sum(int(np.prod(v.shape)) for v in variables)

full, n_full = step_fn(False)
lora, n_lora = step_fn(True)
times = {"full": [], "lora": []}
for rep in range(6):
    for name, fn in (("full", full), ("lora", lora)):
        t = time.perf_counter()
        for _ in range(3):
            fn()
        times[name].append((time.perf_counter() - t) / 3)
med = {k: float(np.median(v)) for k, v in times.items()}
print(f"trained params full {n_full:,} lora {n_lora:,}")
print(f"median step s full {med['full']:.3f} lora {med['lora']:.3f} ratio lora/full {med['lora'] / med['full']:.2f}")
