"""Native torchvision ResNet18/34 against real torch logits, its stages, strict loading and the offline download.

The fixtures (scripts/make_resnet_fixtures.py, real torch) are narrow networks with torchvision's exact
topology and module names, saved by torch.save in both layouts, with torch's logits on odd input sizes.
"""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest
from safetensors.numpy import save_file

from tfl import freezing, models
from tfl.backbones import registry, resnet
from tfl.backbones.errors import WeightsUnavailableError
from tfl.backbones.spec import Preprocessing
from tfl.checkpoints.torch_pickle import read_torch_state_dict

FIXTURES = "tests/fixtures"
NARROW = {"resnet18": (4, 8, 16, 32), "resnet34": (2, 4, 8, 16)}  # the fixtures' widths; 10 classes


@pytest.fixture(scope="module")
def reference():
    return np.load(f"{FIXTURES}/resnet_narrow_reference.npz")


def narrow(name: str, weights=None, include_top=True, input_shape=(None, None, 3)):
    return resnet.build_resnet(name, input_shape, weights, include_top, widths=NARROW[name], num_classes=10)


def relative_difference(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(
    "name,file",
    [
        ("resnet18", "resnet18_narrow.pth"),
        ("resnet18", "resnet18_narrow_legacy.pth"),
        ("resnet34", "resnet34_narrow.pth"),
    ],
)
def test_logits_match_torch_on_odd_sizes(reference, name, file):
    model = narrow(name, f"{FIXTURES}/{file}")
    for key in ("a", "b"):
        x, ref = reference[f"inputs_{key}"], reference[f"{name}_logits_{key}"]
        out = model(x, training=False).numpy()
        assert out.shape == ref.shape
        assert relative_difference(out, ref) < 1e-4, (file, key)


def test_safetensors_file_loads_like_the_pth(reference, tmp_path):
    state = read_torch_state_dict(f"{FIXTURES}/resnet18_narrow.pth")
    path = tmp_path / "resnet18_narrow.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    out = narrow("resnet18", str(path))(reference["inputs_a"], training=False).numpy()
    assert relative_difference(out, reference["resnet18_logits_a"]) < 1e-4


def test_headless_model_skips_the_files_classifier(reference):
    top = narrow("resnet18", f"{FIXTURES}/resnet18_narrow.pth")
    features = narrow("resnet18", f"{FIXTURES}/resnet18_narrow.pth", include_top=False)
    assert "fc" not in [layer.name for layer in features.layers]
    x = reference["inputs_b"]
    pooled = features(x, training=False).numpy().mean(axis=(1, 2))
    kernel, bias = top.get_layer("fc").get_weights()
    np.testing.assert_allclose(pooled @ kernel + bias, top(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


# --- registry and stages --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_full_size_models_have_torchvisions_parameter_count(name, params):
    spec = registry.get(name)
    model = spec.build(include_top=True)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == params
    names = [layer.name for layer in model.layers]
    stages = [spec.stage_of(n) for n in names]
    assert None not in stages
    # contiguous, in order: stem, block1..block4, head
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == spec.stage_names
    blocks = {k: len({n.split("_")[1] for n in names if n.startswith(f"layer{k}_")}) for k in range(1, 5)}
    assert tuple(blocks.values()) == resnet.DEPTHS[name]


def test_specs_are_torchvision_data():
    for name in ("resnet18", "resnet34"):
        spec = registry.get(name)
        assert spec.family == "torchvision_resnet" and spec.input_size == 224
        assert spec.preprocessing == Preprocessing.torch() and spec.top_activation == "linear"
        assert spec.checkpoint_mapping == "torchvision_resnet" and spec.classifier == ("fc",)
        assert spec.default_weights == "imagenet"
        assert resnet.WEIGHTS_URLS[name] in spec.weight_sources["imagenet"]
    assert resnet.WEIGHTS_URLS == {
        "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    }


def test_freeze_up_to_block2_freezes_exactly_stem_layer1_layer2():
    spec = registry.get("resnet18")
    model = models.build_classifier("resnet18", 3, image_size=32, weights="none")
    plan = freezing.make_plan(spec, model, "block2")
    stem = ["input_layer", "conv1_pad", "conv1", "bn1", "conv1_relu", "pool1_pad", "pool1"]
    names = [layer.name for layer in models.backbone_of(model).layers]
    expected = stem + [n for n in names if re.match(r"layer[12]_", n)]
    assert plan.frozen_names() == expected
    assert len(expected) == 7 + 2 * (2 * 7) + 3  # 7 layers per BasicBlock, + layer2_0's conv1_pad and downsample
    assert {layer.stage for layer in plan.layers if not layer.frozen} == {"block3", "block4", "classifier"}


# --- strict loading -------------------------------------------------------------------------------------------


def _write(tmp_path, state: dict) -> str:
    path = tmp_path / "edited.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture
def state():
    return read_torch_state_dict(f"{FIXTURES}/resnet18_narrow.pth")


def test_missing_key_is_named(tmp_path, state):
    del state["layer1.0.bn1.running_var"]
    path = _write(tmp_path, state)
    expected = "(?s)" + re.escape(path) + ".*missing in source: layer1_0_bn1/moving_variance"
    with pytest.raises(ValueError, match=expected):
        narrow("resnet18", path)


def test_extra_key_is_named(tmp_path, state):
    state["layer5.0.conv1.weight"] = np.zeros((2, 2, 3, 3), np.float32)
    expected = r"1 problem, nothing was restored.*unexpected in source: layer5\.0\.conv1\.weight \(as layer5_0_conv1/kernel\)"
    with pytest.raises(ValueError, match=expected):
        narrow("resnet18", _write(tmp_path, state))


def test_wrong_shape_names_both_names(tmp_path, state):
    state["layer2.0.conv1.weight"] = np.zeros((8, 4, 5, 5), np.float32)
    with pytest.raises(ValueError, match=re.escape(
        "shape mismatch: layer2_0_conv1/kernel (model (3, 3, 4, 8), source (5, 5, 4, 8))"
    )):
        narrow("resnet18", _write(tmp_path, state))


def test_another_class_count_keeps_the_new_top_and_loads_the_rest():
    # The spec names `fc` as the classifier: a 10-class file into a 5-class top skips fc (reported), loads the rest.
    model = resnet.build_resnet("resnet18", None, f"{FIXTURES}/resnet18_narrow.pth", True, NARROW["resnet18"], 5)
    state = read_torch_state_dict(f"{FIXTURES}/resnet18_narrow.pth")
    np.testing.assert_array_equal(model.get_layer("conv1").kernel.numpy(), state["conv1.weight"].transpose(2, 3, 1, 0))
    assert model.get_layer("fc").kernel.shape == (32, 5)
    narrow("resnet18", f"{FIXTURES}/resnet18_narrow.pth", include_top=False)


def test_keras_weights_file_is_refused_with_the_alternative(tmp_path):
    path = tmp_path / "resnet18.weights.h5"
    narrow("resnet18").save_weights(path)
    with pytest.raises(ValueError, match="is a keras_weights_h5 file.*torchvision-style.*--init-from FILE"):
        narrow("resnet18", str(path))


def test_missing_file_says_what_to_pass(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=re.escape(f"weights={missing!r}") + ".*no such file.*resnet18-f37072fd.pth"):
        registry.get("resnet18").build(weights=missing)


# --- the ImageNet download --------------------------------------------------------------------------------------


@pytest.fixture
def keras_home(monkeypatch, tmp_path):
    from keras.src.backend import config

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))
    return tmp_path


def test_offline_imagenet_fails_fast_naming_the_url(keras_home, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"  # nothing listens: refused, as offline
    monkeypatch.setitem(resnet.WEIGHTS_URLS, "resnet18", url)
    with pytest.raises(WeightsUnavailableError) as caught:
        registry.get("resnet18").build(weights="imagenet")
    error = caught.value
    assert (error.backbone, error.url, error.file_name) == ("resnet18", url, "resnet18-f37072fd.pth")
    assert error.cache_path == str(keras_home / "models" / "resnet18-f37072fd.pth")
    for part in (url, "--weights PATH", error.cache_path):
        assert part in str(error)


def test_corrupt_cached_download_is_refused(keras_home):
    cached = keras_home / "models" / "resnet34-b627a593.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"<html>captive portal</html>")
    expected = r"sha256 .*b627a593 \(a truncated or corrupt download\).*--weights PATH"
    with pytest.raises(WeightsUnavailableError, match=expected):
        registry.get("resnet34").build(weights="imagenet")
