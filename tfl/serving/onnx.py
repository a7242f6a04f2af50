"""ONNX export: image float32 [N, S, S, 3] (0-255 RGB at the model's input size, any N) in; logits, probabilities
and, with an abstain threshold, confident out.

Outputs: logits float32 [N, C] (raw, before the temperature), probabilities float32 [N, C] (softmax(logits / T) of
a calibrated run, softmax(logits) otherwise) and confident bool [N] (top probability >= the threshold of
`tfl calibrate --abstain`). The version directory holds model.onnx, labels.txt (line i = class i) and, for a
calibrated run, calibration.json. The graph is tfl.serving.layout.serving_outputs, converted by tf2onnx; tf2onnx and
onnx are the optional extra `tfl[onnx]` (the converter is needed where a model is exported, not where it is served,
which only needs an ONNX runtime).
"""

from __future__ import annotations

import importlib.util
import logging

from tfl.errors import Unavailable
from tfl.serving import layout
from tfl.training import rundir

MODEL_FILE = "model.onnx"
INPUT = "image"
# ONNX opset 15: tf2onnx 1.17's preferred one, which every onnxruntime since 1.10 (2021) runs.
OPSET = 15
EXTRA = "pip install 'tfl[onnx]'"


def export_onnx(run_path: str, output: str | None = None, version: int | None = None, log=print) -> str:
    """Export a run's best model to OUTPUT/<version>/ (default saved_models/<run name>-onnx/<next>/); returns it."""
    check_converter()
    run = rundir.RunDir(run_path, create=False)
    labels = layout.labels_text(run.read_classes())
    # Its own default base, as TFLite's: TF Serving would try to load it among SavedModel versions.
    path = layout.version_dir(output or layout.default_base(run_path, "-onnx"), version)
    model, class_names = run.load()
    threshold = run.threshold()
    serialized = convert(model, run.temperature(), threshold, run.tta())

    layout.write_file_version(path, run, labels, MODEL_FILE, serialized, log)
    outputs = "logits, probabilities" + (", confident" if threshold is not None else "")
    log(f"exported ONNX ({len(serialized) / 2**20:.1f} MiB, {len(class_names)} classes, {model.inputs[0].shape[1]}px, "
        f"outputs {outputs}{layout.describe_temperature(run)}) to {path}")
    return path


def check_converter() -> None:
    """Refuse, before any work, when the converter (the extra tfl[onnx]) is not installed."""
    missing = [name for name in ("tf2onnx", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        which = "which is" if len(missing) == 1 else "which are"
        raise Unavailable(f"--format onnx needs {' and '.join(missing)}, {which} not installed; install the extra: "
                          f"{EXTRA}")


def convert(model, temperature: float = 1.0, threshold: float | None = None, tta: str | None = None) -> bytes:
    """The serialized ONNX model of `model`'s serving graph (layout.serving_outputs), batch dimension dynamic."""
    check_converter()
    import onnx
    import tensorflow as tf
    import tf2onnx

    size = int(model.inputs[0].shape[1])
    spec = [tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT)]
    # The dict's keys become the ONNX output names (tf2onnx renames a function's outputs after its structure).
    function = tf.function(layout.serving_outputs(model, temperature, threshold, tta), input_signature=spec,
                           autograph=False)
    converter_log = logging.getLogger("tf2onnx")
    level = converter_log.level
    converter_log.setLevel(logging.ERROR)  # its INFO lines narrate every optimizer pass
    try:
        proto, _ = tf2onnx.convert.from_function(function, spec, opset=OPSET)
    finally:
        converter_log.setLevel(level)
    try:
        # tf2onnx keeps going past an op it cannot convert, leaving the TensorFlow op in the graph; the checker
        # refuses such a node (no schema in the ONNX domain), so a broken file is never written.
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise Unavailable(f"tf2onnx could not convert this model to ONNX ({str(err).splitlines()[0]}); export it "
                          "with --format saved_model or tflite instead") from None
    return proto.SerializeToString()
