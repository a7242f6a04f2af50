"""Time tfl's train step with and without XLA (--jit), alternating in one process, and print a table; or, with
--readback, the default's head epochs reading the step's numbers back every step against at each epoch's end.

    python scripts/jit_step_timing.py                   # the embedded default and ResNet50 at 224 px
    python scripts/jit_step_timing.py --steps 5 --cases lite0_stage2
    python scripts/jit_step_timing.py --readback 3      # 3 alternating rounds of 10 head epochs each way

Cases (random images, random init unless the case says; what is timed is the trainer's own step function, so the
optimizers, loss and all-reduced sums are the ones a run uses):
- lite0_head: the default's head stage as tfl runs it, a step on cached pooled features (1280 -> 10, batch 64);
- lite0_stage2: the default's stage 2, EfficientNet-Lite0 above block4 at 112 px, batch 64, images in;
- resnet50_224: ResNet50 trained whole at 224 px, batch 16 (--weights none: speed does not depend on weights).
Each step is timed to its read-back (the totals brought to the host), the jit and plain steps alternate so both see
the same load, and the first (tracing, XLA compiling) step of each is reported apart. Ratios: plain / jit (> 1: XLA
faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _steps(case: str):
    """(model to train, groups, a batch) of one case."""
    import keras
    import numpy as np

    from tfl import freezing, models
    from tfl.backbones import registry
    from tfl.data.pipeline import IMAGE, LABEL
    from tfl.job import Stage, param_groups

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if case == "lite0_head":
        model = keras.Sequential([keras.Input((1280,)), keras.layers.Dropout(0.2), keras.layers.Dense(10)])
        from tfl.training.trainer import ParamGroup

        batch = {IMAGE: rng.normal(size=(64, 1280)).astype("float32"), LABEL: rng.integers(0, 10, 64).astype("int32")}
        return model, [ParamGroup("head", model.trainable_weights, 1e-3)], batch
    backbone, size, batch_size, up_to = {"lite0_stage2": ("efficientnet_lite0", 112, 64, "block4"),
                                         "resnet50_224": ("resnet50", 224, 16, None)}[case]
    model = models.build_classifier(backbone, 10, size, "none")
    plan = freezing.make_plan(registry.get(backbone), model, up_to)
    graph = freezing.training_graph(model, plan)
    groups = param_groups(graph, Stage(case, plan, 1, {"backbone": 1e-4, "head": 1e-3}))
    batch = {IMAGE: rng.integers(0, 256, (batch_size, size, size, 3)).astype("float32"),
             LABEL: rng.integers(0, 10, batch_size).astype("int32")}
    return graph.model, groups, batch


def time_case(case: str, steps: int) -> dict:
    import tensorflow as tf

    from tfl.training.trainer import StagePolicy, TrainConfig, Trainer

    model, groups, batch = _steps(case)
    batch = {k: tf.constant(v) for k, v in batch.items()}
    runs = {}
    for jit in (False, True):
        trainer = Trainer(tf.distribute.get_strategy(), model, 10, TrainConfig(jit=jit, schedule="constant"),
                          log=lambda *_: None)
        live = trainer._optimizers_for(case, groups, 1, steps + 1, StagePolicy(warmup=False), None)
        step = trainer._train_step_fn(model, groups, [live[g.name].optimizer for g in groups], len(batch["label"]))
        runs[jit] = {"trainer": trainer, "step": step, "times": []}
    for i in range(steps + 1):
        for jit, run in runs.items():
            start = time.perf_counter()
            running, _ = run["trainer"]._step(run["step"], batch, None)
            run["step"].totals.read(running)  # wait for the step: its numbers on the host
            seconds = time.perf_counter() - start
            if i == 0:
                run["first"] = seconds
            else:
                run["times"].append(seconds)
    plain, xla = (statistics.median(runs[j]["times"]) for j in (False, True))
    return {"case": case, "plain_s": plain, "jit_s": xla, "ratio": plain / xla, "plain_first_s": runs[False]["first"],
            "jit_first_s": runs[True]["first"], "steps": steps}


def time_readback(rounds: int) -> None:
    """Ten head epochs on cached-like pooled features (3,000 train / 750 val x 1280, batch 64, Adam 1e-3 constant),
    as tfl bench's head-only case trains them: --readback-every 1 against 1000 (the epoch's end), alternating."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfl.data.pipeline import FEATURES, LABEL
    from tfl.training.trainer import ParamGroup, TrainConfig, Trainer

    rng = np.random.default_rng(0)

    def batches(n):
        features, labels = rng.normal(size=(n, 1280)).astype("float32"), rng.integers(0, 10, n).astype("int32")
        return tf.data.Dataset.from_tensor_slices({FEATURES: features, LABEL: labels}).batch(64).cache()

    train, val = batches(3000), batches(750)
    seconds = {1: [], 1000: []}
    for _ in range(rounds):
        for every, runs in seconds.items():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((1280,)), keras.layers.Dropout(0.2), keras.layers.Dense(10)])
            trainer = Trainer(tf.distribute.get_strategy(), model, 10, TrainConfig(schedule="constant",
                                                                                   readback_every=every),
                              log=lambda *_: None)
            trainer.run_stage("head", model, [ParamGroup("head", model.trainable_weights, 1e-3)], 10, train, val,
                              3000 // 64, 64, 12)
            runs.append(sum(r.seconds for r in trainer.history[1:]))  # epoch 1 traces
            print(f"readback every {every:>4}: epochs 2-10 {runs[-1]:.2f} s, last train loss "
                  f"{trainer.history[-1].train_loss:.6f}", flush=True)
    for every, runs in seconds.items():
        print(f"median, readback every {every:>4}: {statistics.median(runs):.2f} s "
              f"(range {min(runs):.2f}-{max(runs):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="lite0_head,lite0_stage2,resnet50_224")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind after the first")
    parser.add_argument("--readback", type=int, metavar="ROUNDS", help="time the read-back interval instead")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cores")
    if args.readback:
        time_readback(args.readback)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    print(f"{'case':<14} {'plain s/step':>12} {'jit s/step':>11} {'plain/jit':>9} "
          f"{'first plain':>12} {'first jit':>10}")
    for case in args.cases.split(","):
        r = time_case(case, args.steps)
        print(f"{r['case']:<14} {r['plain_s']:>12.4f} {r['jit_s']:>11.4f} {r['ratio']:>9.2f} "
              f"{r['plain_first_s']:>12.1f} {r['jit_first_s']:>10.1f}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
