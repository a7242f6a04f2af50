"""Native ConvNeXt V2 and tf_EfficientNetV2 against timm's logits, their checkpoint mapping and config.json, and one
fine-tune that loads a timm checkpoint, caches a boundary and reloads its model.keras.

The fixtures (scripts/make_timm_fixtures_cnn.py, real timm 1.0.31) are reduced-width/depth models of each family's
topology with every weight random, saved by timm's save_for_hf (model.safetensors or pytorch_model.bin with a
config.json whose model_args rebuild them), and timm's eval-mode logits on a square and an odd non-square input.
"""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest

from tfl.backbones import convnext_v2, efficientnet_v2
from tfl.backbones.keras_layers import GlobalResponseNorm
from tfl.checkpoints.mappings import to_keras
from tfl.checkpoints.read import read_checkpoint
from tfl.checkpoints.restore import restore
from tfl.errors import UsageError
from tiny_runs import checkpoint_arrays

FIXTURES = "tests/fixtures/timm"
BUILD = {"convnextv2": convnext_v2.build_convnext_v2, "tf_efficientnetv2": efficientnet_v2.build_efficientnet_v2}
CASES = [  # (backbone, file): atto's MLP is 1x1 convs (conv_mlp), tiny's Linear layers, read from a torch pickle
    ("convnextv2_atto", "model.safetensors"),
    ("convnextv2_tiny", "pytorch_model.bin"),
    ("tf_efficientnetv2_b0", "model.safetensors"),
    ("tf_efficientnetv2_s", ""),  # the folder: its model.safetensors
]


@pytest.fixture(scope="module")
def reference():
    return np.load(f"{FIXTURES}/cnn_reference.npz")


def build(name, weights, include_top=True):
    return BUILD[name.rpartition("_")[0]](name, (None, None, 3), weights, include_top)


def relative_difference(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name,file", CASES, ids=[c[0] for c in CASES])
def test_logits_match_timm_on_square_and_odd_sizes(reference, name, file):
    model = build(name, f"{FIXTURES}/{name}/{file}".rstrip("/"))  # config.json beside it: reduced sizes, 10 classes
    for key in ("square", "odd"):
        out = model(reference[f"inputs_{key}"], training=False).numpy()
        ref = reference[f"{name}_logits_{key}"]
        assert out.shape == ref.shape == (2, 10)
        assert relative_difference(out, ref) <= 1e-4, key


def test_headless_restore_reports_every_tensor_and_skips_the_classifier():
    checkpoint = read_checkpoint(f"{FIXTURES}/tf_efficientnetv2_b0/model.safetensors")
    # The file's shapes (its config.json's model_args, which the builder reads only when given the file).
    model = efficientnet_v2.build_efficientnet_v2("tf_efficientnetv2_b0", (None, None, 3), None, False, 0.1, 0.3)
    report = restore(model, checkpoint, mapping="timm_efficientnet", classifier=("classifier",))
    assert not report.problems()
    counters = [k for k in checkpoint.tensors if k.endswith("num_batches_tracked")]
    assert len(report.loaded) + len(report.classifier_skipped) + len(counters) == len(checkpoint.tensors)
    assert len(report.loaded) == len(model.weights)
    assert sorted(name for name, _ in report.classifier_skipped) == ["classifier.bias (as classifier/bias)",
                                                                     "classifier.weight (as classifier/kernel)"]


def test_the_mlp_loads_from_linear_and_from_1x1_conv_layouts_alike():
    rng = np.random.default_rng(0)
    linear = rng.normal(size=(32, 8)).astype("float32")  # torch (out, in)
    state = {"stages.0.blocks.0.mlp.fc1.weight": linear, "stages.0.blocks.1.mlp.fc1.weight": linear[:, :, None, None],
             "stages.0.blocks.0.mlp.grn.weight": np.ones(32, "float32")}
    out = to_keras(state, "timm_convnext")
    np.testing.assert_array_equal(out["stages_0_blocks_0_mlp_fc1/kernel"], linear.T)
    np.testing.assert_array_equal(out["stages_0_blocks_1_mlp_fc1/kernel"], linear.T)
    assert "stages_0_blocks_0_mlp_grn/gamma" in out
    with pytest.raises(UsageError, match="not a 1x1 convolution"):
        to_keras({"stages.0.blocks.0.mlp.fc1.weight": np.zeros((4, 4, 3, 3), "float32")}, "timm_convnext")


def test_global_response_norm_is_timms_formula_and_round_trips_its_config():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 4)).astype("float32")
    layer = GlobalResponseNorm(epsilon=1e-6)
    layer.build(x.shape)
    gamma, beta = rng.normal(size=4).astype("float32"), rng.normal(size=4).astype("float32")
    layer.set_weights([gamma, beta])
    g = np.sqrt((x ** 2).sum(axis=(1, 2), keepdims=True))
    expected = x + beta + gamma * x * (g / (g.mean(axis=-1, keepdims=True) + 1e-6))
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    clone = GlobalResponseNorm.from_config(layer.get_config())
    assert clone.epsilon == 1e-6


def test_config_json_of_another_architecture_is_refused_naming_it(tmp_path):
    for file in ("model.safetensors", "config.json"):
        shutil.copy(f"{FIXTURES}/convnextv2_tiny/config.json" if file == "config.json"
                    else f"{FIXTURES}/convnextv2_atto/{file}", tmp_path / file)
    with pytest.raises(UsageError, match="architecture 'convnextv2_tiny', not 'convnextv2_atto'.*--backbone convnextv2_tiny"):
        build("convnextv2_atto", str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architecture="convnextv2_atto", model_args={**config["model_args"], "stem_type": "overlap"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="sets model_args stem_type"):
        build("convnextv2_atto", str(tmp_path / "model.safetensors"))
    with pytest.raises(UsageError, match="no built-in download; pass --weights hf://ORG/NAME .*--weights PATH"):
        build("tf_efficientnetv2_s", "imagenet")


def test_finetune_from_a_timm_checkpoint_caches_the_boundary_keeps_frozen_stages_and_reloads(tmp_path, data_8_a_class):
    from tfl.recipes.finetune import FinetuneOptions, finetune
    from tfl.training.rundir import RunDir

    weights = f"{FIXTURES}/convnextv2_atto/model.safetensors"
    lines = []
    options = FinetuneOptions(backbone="convnextv2_atto", weights=weights, dataset=data_8_a_class, image_size=32, batch_size=8,
                              head_epochs=0, epochs=1, lr=0.01, backbone_lr=0.01, freeze_up_to="block2", cache="on",
                              output_dir=str(tmp_path / "run"))
    finetune(options, log=lines.append)
    assert any("stages_1_blocks_0_add activations of train" in line for line in lines), lines

    model = RunDir(str(tmp_path / "run"), create=False).load_model()  # GlobalResponseNorm is a trusted layer
    file = to_keras(read_checkpoint(weights).tensors, "timm_convnext")
    # The fine-tune epoch's checkpoint holds model.variables in order.
    after = checkpoint_arrays(tmp_path / "run", 1)
    backbone = {v.path: after[f"model.{i:05d}"] for i, v in enumerate(model.variables)}
    frozen = [n for n in file if n.startswith(("stem_", "stages_0_", "stages_1_"))]
    trained = [n for n in file if n.startswith("stages_3_")]
    assert frozen and trained
    for name in frozen:  # loaded from the file and frozen: unchanged
        np.testing.assert_array_equal(backbone[name], file[name], err_msg=name)
    assert any(not np.array_equal(backbone[name], file[name]) for name in trained)  # block4 trained
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype("float32")
    assert np.isfinite(model(x, training=False).numpy()).all()
    keras.backend.clear_session()
