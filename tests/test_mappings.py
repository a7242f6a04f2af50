"""Family mappings: names, layout transposes, ignore rules; and the strict all-or-nothing assign."""

from __future__ import annotations

import numpy as np
import pytest

from tfl.backbones import efficientnet_lite as lite
from tfl.checkpoints import mappings
from tfl.checkpoints.restore import RestoreError, restore
from tfl.checkpoints.torch_pickle import read_torch_state_dict


def arange(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def test_torchvision_resnet_names_and_layouts():
    state = {
        "conv1.weight": arange(8, 3, 7, 5),  # OIHW
        "bn1.weight": arange(8),
        "bn1.bias": arange(8) + 1,
        "bn1.running_mean": arange(8) + 2,
        "bn1.running_var": arange(8) + 3,
        "bn1.num_batches_tracked": np.array(7, np.int64),
        "layer2.0.downsample.0.weight": arange(16, 8, 1, 1),
        "layer2.0.downsample.1.running_var": arange(16),
        "layer2.0.downsample.1.num_batches_tracked": np.array(7, np.int64),
        "layer3.1.bn2.bias": arange(32),
        "fc.weight": arange(10, 32),  # (out, in)
        "fc.bias": arange(10),
    }
    sources = {}
    out = mappings.to_keras(state, "torchvision_resnet", sources)
    assert sorted(out) == sorted([
        "conv1/kernel", "bn1/gamma", "bn1/beta", "bn1/moving_mean", "bn1/moving_variance",
        "layer2_0_downsample_0/kernel", "layer2_0_downsample_1/moving_variance", "layer3_1_bn2/beta",
        "fc/kernel", "fc/bias",
    ])  # fmt: skip
    kernel = out["conv1/kernel"]
    assert kernel.shape == (7, 5, 3, 8)  # HWIO
    assert kernel[6, 4, 2, 5] == state["conv1.weight"][5, 2, 6, 4]
    np.testing.assert_array_equal(out["fc/kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(out["bn1/moving_variance"], state["bn1.running_var"])
    np.testing.assert_array_equal(out["bn1/beta"], state["bn1.bias"])
    assert sources["layer2_0_downsample_0/kernel"] == "layer2.0.downsample.0.weight"


def test_unknown_keys_keep_their_raw_name_and_only_ignored_keys_are_dropped():
    state = {"layer1.0.conv1.weight": arange(4, 4, 3, 3), "head.weight": arange(3), "layer1.0.se.fc1.bias": arange(2),
             "num_batches_tracked": np.array(1)}  # fmt: skip
    out = mappings.to_keras(state, "torchvision_resnet")
    assert sorted(out) == ["head.weight", "layer1.0.se.fc1.bias", "layer1_0_conv1/kernel"]
    np.testing.assert_array_equal(out["head.weight"], state["head.weight"])


def test_timm_resnet_uses_torchvision_names():
    state = {"layer4.1.conv2.weight": arange(2, 2, 3, 3), "fc.bias": arange(5)}
    assert sorted(mappings.to_keras(state, "timm_resnet")) == sorted(mappings.to_keras(state, "torchvision_resnet"))


def test_lukemelas_blocks_are_named_by_group_and_letter_and_depthwise_is_transposed():
    def block(i: int, width: int, expand: bool = True) -> dict:
        keys = {
            f"_blocks.{i}._depthwise_conv.weight": arange(6, 1, 3, 5),
            f"_blocks.{i}._project_conv.weight": arange(width, 6, 1, 1),
        }
        if expand:
            keys[f"_blocks.{i}._expand_conv.weight"] = arange(6, 4, 1, 1)
        return keys

    state = {**block(0, 16, expand=False), **block(1, 24), **block(2, 24), **block(3, 40), "_bn1.weight": arange(3),
             "_fc.weight": arange(10, 3)}  # fmt: skip
    out = mappings.to_keras(state, "lukemelas_efficientnet")
    assert sorted(out) == sorted([
        "block1a_dwconv/kernel", "block1a_project_conv/kernel",
        "block2a_dwconv/kernel", "block2a_project_conv/kernel", "block2a_expand_conv/kernel",
        "block2b_dwconv/kernel", "block2b_project_conv/kernel", "block2b_expand_conv/kernel",
        "block3a_dwconv/kernel", "block3a_project_conv/kernel", "block3a_expand_conv/kernel",
        "top_bn/gamma", "predictions/kernel",
    ])  # fmt: skip
    dw = out["block2b_dwconv/kernel"]
    assert dw.shape == (3, 5, 6, 1)  # (C, 1, kH, kW) -> (kH, kW, C, 1)
    assert dw[2, 4, 5, 0] == state["_blocks.2._depthwise_conv.weight"][5, 0, 2, 4]


def test_lite0_package_file_maps_onto_every_weight_of_the_keras_model():
    state = read_torch_state_dict(lite.weights_file("efficientnet_lite0", "imagenet"))
    out = mappings.to_keras(state, "lukemelas_efficientnet")
    model = lite.build_lite("efficientnet_lite0", include_top=True)
    assert {name: value.shape for name, value in out.items()} == {w.path: tuple(w.shape) for w in model.weights}
    ignored = [k for k in state if k.endswith("num_batches_tracked")]
    assert ignored and len(out) == len(state) - len(ignored)


def test_two_keys_mapping_to_one_name_are_refused():
    with pytest.raises(ValueError, match="'fc.weight' and 'fc/kernel' both map to 'fc/kernel'"):
        mappings.to_keras({"fc.weight": arange(2, 2), "fc/kernel": arange(2, 2)}, "torchvision_resnet")


def test_unknown_mapping_lists_the_known_ones():
    known = ", ".join(sorted(mappings.MAPPINGS))  # families append mappings: the message lists all of them
    assert {"lukemelas_efficientnet", "timm_resnet", "torchvision_resnet"} <= set(mappings.MAPPINGS)
    with pytest.raises(ValueError, match=f"unknown checkpoint mapping 'torchvision'.*{known}"):
        mappings.get_mapping("torchvision")


# --- restore through a mapping ------------------------------------------------------------------------------------------------------


def _tiny_model():
    import keras

    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, use_bias=False, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="tiny")


def _tiny_state() -> dict:
    return {"conv1.weight": arange(3, 2, 3, 3), "bn1.weight": arange(3), "bn1.bias": arange(3),
            "bn1.running_mean": arange(3), "bn1.running_var": arange(3) + 1}  # fmt: skip


def test_a_mapped_state_fills_every_weight_and_only_an_absent_classifier_is_skipped():
    model = _tiny_model()
    with_fc = {**_tiny_state(), "fc.weight": arange(4, 3)}
    report = restore(model, with_fc, mapping="torchvision_resnet", classifier=("fc",))
    assert sorted(t for t, _ in report.loaded) == sorted(w.path for w in model.weights)
    assert [name for name, _ in report.classifier_skipped] == ["fc.weight (as fc/kernel)"]
    np.testing.assert_array_equal(model.get_layer("conv1").kernel.numpy(), arange(3, 2, 3, 3).transpose(2, 3, 1, 0))
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(RestoreError, match=r"unexpected in source: fc\.weight \(as fc/kernel\)"):
        restore(model, {**with_fc, "conv1.weight": arange(3, 2, 3, 3) + 1}, mapping="torchvision_resnet")
    for old, w in zip(before, model.weights):  # all or nothing: conv1 was not overwritten either
        np.testing.assert_array_equal(old, w.numpy())
