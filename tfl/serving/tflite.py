"""TFLite export: image float32 [N, S, S, 3] (0-255 RGB at the model's input size) in, probabilities out.

Modes: float32 (as trained), float16 (weights stored as float16, half the size) and int8 (dynamic-range
quantization: int8 weights, activations quantized on the fly; a quarter of the size, no calibration data).
The version directory holds model.tflite and labels.txt (line i = class i); for a calibrated run (calibration.json)
the probabilities are softmax(logits / T) inside the flatbuffer, and calibration.json beside it records T; a run
with an abstain threshold (tfl calibrate --abstain) gets a second output, confident bool [N]; with TTA kept on val
(tfl calibrate --tta) the logits are the mean over the views (tfl.tta) inside the flatbuffer too.
"""

from __future__ import annotations

import tempfile

import tensorflow as tf

from tfl.errors import UsageError
from tfl.serving import layout
from tfl.training import rundir

from tfl.options import TFLITE_MODES as MODES
MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"
INPUT = "image"


def export_tflite(run_path: str, output: str | None = None, version: int | None = None, mode: str = "float32",
                  log=print) -> str:
    """Export a run's best model to OUTPUT/<version>/ (default saved_models/<run name>-tflite-<mode>/<next>/)."""
    check_mode(mode)
    run = rundir.RunDir(run_path, create=False)
    labels = layout.labels_text(run.read_classes())
    # Its own default base: TF Serving would try to load a TFLite version dir found among SavedModel versions.
    path = layout.version_dir(output or layout.default_base(run_path, f"-tflite-{mode}"), version)
    model, _ = run.load()
    flatbuffer = convert(model, mode, run.temperature(), run.threshold(), run.tta())

    layout.write_file_version(path, run, labels, MODEL_FILE, flatbuffer, log)
    log(f"exported TFLite {mode} ({len(flatbuffer) / 2**20:.1f} MiB, {model.inputs[0].shape[1]}px"
        f"{layout.describe_temperature(run)}) to {path}")
    return path


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError(f"--tflite-mode {mode!r}: choose one of {', '.join(MODES)}")


def convert(model, mode: str, temperature: float = 1.0, threshold: float | None = None,
            tta: str | None = None) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        write_probabilities_model(model, scratch, temperature, threshold, tta)
        return convert_saved_model(scratch, mode)


def write_probabilities_model(model, path: str, temperature: float = 1.0, threshold: float | None = None,
                              tta: str | None = None) -> None:
    """The graph TFLite gets, as a SavedModel: serving_default, image [N, S, S, 3] -> probabilities
    (softmax(logits / temperature); with a kept `tta` mode the logits are the mean over its views, tfl.tta), and
    with a threshold confident (bool [N], top probability >= threshold).

    Through a SavedModel because from_concrete_functions leaves Keras 3 variables unfrozen and uninitialised
    (NaN outputs, a 200 KB file, measured on TF 2.21); from_saved_model folds them into constants.
    """
    import keras

    size = int(model.inputs[0].shape[1])
    serve = layout.serving_outputs(model, temperature, threshold, tta)

    def probabilities(image):
        served = serve(image)
        served.pop(layout.LOGITS)  # one output fewer for TFLite clients, who read probabilities
        return served

    archive = keras.export.ExportArchive()  # variables are tracked from the endpoint; the model holds no tables
    archive.add_endpoint(SIGNATURE, probabilities, [tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT)])
    archive.write_out(path, verbose=False)


def convert_saved_model(path: str, mode: str) -> bytes:
    """A SavedModel written by write_probabilities_model -> TFLite flatbuffer in `mode`."""
    check_mode(mode)
    converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=[SIGNATURE])
    if mode in ("float16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()
