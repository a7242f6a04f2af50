"""tfl's ViT / DeiT / DINOv2 against timm: logits on the reduced checkpoints scripts/make_timm_fixtures.py wrote
(tests/fixtures/timm/vit_*: model.safetensors, timm's config.json, timm's logits at the native size and at other
sizes, non-square ones among them), the strict restore, the Hub cache path, and one tiny fine-tune that caches the
token sequence at a block boundary and exports SavedModel + TFLite."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfl import freezing, models
from tfl.backbones import registry, vit
from tfl.backbones.vit_layers import bicubic_matrix
from tfl.checkpoints.read import read_checkpoint
from tfl.checkpoints.restore import restore
from tfl.errors import UsageError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "timm"
# fixture folder -> (the registered name its config.json's architecture is, the input sizes checked here). The
# fixtures hold more sizes (scripts/make_timm_fixtures.py); these cover the native grid, a non-square grid grown
# from it (2x2 -> 3x2, 2x3) and one shrunk from it (DINOv2's native 4x4 -> 3x2, as 518 px -> 224 px), per family.
CASES = {"vit_small": ("vit_small_patch16_224", ["32x32", "48x32"]),
         "vit_tiny_avg": ("vit_tiny_patch16_224", ["32x48"]),
         "vit_dinov2": ("vit_small_patch14_dinov2", ["42x28"]),
         "vit_dinov2_reg4": ("vit_small_patch14_reg4_dinov2", ["28x42"])}


@pytest.mark.parametrize("folder", sorted(CASES))
def test_logits_equal_timms_and_the_restore_report_lists_every_tensor(folder):
    path = str(FIXTURES / folder / "model.safetensors")
    checkpoint = read_checkpoint(path)
    reference = np.load(FIXTURES / folder / "reference.npz")
    name, sizes = CASES[folder]
    config = vit.config_for(name, path)  # timm's config.json beside the file: width 16, 2 heads, native size
    for size in sizes:
        x, expected = reference[f"x_{size}"], reference[f"logits_{size}"]
        model = vit.build_vit(name, input_shape=x.shape[1:], include_top=True, config=config)
        report = restore(model, checkpoint, mapping=vit.CHECKPOINT_MAPPING, classifier=vit.CLASSIFIER)
        assert sorted(source for _, source in report.loaded) == sorted(checkpoint.tensors)
        assert not report.problems() and not report.classifier_skipped
        logits = keras.ops.convert_to_numpy(model(x, training=False))
        assert np.abs(logits - expected).max() / np.abs(expected).max() <= 1e-4, (folder, size)
    loaded = dict(report.loaded)
    assert loaded["tokens/pos_embed"] == "pos_embed" and loaded["blocks_11_mlp_fc2/kernel"] == "blocks.11.mlp.fc2.weight"
    if "reg4" in folder:
        assert loaded["tokens/reg_token"] == "reg_token" and loaded["blocks_11_ls2/gamma"] == "blocks.11.ls2.gamma"
    keras.backend.clear_session()


def test_bicubic_matrix_keeps_constants_and_is_the_identity_at_the_same_size():
    for old, new in ((37, 16), (2, 3), (4, 2), (14, 14)):
        for antialias in (True, False):
            matrix = bicubic_matrix(old, new, antialias)
            np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(bicubic_matrix(5, 5), np.eye(5), atol=1e-12)
    # Doubling 2 -> 4, output 1 samples the input at 0.25. torch without antialias: taps -1..2 of its a=-0.75 kernel,
    # clamped at the border (k(1.25) + k(0.25), k(0.75) + k(1.75)); with antialias: a=-0.5, two taps, normalised.
    np.testing.assert_allclose(bicubic_matrix(2, 4, antialias=False)[1], [0.7734375, 0.2265625], atol=1e-12)
    np.testing.assert_allclose(bicubic_matrix(2, 4)[1], np.array([0.8671875, 0.2265625]) / 1.09375, atol=1e-12)


def test_config_json_beside_the_weights_decides_width_and_refuses_what_does_not_fit(tmp_path):
    cfg = vit.config_for("vit_small_patch16_224", str(FIXTURES / "vit_small" / "model.safetensors"))
    assert (cfg.embed_dim, cfg.num_heads, cfg.img_size, cfg.depth) == (16, 2, 32, 12)
    config = json.loads((FIXTURES / "vit_dinov2" / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"")
    for change, message in (({"architecture": "vit_base_patch16_224"}, "pass --backbone vit_base_patch16_224"),
                            ({"model_args": {**config["model_args"], "depth": 4}}, "depth 4"),
                            ({"model_args": {**config["model_args"], "qk_norm": True}}, "qk_norm")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UsageError, match=message):
            vit.config_for("vit_small_patch14_dinov2", str(tmp_path / "model.safetensors"))
    # DINOv2's mean/std are not the augreg ViT's
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "vit_small_patch16_224"}))
    with pytest.raises(UsageError, match=r"trained with mean .* \(e.g. deit_"):
        vit.config_for("vit_small_patch16_224", str(tmp_path / "model.safetensors"))


def test_freeze_regexes_name_timm_blocks():
    spec = registry.get("vit_base_patch16_224")
    with keras.StatelessScope(initialize_variables=False):
        model = models.build_classifier(spec.name, 3, 32, "none")
    plan = freezing.make_plan(spec, model, None, rules=[("freeze", r".*"), ("unfreeze", r"blocks_1[01]_.*")])
    trainable = {layer.name for layer in plan.layers if not layer.frozen and layer.params}
    assert trainable == {f"blocks_{b}_{part}" for b in (10, 11)
                         for part in ("norm1", "attn_qkv", "attn_proj", "norm2", "mlp_fc1", "mlp_fc2")}
    assert [s.doc for s in spec.stages][1] == "transformer blocks 0-2 (3 blocks)"
    keras.backend.clear_session()


HUB_SCRIPT = """
import sys
from tfl.backbones.vit import weights_file
from tfl.backbones.errors import WeightsUnavailableError
print(weights_file("vit_small_patch16_224", "hf://tfl-test/vit-fixture"))
from tfl.backbones.convnext_v2 import build_convnext_v2  # the timm CNNs take hf:// the same way
print(build_convnext_v2("convnextv2_atto", (48, 48, 3), "hf://tfl-test/convnext-fixture").count_params())
try:
    weights_file("vit_small_patch16_224", "hf://tfl-test/not-cached")
except WeightsUnavailableError as err:
    print("ERROR", err)
"""


def test_hf_weights_load_from_the_hub_cache_offline_and_fail_at_once_when_not_cached(tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    for fixture, name in (("vit_small", "vit-fixture"), ("convnextv2_atto", "convnext-fixture")):
        cached = tmp_path / "hub" / f"models--tfl-test--{name}"
        (cached / "snapshots" / revision).mkdir(parents=True)
        for file_name in ("model.safetensors", "config.json"):
            shutil.copy(FIXTURES / fixture / file_name, cached / "snapshots" / revision / file_name)
        (cached / "refs").mkdir()
        (cached / "refs" / "main").write_text(revision)
    snapshot = tmp_path / "hub" / "models--tfl-test--vit-fixture" / "snapshots" / revision
    # Child processes: huggingface_hub reads HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT when it is imported. Offline
    # mode, and a Hub that refuses connections (a closed local port) without it: both load from the cache at once.
    base = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT)}
    base.pop("HF_HUB_OFFLINE", None)
    for env, hub in (({**base, "HF_HUB_OFFLINE": "1"}, "https://huggingface.co"),
                     ({**base, "HF_ENDPOINT": "http://127.0.0.1:9"}, "http://127.0.0.1:9")):
        out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        found, params, error = out.stdout.strip().split("\n", 2)
        assert pathlib.Path(found) == snapshot / "model.safetensors"
        assert int(params) > 0  # built and strictly restored from the cached convnextv2_atto checkpoint
        assert f"{hub}/tfl-test/not-cached is not reachable" in error and "--weights PATH" in error
        assert "Retrying" not in out.stderr  # no backoff against an unreachable host


def test_a_path_that_is_not_there_names_every_alternative(tmp_path):
    folder = FIXTURES / "vit_small"  # a repository's folder stands for its weights file
    assert vit.weights_file("vit_small_patch16_224", str(folder)) == str(folder / "model.safetensors")
    with pytest.raises(UsageError, match="is a directory without model.safetensors or pytorch_model.bin"):
        vit.weights_file("vit_small_patch16_224", str(tmp_path))
    with pytest.raises(UsageError, match=r"no such file. Pass 'lvd142m' \(timm's hf://timm/vit_small_patch14_dinov2"):
        vit.weights_file("vit_small_patch14_dinov2", str(tmp_path / "missing.safetensors"))
    with pytest.raises(UsageError, match="expected hf://ORG/NAME"):
        vit.weights_file("vit_small_patch14_dinov2", "hf://no-name")


def test_finetune_caches_tokens_at_the_boundary_and_exports_agree_with_keras(data, tmp_path, monkeypatch):
    import tfl
    from tfl.training import rundir

    monkeypatch.chdir(tmp_path)
    weights = str(FIXTURES / "vit_small" / "model.safetensors")
    result = tfl.finetune(dataset=data, backbone="vit_small_patch16_224", weights=weights, image_size=32,
                          head_epochs=0, epochs=1, freeze_up_to="block3", batch_size=8, val_split=0.25,
                          output_dir=str(tmp_path / "run"), export=True)
    run = rundir.RunDir(result.metrics["run_dir"])
    assert json.loads(pathlib.Path(run.file("freeze_plan.json")).read_text())["freeze_up_to"] == "block3"
    model = run.load_model()  # model.keras: tfl's ViT layers are trusted classes (tfl.trusted_layers)
    assert freezing.make_plan(registry.get("vit_small_patch16_224"), model, "block3").boundary() == "blocks_8_add2"
    # The cache holds the token sequence at the boundary: class token + 2x2 patches, width 16, for 24 train images.
    manifests = [json.loads(p.read_text()) for p in pathlib.Path(os.environ["TFL_CACHE_DIR"]).glob("*/manifest.json")]
    shapes = [m["shape"] for m in manifests if m["key"].get("boundary") == "blocks_8_add2"]
    assert [24, 5, 16] in shapes
    images = np.random.RandomState(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = tf.nn.softmax(model(images, training=False), axis=-1).numpy()

    served = tf.saved_model.load(os.path.join(tmp_path, result.metrics["export_dir"])).signatures
    np.testing.assert_allclose(served["predict_images"](images=tf.constant(images))["probabilities"].numpy(),
                               expected, atol=1e-5)
    tflite = tfl.export(run.path, "tflite", log=lambda *_: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=os.path.join(tflite, "model.tflite"))
    probabilities = interpreter.get_signature_runner("serving_default")(image=images)["probabilities"]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    keras.backend.clear_session()
