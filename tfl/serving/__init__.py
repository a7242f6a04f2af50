"""Export a run for serving: a SavedModel for TF Serving (`saved_model`), a TFLite flatbuffer (`tflite`) or an ONNX
model (`onnx`), each computing tfl.serving.layout.serving_outputs.

All go to BASE/<integer version>/ (see tfl.serving.layout). Imports are lazy so `import tfl.serving` does not
pay for TensorFlow.
"""

from __future__ import annotations

from tfl.errors import UsageError
from tfl.options import EXPORT_FORMATS as FORMATS


def export_run(run_path: str, format: str = "saved_model", output: str | None = None, version: int | None = None,
               top_k: int | None = None, tflite_mode: str | None = None, log=print) -> str:
    """Export in `format`; options that only one format has are refused for the other. Returns the version dir."""
    if format != "tflite" and tflite_mode is not None:
        raise UsageError("--tflite-mode only applies to --format tflite")
    if format != "saved_model" and top_k is not None:
        raise UsageError("--top-k only applies to --format saved_model (a TFLite or ONNX export outputs every "
                         "probability)")
    if format == "saved_model":
        from tfl.serving.saved_model import DEFAULT_TOP_K, export_saved_model

        return export_saved_model(run_path, output, version, DEFAULT_TOP_K if top_k is None else top_k, log)
    if format == "tflite":
        from tfl.serving.tflite import export_tflite

        return export_tflite(run_path, output, version, tflite_mode or "float32", log)
    if format == "onnx":
        from tfl.serving.onnx import export_onnx

        return export_onnx(run_path, output, version, log)
    raise UsageError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
