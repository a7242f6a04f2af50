"""tfl bench: tfl against the recipe users would otherwise run, side by side in one process.

Every case runs on the same backbone, weights, resolution, data subset (Fashion-MNIST from the embedded IDX
files, decoded once before any clock starts) and epoch budget:

- tfl: tfl's trainer with boundary caching (a fresh cache directory, so extraction is paid), then "warm": the
  same run again, reusing what the first one persisted;
- baseline: the Keras transfer-learning guide's recipe, a frozen base inside a keras.Model trained with
  compile + fit, which recomputes the backbone every epoch (compiled without XLA: on a CPU, XLA made this
  backbone ~10x slower, and a fair baseline is the fastest one);
- tfl without caching (what the cache buys).

Both train with the guide's hyperparameters (Adam, constant learning rate, lr/10 for everything in the
fine-tuning stage), so the comparison is one of speed; tfl then restores its best epoch by validation accuracy,
as it always does. Times cover training (and per-epoch validation), not model building or test evaluation.
Accuracy is on a test subset after training. The physical limit is the backbone's forward FLOPs (conv and
dense layers, counted from their shapes) times the images that must pass through it once, divided by the
measured matmul rate of the case's own precision (float32, or bfloat16 for the *_bf16 cases);
`fraction_of_peak` is that limit over tfl's time (for fine-tuning it leaves out the backward pass, so it
understates how close tfl is).

The input_pipeline case stands apart: no model, a generated folder of JPEGs read at 224 px by tf.data's bare
decoder and by tfl's training pipeline (streamed and kept, with and without augmentation), in images per second
per core (per CPU second of this process), so that its ratios hold on a machine others share.

A shared machine makes every number a measure of the load: each case records the load average before and after
and the share of the CPU other processes took while it ran (from /proc/stat, less this process's own CPU time);
above BUSY_SHARE the case is marked busy and a warning says so. Compare ratios from one run on an idle machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import platform
import tempfile
import time
from typing import Callable

from tfl.errors import UsageError
from tfl.options import BENCH_CASES as CASES

BUSY_SHARE = 0.10  # other processes took more than this share of the CPU during a case: its times are not tfl's
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")  # what the speed depends on


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    backbone: str = "efficientnet_lite0"
    weights: str = "default"
    image_size: int = 112  # the embedded default's resolution
    train: int = 3000
    val: int = 750
    test: int = 2000
    # head_only: the cold speedup over recomputing is about head_epochs (one backbone pass instead of one per
    # epoch), so >= 10x needs about a dozen epochs; a warm run (cache reused) skips even that one pass.
    head_epochs: int = 10
    finetune_head_epochs: int = 1  # partial_finetune: stage 1 ...
    finetune_epochs: int = 3  # ... then stage 2 above freeze_up_to
    freeze_up_to: str = "block5"
    batch_size: int = 64
    lr: float = 1e-3
    resnet_size: int = 224
    resnet_images: int = 256
    matmul_size: int = 2048
    serving_images: int = 256  # JPEGs through the exported SavedModel (and Keras predict), at batch 1 and 64
    # input_pipeline: a generated folder of JPEGs (sides drawn from source_sides) read at pipeline_size
    pipeline_images: int = 1024
    pipeline_size: int = 224
    source_sides: tuple[int, int] = (256, 500)
    pipeline_rounds: int = 2  # every variant timed this many times, interleaved; the best round is reported
    gpu_images_per_second: int = 2500  # a GPU step rate to feed (an A100 on ResNet50 in mixed precision)
    seed: int = 0
    dataset: str = "fashion_mnist"
    data_dir: str | None = None


FULL = BenchConfig()
QUICK = BenchConfig(image_size=64, train=1024, val=256, test=512, head_epochs=3, finetune_epochs=2,
                    resnet_size=128, resnet_images=64, matmul_size=1024, serving_images=128, pipeline_images=256)


def run_bench(cfg: BenchConfig = FULL, cases=CASES, log: Callable = print) -> dict:
    """{"machine": {...}, "cases": [{"name", "tfl_seconds", "baseline_seconds", "speedup", "tfl_accuracy",
    "baseline_accuracy", "fraction_of_peak", "precision", "load", ...}], "busy": bool, "warnings": [...]}"""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise UsageError(f"unknown bench case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    import tensorflow as tf

    from tfl.training import device

    # As tfl finetune runs by default on this device: on a CPU, op determinism makes cached and uncached runs agree.
    device.set_op_determinism(device.resolve_deterministic(None, device.device_kind(tf.distribute.get_strategy())))
    peaks = {p: matmul_flops(cfg.matmul_size, p) for p in ("float32", "bfloat16")}
    log(f"bench: matmul {peaks['float32'] / 1e9:.1f} GFLOP/s float32, {peaks['bfloat16'] / 1e9:.1f} bfloat16, on "
        f"{os.cpu_count()} core(s)")
    results, warnings = [], []
    with tempfile.TemporaryDirectory(prefix="tfl-bench-cache-") as cache_dir:
        data = _load(cfg, log) if {"head_only", "partial_finetune", "serving"} & set(cases) else None
        for case in cases:
            # Each case its own cache directory: the cached run pays for extraction, the warm one reuses it.
            case_cache = os.path.join(cache_dir, case)
            with LoadWatch() as watch:
                if case == "head_only":
                    result = _transfer_case(case, cfg, data, peaks, cfg.head_epochs, 0, None, case_cache, log)
                elif case == "partial_finetune":
                    result = _transfer_case(case, cfg, data, peaks, cfg.finetune_head_epochs, cfg.finetune_epochs,
                                            cfg.freeze_up_to, case_cache, log)
                elif case == "serving":
                    result = _serving_case(cfg, data, log)
                elif case == "input_pipeline":
                    result = _input_pipeline_case(cfg, case_cache, log)
                else:
                    result = _resnet_case(cfg, peaks, "bfloat16" if case.endswith("_bf16") else "float32", log)
            result["load"] = watch.report()
            if result["load"]["busy"]:
                warnings.append(f"{case}: other processes used {result['load']['others_cpu_share']:.0%} of the CPU "
                                f"(load average {result['load']['before']} -> {result['load']['after']}): its times "
                                "measure the load, not tfl; run the bench on an idle machine")
                log("warning: " + warnings[-1])
            results.append(result)
    return {"machine": machine_info(peaks), "cases": results, "busy": bool(warnings), "warnings": warnings}


class LoadWatch:
    """The load average before and after a block, and the share of the machine's CPU time that other processes
    used during it: the busy jiffies of /proc/stat less this process's own user + system time."""

    def __enter__(self):
        self.before, self.start = _loadavg(), self._sample()
        return self

    def __exit__(self, *exc):
        self.after, self.end = _loadavg(), self._sample()

    @staticmethod
    def _sample():
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), _busy_cpu_seconds(), usage.ru_utime + usage.ru_stime

    def others_share(self) -> float | None:
        (t0, busy0, own0), (t1, busy1, own1) = self.start, self.end
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * (os.cpu_count() or 1))

    def report(self) -> dict:
        share = self.others_share()
        return {"before": self.before, "after": self.after,
                "others_cpu_share": None if share is None else round(share, 3),
                "busy": share is not None and share > BUSY_SHARE}


def _loadavg():
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process has spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# -- measurements ------------------------------------------------------------------------------------------------------
def matmul_flops(n: int = 2048, precision: str = "float32", repeats: int = 5) -> float:
    """This machine's practical peak (FLOP/s) in `precision`: the best n x n by n x n matmul rate after a warm-up,
    of TensorFlow's and (float32) numpy's BLAS, whichever is faster here."""
    import numpy as np
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    a = tf.cast(tf.random.stateless_normal([n, n], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_normal([n, n], seed=[3, 4]), dtype)
    product = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y), tf.float32)))
    runs = [lambda: product(a, b).numpy()]
    if precision == "float32":
        x, y = a.numpy(), b.numpy()
        runs.append(lambda: np.matmul(x, y))
    best = float("inf")
    for run in runs:
        run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def forward_flops(model) -> int:
    """Multiply-adds x 2 of every convolution and dense layer of `model` (nested models included), from shapes."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += forward_flops(layer)
            continue
        if not hasattr(layer, "kernel") or not getattr(layer, "built", False):
            continue
        out = layer.output.shape
        positions = 1
        for d in out[1:-1]:
            positions *= int(d)
        kernel = tuple(int(d) for d in layer.kernel.shape)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            per_position = kernel[0] * kernel[1] * kernel[2] * kernel[3]  # kh, kw, channels, multiplier
        elif isinstance(layer, keras.layers.SeparableConv2D):
            per_position = (kernel[0] * kernel[1] * kernel[2] * kernel[3]
                            + int(layer.pointwise_kernel.shape[-2]) * int(layer.pointwise_kernel.shape[-1]))
        else:  # Conv*, Dense: kernel [..., in, out]
            per_position = 1
            for d in kernel:
                per_position *= d
        total += 2 * positions * per_position
    return total


def machine_info(peaks: dict) -> dict:
    import resource

    import keras
    import tensorflow as tf

    from tfl.cache import physical_memory
    from tfl.precision import cpu_info, device

    cpu, memory = cpu_info(), physical_memory()
    return {
        "cpu": cpu["model"], "cores": os.cpu_count(), "cpu_flags": [f for f in FLAGS if f in cpu["flags"]],
        "fast_half_precision": device()["half"], "memory_gb": round(memory / 2**30, 1) if memory else None,
        "gpus": len(tf.config.list_physical_devices("GPU")), "matmul_gflops": significant(peaks["float32"] / 1e9),
        "matmul_gflops_by_precision": {p: significant(v / 1e9) for p, v in peaks.items()},
        "load_average": _loadavg(),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
    }


# -- data --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Data:
    stores: dict  # split -> ImageStore (decoded once, shared by every run)
    num_classes: int
    data_ids: dict


def _load(cfg: BenchConfig, log) -> _Data:
    from tfl import data
    from tfl.data.pipeline import ImageStore
    from tfl.training.boundary import data_identity, subset_digest

    splits = data.load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, log=lambda *_: None)
    wanted = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    stores, ids = {}, {}
    for split, count in wanted.items():
        source, size = getattr(splits, split), splits.num_examples[split]
        if count > size:
            raise UsageError(f"the bench wants {count} {split} images but {cfg.dataset} has {size}")
        stores[split] = ImageStore.from_dataset(data.random_subset(source, size, count, cfg.seed), cfg.image_size)
        ids[split] = data_identity(splits.fingerprint, split, subset_digest(size, count, cfg.seed))
    log(f"bench: {cfg.dataset} subsets {cfg.train} train / {cfg.val} val / {cfg.test} test at {cfg.image_size}px, "
        f"{cfg.backbone} ({cfg.weights} weights)")
    return _Data(stores, splits.num_classes, ids)


def _batches(store, cfg: BenchConfig, training: bool):
    from tfl.data.pipeline import index_order

    order = index_order(store.count, cfg.batch_size, training=training, seed=cfg.seed, drop_remainder=training)
    return store.batches(order)


# -- the Lite0 cases ---------------------------------------------------------------------------------------------------
def _transfer_case(name, cfg, data, peaks, head_epochs, epochs, freeze_up_to, cache_dir, log) -> dict:
    peak = peaks["float32"]
    images = (cfg.train + cfg.val) * (head_epochs + epochs)  # images the epoch budget passes through the model
    cached = _tfl_run(cfg, data, head_epochs, epochs, freeze_up_to, "on", cache_dir)
    log(f"{name}: tfl with cache {cached['seconds']:.1f}s, test accuracy {cached['accuracy']:.4f}")
    warm = _tfl_run(cfg, data, head_epochs, epochs, freeze_up_to, "on", cache_dir)
    log(f"{name}: tfl again, reusing the persisted cache {warm['seconds']:.1f}s")
    baseline = _keras_guide_run(cfg, data, head_epochs, epochs, freeze_up_to)
    log(f"{name}: Keras guide recipe (compile + fit) {baseline['seconds']:.1f}s, "
        f"test accuracy {baseline['accuracy']:.4f}")
    uncached = _tfl_run(cfg, data, head_epochs, epochs, freeze_up_to, "off", cache_dir)
    log(f"{name}: tfl without cache {uncached['seconds']:.1f}s, test accuracy {uncached['accuracy']:.4f}")
    flops = cached["flops"]
    limit = flops * (cfg.train + cfg.val) / peak
    result = _case(name, cached, baseline, limit)
    training = cached["seconds"] - cached["extraction_seconds"]
    result.update({
        "precision": "float32",
        # where the cold run's time went: one backbone pass filling the cache, then the epochs on cached activations
        "cold_breakdown_seconds": {"cache_extraction": significant(cached["extraction_seconds"]),
                                   "training": significant(training)},
        "extraction_fraction_of_peak": significant(limit / cached["extraction_seconds"]),
        "extraction_images_per_second": significant((cfg.train + cfg.val) / cached["extraction_seconds"]),
        "tfl_warm_seconds": significant(warm["seconds"]),
        "warm_speedup": _ratio(baseline["seconds"], warm["seconds"]),
        "tfl_nocache_seconds": significant(uncached["seconds"]),
        "tfl_nocache_accuracy": round(uncached["accuracy"], 4),
        "cache_speedup": _ratio(uncached["seconds"], cached["seconds"]),
        "images_per_second": {"tfl": significant(images / cached["seconds"]),
                              "baseline": significant(images / baseline["seconds"]),
                              "tfl_nocache": significant(images / uncached["seconds"])},
        "backbone": cfg.backbone, "image_size": cfg.image_size, "train_images": cfg.train, "val_images": cfg.val,
        "test_images": cfg.test, "head_epochs": head_epochs, "finetune_epochs": epochs,
        "freeze_up_to": freeze_up_to, "backbone_gflops_per_image": significant(flops / 1e9),
    })
    if epochs:
        # Stage 2 epochs alone, fastest of each (the first one also traces the step function).
        fastest = {k: min(r.seconds for r in run["history"] if r.stage == "finetune")
                   for k, run in (("cached", cached), ("uncached", uncached))}
        result["finetune_epoch_seconds"] = {k: significant(v) for k, v in fastest.items()}
        result["epoch_speedup"] = _ratio(fastest["uncached"], fastest["cached"])
    return result


def _tfl_run(cfg, data, head_epochs, epochs, freeze_up_to, cache, cache_dir) -> dict:
    """tfl's stage loop (tfl.job.train_stages) on the shared, already decoded data."""
    import keras
    import tensorflow as tf

    from tfl import freezing, models
    from tfl.backbones import registry
    from tfl.job import Stage, train_stages
    from tfl.training.boundary import StageInputs
    from tfl.training.trainer import TrainConfig, Trainer

    keras.utils.set_random_seed(cfg.seed)
    model = models.build_classifier(cfg.backbone, data.num_classes, cfg.image_size, cfg.weights)
    plan = freezing.make_plan(registry.get(cfg.backbone), model, freeze_up_to)
    # The guide's hyperparameters (Adam, constant lr, lr/10 for everything in stage 2): a pure speed comparison.
    stages = [Stage("head", freezing.head_only_plan(plan), head_epochs, {"head": cfg.lr}),
              Stage("finetune", plan, epochs, {"backbone": cfg.lr / 10, "head": cfg.lr / 10})]
    counts = {split: store.count for split, store in data.stores.items()}
    quiet = lambda *_: None  # noqa: E731
    inputs = StageInputs(model, cfg.backbone, {}, counts, data.data_ids, cfg.image_size, cfg.batch_size, cfg.seed,
                         mode=cache, cache_dir=cache_dir, log=quiet, stores=data.stores)
    inputs.plan([(s.name, s.plan, s.epochs) for s in stages])
    trainer = Trainer(tf.distribute.get_strategy(), model, data.num_classes, TrainConfig(schedule="constant"), quiet)
    steps, val_steps = counts["train"] // cfg.batch_size, -(-counts["val"] // cfg.batch_size)
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress lines
        start = time.perf_counter()
        train_stages(trainer, model, inputs, stages, "trainable", False, steps, cfg.batch_size, val_steps, quiet)
        seconds = time.perf_counter() - start
        trainer.restore_best()
        _, accuracy = trainer.evaluate(_batches(data.stores["test"], cfg, False))
    return {"seconds": seconds, "accuracy": accuracy, "history": list(trainer.history),
            "flops": forward_flops(models.backbone_of(model)), "extraction_seconds": inputs.spent_seconds}


def _keras_guide_run(cfg, data, head_epochs, epochs, freeze_up_to) -> dict:
    """keras.io's transfer learning guide: base.trainable = False, base(x, training=False) in a keras.Model,
    compile + fit; then unfreeze the top of the base (BN layers stay frozen) and fit again at a 10x lower lr."""
    import keras
    import tensorflow as tf

    from tfl import freezing, models
    from tfl.backbones import registry
    from tfl.data.pipeline import IMAGE, LABEL
    from tfl.training.trainer import TrainConfig, Trainer

    spec = registry.get(cfg.backbone)
    keras.utils.set_random_seed(cfg.seed)
    size = cfg.image_size
    base = spec.build(input_shape=(size, size, 3), weights=spec.resolve_weights(cfg.weights), include_top=False)
    base.trainable = False
    inputs = keras.Input(shape=(size, size, 3))
    x = models.ImagePreprocessing.from_preprocessing(spec.preprocessing)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(data.num_classes)(x))
    as_xy = lambda batch: (batch[IMAGE], batch[LABEL])  # noqa: E731  (Keras fit takes (x, y))
    train, val = (_batches(data.stores[s], cfg, s == "train").map(as_xy) for s in ("train", "val"))

    def fit(lr, n):
        model.compile(optimizer=keras.optimizers.Adam(lr), jit_compile=False, metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(train, epochs=n, validation_data=val, verbose=0, shuffle=False)  # order: index_order

    start = time.perf_counter()
    if head_epochs:
        fit(cfg.lr, head_epochs)
    if epochs:
        base.trainable = True
        up_to = freezing.resolve_up_to(spec, [layer.name for layer in base.layers], freeze_up_to)
        for i, layer in enumerate(base.layers):
            layer.trainable = i > up_to and not isinstance(layer, keras.layers.BatchNormalization)
        fit(cfg.lr / 10, epochs)
    seconds = time.perf_counter() - start
    trainer = Trainer(tf.distribute.get_strategy(), model, data.num_classes, TrainConfig(), lambda *_: None)
    _, accuracy = trainer.evaluate(_batches(data.stores["test"], cfg, False))
    return {"seconds": seconds, "accuracy": accuracy}


# -- ResNet50 frozen forward -------------------------------------------------------------------------------------------
def _resnet_case(cfg: BenchConfig, peaks: dict, precision: str, log) -> dict:
    """Frozen forward throughput: tfl's cache extraction vs Keras predict, random weights, synthetic images, in
    float32 or (resnet50_forward_bf16) bfloat16 compute."""
    import keras
    import numpy as np

    from tfl import models
    from tfl.data.pipeline import IMAGE, ImageStore
    from tfl.training.boundary import POOLED, frozen_forward

    keras.utils.set_random_seed(cfg.seed)
    size, n = cfg.resnet_size, cfg.resnet_images
    model = models.build_classifier("resnet50", 10, size, "none", precision=precision)
    flops = forward_flops(models.backbone_of(model))
    pixels = np.random.default_rng(cfg.seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    store = ImageStore(pixels, np.zeros(n, np.int32), size)
    batches = _batches(store, cfg, False)
    extract = frozen_forward(model, POOLED)
    extract(next(iter(batches))[IMAGE])  # trace outside the clock, as predict's warm-up below
    start = time.perf_counter()
    tfl_out = np.concatenate([np.asarray(extract(batch[IMAGE]), np.float32) for batch in batches])
    tfl_seconds = time.perf_counter() - start

    features = models.submodel(model, end=models.POOL)
    features.compile(jit_compile=False)
    images_only = batches.map(lambda batch: batch[IMAGE])
    features.predict(images_only.take(1), verbose=0)
    start = time.perf_counter()
    keras_out = np.asarray(features.predict(images_only, verbose=0), np.float32)
    baseline_seconds = time.perf_counter() - start
    tolerance = 1e-3 if precision == "float32" else 5e-2  # bfloat16 keeps 8 bits of mantissa
    scale = max(1.0, float(np.abs(keras_out).max()))
    if not np.allclose(tfl_out, keras_out, rtol=tolerance, atol=tolerance * scale):
        raise RuntimeError("bench: tfl's frozen forward and Keras predict disagree; the comparison is void")
    limit = flops * n / peaks[precision]
    name = "resnet50_forward" + ("_bf16" if precision == "bfloat16" else "")
    log(f"{name}: tfl {tfl_seconds:.1f}s ({n / tfl_seconds:.1f} img/s, {limit / tfl_seconds:.0%} of the {precision} "
        f"matmul peak), Keras predict {baseline_seconds:.1f}s")
    result = _case(name, {"seconds": tfl_seconds, "accuracy": None},
                   {"seconds": baseline_seconds, "accuracy": None}, limit)
    result.update({"images_per_second": {"tfl": significant(n / tfl_seconds),
                                         "baseline": significant(n / baseline_seconds)},
                   "precision": precision, "backbone": "resnet50", "image_size": size, "images": n,
                   "backbone_gflops_per_image": significant(flops / 1e9)})
    return result


# -- serving an export -------------------------------------------------------------------------------------------------
def _serving_case(cfg: BenchConfig, data, log) -> dict:
    """An exported SavedModel's serving_default on JPEG bytes (decode, resize, model, softmax, top-k) at batch 1
    and 64, next to Keras predict on the decoded, resized pixels at the same batch sizes."""
    import keras
    import tensorflow as tf

    from tfl import models
    from tfl.data.pipeline import IMAGE, index_order
    from tfl.serving.saved_model import SERVING_SIGNATURE, write_saved_model

    keras.utils.set_random_seed(cfg.seed)
    model = models.build_classifier(cfg.backbone, data.num_classes, cfg.image_size, cfg.weights)
    store = data.stores["test"]
    n = min(cfg.serving_images, store.count)
    order = index_order(store.count, n, training=False, seed=cfg.seed)
    pixels = next(iter(store.batches(order)))[IMAGE].numpy()[:n]  # at the model's size, as the pipeline makes them
    native = store.images[:n]  # the dataset's own stored images, encoded as a client would send them
    jpegs = [tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=95).numpy() for image in native]
    result = {"name": "serving", "backbone": cfg.backbone, "image_size": cfg.image_size, "images": n,
              "precision": "float32", "images_per_second": {}}
    with tempfile.TemporaryDirectory(prefix="tfl-bench-export-") as export_dir:
        labels = "\n".join(str(i) for i in range(data.num_classes)) + "\n"
        write_saved_model(model, labels, export_dir, top_k=min(5, data.num_classes))
        serve = tf.saved_model.load(export_dir).signatures[SERVING_SIGNATURE]
        for batch in (1, 64):
            chunks = [jpegs[i: i + batch] for i in range(0, n, batch)]
            serve(image_bytes=tf.constant(chunks[0]))  # warm-up
            start = time.perf_counter()
            for chunk in chunks:
                serve(image_bytes=tf.constant(chunk))["probabilities"].numpy()
            served = time.perf_counter() - start
            model.predict(pixels[:batch], batch_size=batch, verbose=0)  # warm-up
            start = time.perf_counter()
            model.predict(pixels, batch_size=batch, verbose=0)
            predicted = time.perf_counter() - start
            result["images_per_second"][f"saved_model_jpeg_batch{batch}"] = significant(n / served)
            result["images_per_second"][f"keras_predict_batch{batch}"] = significant(n / predicted)
            log(f"serving: batch {batch}: SavedModel serving_default on JPEG bytes {n / served:.1f} img/s, "
                f"Keras predict on pixels {n / predicted:.1f} img/s")
    return result


# -- the input pipeline on a JPEG folder -------------------------------------------------------------------------------
PIPELINE_VARIANTS = ("bare_decoder", "bare_decoder_antialias", "tfl_streamed", "tfl_streamed_augment", "tfl_kept",
                     "tfl_kept_augment")
STREAMED_GOAL = 0.8  # tfl's streamed pipeline, images per core-second, as a fraction of the bare decoder's


def _input_pipeline_case(cfg: BenchConfig, work_dir: str, log) -> dict:
    """Images per second per core reading a generated JPEG folder at cfg.pipeline_size: tf.data's bare
    decode_jpeg + resize (parallel map, AUTOTUNE), the same with the antialiased resize tfl uses (the bare decoder
    at tfl's image quality), then tfl's training pipeline in the seeded training order, streamed from the files
    (StreamedImages) and kept (an ImageStore decoded once), each with and without --augment.

    Per core is images over the CPU seconds this process spent while draining the pipeline (every thread), so it
    does not depend on how many cores the machine has or how many of them others took; the wall rate is reported
    beside it. Every variant runs cfg.pipeline_rounds times, interleaved, and its best round counts."""
    import numpy as np

    from tfl.data.decode import decode_files, image_files
    from tfl.data.pipeline import ImageStore, StreamedImages, index_order

    start = time.perf_counter()
    paths, source = write_jpeg_folder(os.path.join(work_dir, "jpegs"), cfg.pipeline_images, cfg.source_sides,
                                      cfg.seed)
    n, size = len(paths), cfg.pipeline_size
    jpeg_bytes = sum(os.path.getsize(p) for p in paths)
    log(f"input_pipeline: {n} JPEGs ({jpeg_bytes / 2**20:.1f} MB, {source}) written in "
        f"{time.perf_counter() - start:.1f}s")
    decoded = lambda: decode_files(paths, np.zeros(n, np.int64), np.zeros(n, bool))  # noqa: E731
    streamed = StreamedImages(image_files(decoded()), size)
    with _Clock() as keep_clock:
        kept = ImageStore.from_dataset(decoded(), size)  # what --decoded-images keep pays once
    order = lambda: index_order(n, cfg.batch_size, training=True, seed=cfg.seed)  # noqa: E731
    pipelines = {
        "bare_decoder": lambda: bare_decoder(paths, size, cfg.batch_size),
        "bare_decoder_antialias": lambda: bare_decoder(paths, size, cfg.batch_size, antialias=True),
        "tfl_streamed": lambda: streamed.batches(order()),
        "tfl_streamed_augment": lambda: streamed.batches(order(), augment=True, seed=cfg.seed),
        "tfl_kept": lambda: kept.batches(order()),
        "tfl_kept_augment": lambda: kept.batches(order(), augment=True, seed=cfg.seed),
    }
    best = {}
    for _ in range(cfg.pipeline_rounds):
        for name, make in pipelines.items():
            measured = _drain(make())
            if measured["images"] != n:
                raise RuntimeError(f"bench: {name} gave {measured['images']} images of {n}; the comparison is void")
            if name not in best or measured["per_core"] > best[name]["per_core"]:
                best[name] = measured
    per_core = {name: significant(m["per_core"]) for name, m in best.items()}
    bare = per_core["bare_decoder"]
    result = {
        "name": "input_pipeline", "images": n, "image_size": size, "source_sides": list(cfg.source_sides),
        "source": source, "jpeg_mb": significant(jpeg_bytes / 2**20), "batch_size": cfg.batch_size,
        "rounds": cfg.pipeline_rounds,
        "images_per_core_second": per_core,
        "images_per_second": {name: significant(m["images"] / m["seconds"]) for name, m in best.items()},
        "cores_busy": {name: significant(m["cpu_seconds"] / m["seconds"], 3) for name, m in best.items()},
        "ratio_to_bare": {name: _ratio(v, bare) for name, v in per_core.items() if name != "bare_decoder"},
        "keep_decode": {"seconds": significant(keep_clock.seconds),
                        "images_per_core_second": significant(n / keep_clock.cpu_seconds)},
        "gpu_images_per_second": cfg.gpu_images_per_second,
        "cores_for_gpu": {name: significant(cfg.gpu_images_per_second / v, 3) for name, v in per_core.items()},
    }
    result["streamed_ratio"] = result["ratio_to_bare"]["tfl_streamed"]
    # What the resize's antialiasing costs, and how close tfl is to a bare decoder that resizes as it does.
    result["streamed_ratio_same_resize"] = _ratio(per_core["tfl_streamed"], per_core["bare_decoder_antialias"])
    result["streamed_goal_met"] = result["streamed_ratio"] >= STREAMED_GOAL
    for name in PIPELINE_VARIANTS:
        log(f"input_pipeline: {name} {per_core[name]:.0f} img/s per core "
            f"({result['images_per_second'][name]:.0f} img/s on {result['cores_busy'][name]:.2f} busy cores)")
    return result


def bare_decoder(paths: list, size: int, batch_size: int, antialias: bool = False):
    """The reference: tf.data's documented way to read JPEGs, decode_jpeg + resize (bilinear, by default without
    antialiasing) in a parallel map (AUTOTUNE), batched and prefetched; float32 [B, size, size, 3] batches, as tfl's
    pipeline gives."""
    import tensorflow as tf

    @tf.autograph.experimental.do_not_convert  # plain TF ops (autograph cannot read this closure's source)
    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, [size, size], antialias=antialias)

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


class _Clock:
    """Wall and process CPU seconds (all threads) of a block."""

    def __enter__(self):
        self._start = (time.perf_counter(), _cpu_seconds())
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start[0]
        self.cpu_seconds = max(_cpu_seconds() - self._start[1], 1e-6)


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drain(ds) -> dict:
    """Iterate `ds` once (iterator start-up included, as every epoch pays it): images, wall and CPU seconds."""
    from tfl.data.pipeline import IMAGE

    images = 0
    with _Clock() as clock:
        for batch in ds:
            images += int((batch[IMAGE] if isinstance(batch, dict) else batch).shape[0])
    return {"images": images, "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds,
            "per_core": images / clock.cpu_seconds}


def write_jpeg_folder(root: str, count: int, sides: tuple, seed: int = 0) -> tuple[list[str], str]:
    """`count` JPEGs (quality 90) under root/<class>/, width and height each drawn from `sides` (inclusive):
    crops of scikit-image's sample photos when it is installed, else smooth random colour fields with noise (which
    compress about as well as photos). Returns the paths (sorted) and which of the two it used."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    try:
        from skimage import data as samples

        photos = [getattr(samples, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
        source = "crops of scikit-image sample photos"
    except ImportError:
        photos, source = None, "smooth random colour fields with noise"
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        if photos is not None:
            photo = photos[i % len(photos)]
            h, w = photo.shape[:2]
            side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            image = Image.fromarray(photo[top: top + side, left: left + side]).resize((width, height), Image.BILINEAR)
        else:
            field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height),
                                                                                             Image.BICUBIC)
            noisy = np.asarray(field, np.float32) + rng.normal(0, 6, (height, width, 3))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        folder = os.path.join(root, f"class{i % 4}")
        os.makedirs(folder, exist_ok=True)
        paths.append(os.path.join(folder, f"{i:06d}.jpg"))
        image.save(paths[-1], quality=90)
    return sorted(paths), source


def _case(name: str, tfl: dict, baseline: dict, limit_seconds: float) -> dict:
    rounded = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {
        "name": name,
        "tfl_seconds": significant(tfl["seconds"]),
        "baseline_seconds": significant(baseline["seconds"]),
        "speedup": _ratio(baseline["seconds"], tfl["seconds"]),
        "tfl_accuracy": rounded(tfl["accuracy"]),
        "baseline_accuracy": rounded(baseline["accuracy"]),
        "fraction_of_peak": significant(limit_seconds / tfl["seconds"]),
        "physical_limit_seconds": significant(limit_seconds),
    }


def _ratio(a: float, b: float) -> float:
    return significant(a / b, 3) if b > 0 else float("inf")


def significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant figures: a relative precision whatever the magnitude, so a ratio of two
    reported numbers agrees with the reported ratio (rounding 0.039 s to three decimals would move it by 2.5%)."""
    return float(f"{value:.{digits}g}")


def _pipeline_lines(c: dict, where: str) -> list[str]:
    lines = [f"{'input_pipeline':<22} {c['images']} JPEGs ({c['jpeg_mb']} MB, sides {c['source_sides'][0]}-"
             f"{c['source_sides'][1]} px, {c['source']}) at {c['image_size']} px, batch {c['batch_size']}{where}",
             f"{'':<22} {'pipeline':<24} {'img/s/core':>10} {'img/s':>8} {'cores':>6} {'vs bare':>8} "
             f"{'cores for ' + str(c['gpu_images_per_second']) + ' img/s':>22}"]
    for name in PIPELINE_VARIANTS:
        ratio = c["ratio_to_bare"].get(name)
        lines.append(f"{'':<22} {name:<24} {c['images_per_core_second'][name]:>10.0f} "
                     f"{c['images_per_second'][name]:>8.0f} {c['cores_busy'][name]:>6.2f} "
                     f"{'-' if ratio is None else f'{ratio:.0%}':>8} {c['cores_for_gpu'][name]:>22.1f}")
    lines.append(f"{'':<22} tfl streamed / bare decoder: {c['streamed_ratio']:.0%} (goal {STREAMED_GOAL:.0%}"
                 f"{', met' if c['streamed_goal_met'] else ', not met'}); / bare decoder with tfl's antialiased "
                 f"resize: {c['streamed_ratio_same_resize']:.0%}; keeping: one decode pass "
                 f"{c['keep_decode']['images_per_core_second']:.0f} img/s/core")
    return lines


def format_table(report: dict) -> str:
    m = report["machine"]
    peaks = ", ".join(f"{v} {p}" for p, v in m["matmul_gflops_by_precision"].items())
    lines = [f"{m['cpu']}, {m['cores']} cores ({' '.join(m['cpu_flags']) or 'no AVX flags'}), matmul peak GFLOP/s: "
             f"{peaks}, TF {m['tensorflow']}"]
    if any(c["name"] != "input_pipeline" for c in report["cases"]):  # that case has columns of its own
        lines.append(f"{'case':<22} {'tfl s':>8} {'base s':>8} {'speedup':>8} {'tfl acc':>8} {'base acc':>8} "
                     f"{'% peak':>7} {'no-cache s':>10} {'warm s':>7}  load before -> after, others' CPU")
    for c in report["cases"]:
        load = c.get("load") or {}
        share = load.get("others_cpu_share")
        where = (f"  {load.get('before', ['?'])[0]} -> {load.get('after', ['?'])[0]}, "
                 f"{'?' if share is None else f'{share:.0%}'}{' BUSY' if load.get('busy') else ''}")
        if c["name"] == "input_pipeline":
            lines.extend(_pipeline_lines(c, where))
            continue
        if c["name"] == "serving":
            ips = c["images_per_second"]
            lines.append(f"{'serving':<22} img/s  SavedModel on JPEG bytes: batch 1 {ips['saved_model_jpeg_batch1']}, "
                         f"batch 64 {ips['saved_model_jpeg_batch64']}; Keras predict: batch 1 "
                         f"{ips['keras_predict_batch1']}, batch 64 {ips['keras_predict_batch64']}{where}")
            continue
        acc = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        seconds = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        lines.append(f"{c['name']:<22} {c['tfl_seconds']:>8.1f} {c['baseline_seconds']:>8.1f} {c['speedup']:>7.2f}x "
                     f"{acc(c['tfl_accuracy']):>8} {acc(c['baseline_accuracy']):>8} {c['fraction_of_peak']:>7.1%}"
                     f" {seconds(c.get('tfl_nocache_seconds')):>10} {seconds(c.get('tfl_warm_seconds')):>7}" + where)
        if "cold_breakdown_seconds" in c:
            parts = c["cold_breakdown_seconds"]
            lines.append(f"{'':<22} cold run: cache extraction {parts['cache_extraction']:.1f}s "
                         f"({c['extraction_images_per_second']:.0f} img/s, {c['extraction_fraction_of_peak']:.0%} of "
                         f"peak), training {parts['training']:.1f}s")
        if "epoch_speedup" in c:
            lines.append(f"{'':<22} stage-2 epoch with boundary cache {c['epoch_speedup']:.2f}x faster than "
                         "recomputing")
    for warning in report.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
