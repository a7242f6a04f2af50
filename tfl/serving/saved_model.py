"""SavedModel for TF Serving: encoded image bytes (or pixel batches) in; probabilities and top-k classes out.

Signatures (the Keras model inside already holds the preprocessing: raw 0-255 RGB in, logits out):
  serving_default  image_bytes string [N] (JPEG, PNG, GIF, BMP)  -> probabilities float32 [N, C],
                                                                     classes int32 [N, k], labels string [N, k],
                                                                     confident bool [N] (with an abstain threshold)
                   (an image above $TFL_MAX_PIXELS at export time, by its header, is refused undecoded)
  predict_images   images float32 [N, H, W, 3], 0-255 RGB, any H, W -> the same outputs
A signature has one input dtype; predict_images takes float32 (JSON numbers need nothing, gRPC clients cast
uint8 arrays), rather than doubling the signatures for uint8.
Class names travel as the asset assets/labels.txt (line i = class i), read by a lookup table.
A calibrated run (calibration.json, tfl.calibration) is exported with its temperature: probabilities are
softmax(logits / T) inside the graph, and assets.extra/calibration.json (which TF Serving leaves alone) records it;
with TTA kept on val (`tfl calibrate --tta`) the logits are the mean over the views (tfl.tta), inside the graph too.
"""

from __future__ import annotations

import os
import tempfile

import tensorflow as tf

# The pipeline's own resize functions, so serving cannot drift from what the model saw in evaluation.
from tfl.data.pipeline import resize_uint8, to_model_input
from tfl.data.pixel_limit import checked_bytes, max_pixels
from tfl.errors import UsageError
from tfl.serving import layout
from tfl.training import rundir

SERVING_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "predict_images"
BYTES_INPUT = "image_bytes"  # TF Serving's REST API treats `{"b64": ...}` values as bytes; `_bytes` is its convention
IMAGES_INPUT = "images"
DEFAULT_TOP_K = 5
EXTRA_ASSETS = "assets.extra"  # the SavedModel folder for files the graph does not read (TF Serving ignores it)


def export_saved_model(run_path: str, output: str | None = None, version: int | None = None,
                       top_k: int = DEFAULT_TOP_K, log=print) -> str:
    """Export a run's best model to OUTPUT/<version>/ (default saved_models/<run name>/<next>/); returns it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--top-k {top_k!r} must be a positive integer")
    run = rundir.RunDir(run_path, create=False)
    labels = layout.labels_text(run.read_classes())
    path = layout.version_dir(output or layout.default_base(run_path), version)
    model, class_names = run.load()
    temperature, threshold, tta = run.temperature(), run.threshold(), run.tta()
    k = min(top_k, len(class_names))

    def build(tmp):
        try:
            write_saved_model(model, labels, tmp, k, temperature, threshold, tta)
            layout.write_calibration(run, os.path.join(tmp, EXTRA_ASSETS))
        except tf.errors.OpError as err:  # TensorFlow's writer: a full disk is ResourceExhausted, ulimit -f OutOfRange
            disk = layout.disk_error(err.message, path)
            if disk is None:
                raise
            raise disk from None

    layout.write_version(path, build, log)
    log(f"exported SavedModel ({len(class_names)} classes, top {k}, {model.inputs[0].shape[1]}px"
        f"{layout.describe_temperature(run)}) to {path}")
    return path


def write_saved_model(model, labels: str, path: str, top_k: int, temperature: float = 1.0,
                      threshold: float | None = None, tta: str | None = None) -> None:
    """The SavedModel of `model` (raw pixels in, logits out) with both signatures; probabilities are
    softmax(logits / temperature), the logits with a kept `tta` mode the mean over its views (tfl.tta); with a
    threshold, confident is top probability >= threshold."""
    import keras

    size = int(model.inputs[0].shape[1])
    limit = max_pixels()  # $TFL_MAX_PIXELS now: the export refuses larger images from their header, undecoded
    with tempfile.TemporaryDirectory() as scratch:
        labels_path = os.path.join(scratch, layout.LABELS_FILE)
        with open(labels_path, "w", encoding="utf-8") as f:
            f.write(labels)
        table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(tf.saved_model.Asset(labels_path), tf.int64,
                                          tf.lookup.TextFileIndex.LINE_NUMBER, tf.string,
                                          tf.lookup.TextFileIndex.WHOLE_LINE),
            default_value="")

        serve = layout.serving_outputs(model, temperature, threshold, tta)

        # One traced function behind both signatures: the model's graph is built and stored once.
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], autograph=False)
        def outputs(images):
            served = serve(images)
            served.pop(layout.LOGITS)  # the signatures predate raw logits; clients read probabilities
            _, classes = tf.math.top_k(served[layout.PROBABILITIES], k=top_k)
            return {**served, "classes": classes, "labels": table.lookup(tf.cast(classes, tf.int64))}

        def from_bytes(image_bytes):
            # Per image as the pipeline does for image folders: decode, resize, round to uint8; then batch as float.
            def decode(data):
                image = tf.io.decode_image(checked_bytes(data, limit), channels=3, expand_animations=False,
                                           dtype=tf.uint8)
                return resize_uint8(tf.ensure_shape(image, [None, None, 3]), size)

            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
            return outputs(tf.cast(images, tf.float32))

        def from_pixels(images):
            # As the pipeline does for fixed-size datasets: one float resize of the whole batch (exact at equal size).
            return outputs(to_model_input(images, size))

        # Variables are tracked from the endpoints. track(model) would also walk every layer in search of lookup
        # tables: seconds of work that finds none.
        archive = keras.export.ExportArchive()
        archive.track(table)
        archive.add_endpoint(SERVING_SIGNATURE, from_bytes, [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
        archive.add_endpoint(IMAGES_SIGNATURE, from_pixels,
                             [tf.TensorSpec([None, None, None, 3], tf.float32, name=IMAGES_INPUT)])
        archive.write_out(path, verbose=False)
