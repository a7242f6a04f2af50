"""The export commands as a user drives them: finetune --export, tfl export, predict --saved-model, exit codes.

One tiny run made by `finetune --export` in a scratch working directory (so the default saved_models/ lands
there) serves every test; the TFLite conversion runs once, for int8 (float32 and float16: tests/test_export.py), and
the ONNX one once (the rest of ONNX: tests/test_export_onnx.py).
"""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from tfl.cli import cli
from test_export import SIZE, evaluation_pixels, keras_probabilities, make_shapes, probe_files, tflite_probabilities
from tfl.training.rundir import RunDir

RUN_NAME = "shapes-run"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_export")
    data = make_shapes(root / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = invoke("finetune", "--dataset", data, "--image-size", SIZE, "--head-epochs", 2, "--epochs", 0,
                        "--batch-size", 6, "--val-split", 0.25, "--lr", 0.02,
                        "--output-dir", root / "runs" / RUN_NAME, "--export")
    assert result.exit_code == 0, result.output
    return root


def test_finetune_export_writes_version_1_named_after_the_run(workdir):
    version = workdir / "saved_models" / RUN_NAME / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "assets" / "labels.txt").read_text(encoding="utf-8") == "disc\nsquare\nstripes\n"
    assert os.listdir(workdir / "saved_models" / RUN_NAME) == ["1"]
    assert json.loads((workdir / "runs" / RUN_NAME / "config.json").read_text())["export"] is True


def test_predict_saved_model_serves_like_predict_run(workdir):
    files = probe_files(workdir / "runs" / RUN_NAME)
    served = invoke("predict", "--saved-model", workdir / "saved_models" / RUN_NAME, "--json", *files)
    assert served.exit_code == 0, served.output
    direct = invoke("predict", "--run", workdir / "runs" / RUN_NAME, "--json", *files)
    assert direct.exit_code == 0, direct.output
    served, direct = json.loads(served.stdout), json.loads(direct.stdout)
    assert [r["image"] for r in served] == [str(f) for f in files]
    for s, d in zip(served, direct):
        assert set(s["top"][0]) == {"index", "label", "prob"} and len(s["top"]) == 3
        assert [t["label"] for t in s["top"]] == [t["label"] for t in d["top"]]
        # Both decode and resize exactly as evaluation does (uint8-rounded resize), so only float noise differs.
        assert [t["prob"] for t in s["top"]] == pytest.approx([t["prob"] for t in d["top"]], abs=1e-5)

    text = invoke("predict", "--saved-model", workdir / "saved_models" / RUN_NAME / "1", "--top-k", 1, files[0])
    assert text.exit_code == 0
    assert text.stdout.splitlines()[0] == str(files[0])
    top = served[0]["top"][0]
    assert text.stdout.splitlines()[1].strip().endswith(f"{top['label']}  ({top['index']})")
    assert len(text.stdout.splitlines()) == 2


def test_export_tflite_int8_from_the_command_line(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    result = invoke("export", "--run", workdir / "runs" / RUN_NAME, "--format", "tflite", "--tflite-mode", "int8",
                    "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out == {"path": os.path.join("saved_models", f"{RUN_NAME}-tflite-int8", "1"), "format": "tflite"}
    assert sorted(os.listdir(out["path"])) == ["labels.txt", "model.tflite"]
    model = RunDir(str(workdir / "runs" / RUN_NAME), create=False).load_model()
    images = evaluation_pixels(probe_files(workdir / "runs" / RUN_NAME))
    expected = keras_probabilities(model, images)
    probs = tflite_probabilities(os.path.join(out["path"], "model.tflite"), images)
    # Dynamic-range int8, measured on 38 images of such a run: max |dp| 0.043, top-1 agreement 100%.
    assert (probs.argmax(1) == expected.argmax(1)).mean() >= 0.85
    np.testing.assert_allclose(probs, expected, atol=0.15)


def test_export_onnx_from_the_command_line_matches_keras(workdir, monkeypatch):
    import onnxruntime

    monkeypatch.chdir(workdir)
    result = invoke("export", "--run", workdir / "runs" / RUN_NAME, "--format", "onnx", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out == {"path": os.path.join("saved_models", f"{RUN_NAME}-onnx", "1"), "format": "onnx"}
    assert sorted(os.listdir(out["path"])) == ["labels.txt", "model.onnx"]
    model = RunDir(str(workdir / "runs" / RUN_NAME), create=False).load_model()
    images = evaluation_pixels(probe_files(workdir / "shapes"))  # workdir/shapes/test's PNGs and the two photos
    session = onnxruntime.InferenceSession(os.path.join(out["path"], "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (probs,) = session.run(["probabilities"], {"image": images})
    expected = keras_probabilities(model, images)
    # The bound; measured on these 14 images of this trained run: 1.0e-6
    # (`pytest -s tests/test_cli_export.py -k onnx` prints it).
    print(f"max |p_onnx - p_keras| on {len(images)} images of a trained run = {np.abs(probs - expected).max():.1e}")
    np.testing.assert_allclose(probs, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("args,needle", [
    (["export", "--run", "{run}", "--output", "{base}", "--version", "1"], "shapes-run/1 already exists"),
    (["export", "--run", "{run}", "--version", "0"], "Invalid value for '--version'"),
    (["export", "--run", "{run}", "--tflite-mode", "int8"], "--tflite-mode only applies to --format tflite"),
    (["export", "--run", "{run}", "--format", "tflite", "--top-k", "3"], "--top-k only applies to --format saved_model"),
    (["export", "--run", "{root}/nope"], "no such run directory"),
    (["predict", "--run", "{run}", "--saved-model", "{base}", "{image}"], "exactly one of --run DIR"),
    (["predict", "--saved-model", "{run}", "{image}"], "no saved_model.pb there"),
    (["predict", "--saved-model", "{base}", "{root}/notes.jpg"], "notes.jpg: the export cannot decode it"),
])
def test_usage_errors_exit_2_with_one_clear_line(workdir, args, needle):
    (workdir / "notes.jpg").write_text("not an image")
    paths = {"root": workdir, "run": workdir / "runs" / RUN_NAME, "base": workdir / "saved_models" / RUN_NAME,
             "image": workdir / "shapes" / "test" / "disc" / "0.png"}
    result = invoke(*(a.format(**paths) for a in args))
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
