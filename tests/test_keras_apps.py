"""Keras Applications backbones: registry coverage, stage tables on real models, weights handling.

Everything builds with weights=None (offline, fast); only the smallest variant of each family is built.
"""

from __future__ import annotations

import functools
import re
import socket

import keras
import numpy as np
import pytest

from tfl.backbones import download, keras_apps, registry
from tfl.backbones.errors import WeightsUnavailableError
from tfl.backbones.spec import Preprocessing

SPECS = {spec.name: spec for spec in keras_apps.SPECS}
SMALLEST = {}  # family -> its first (smallest) variant
for _spec in keras_apps.SPECS:
    SMALLEST.setdefault(_spec.family, _spec)

EXPECTED_NAMES = {
    *(f"resnet{d}" for d in (50, 101, 152)),
    *(f"resnet{d}_v2" for d in (50, 101, 152)),
    "vgg16", "vgg19",
    "mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    *(f"efficientnet_b{i}" for i in range(8)),
    *(f"efficientnet_v2_{v}" for v in ("b0", "b1", "b2", "b3", "s", "m", "l")),
    "densenet121", "densenet169", "densenet201",
    "inception_v3", "inception_resnet_v2", "xception", "nasnet_mobile", "nasnet_large",
    *(f"convnext_{s}" for s in ("tiny", "small", "base", "large", "xlarge")),
}  # fmt: skip

# The keras.applications module whose preprocess_input each family's spec must reproduce.
KERAS_PREPROCESS_MODULE = {
    "resnet": "resnet",
    "resnet_v2": "resnet_v2",
    "vgg": "vgg16",
    "mobilenet": "mobilenet",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3",
    "efficientnet": "efficientnet",
    "efficientnet_v2": "efficientnet_v2",
    "densenet": "densenet",
    "inception_v3": "inception_v3",
    "inception_resnet_v2": "inception_resnet_v2",
    "xception": "xception",
    "nasnet": "nasnet",
    "convnext": "convnext",
}


def _bump_keras_name_counters():
    # Stage patterns name Keras' auto-numbered layers; they must not depend on what was built before.
    keras.layers.Conv2D(1, 1), keras.layers.Activation("relu"), keras.layers.BatchNormalization()
    keras.layers.Add(), keras.layers.MaxPooling2D(), keras.layers.ReLU(), keras.layers.LayerNormalization()


@functools.lru_cache(maxsize=None)
def built(name: str):
    """(layer names, input shape, parameter count) of the include_top=False model at the default size."""
    _bump_keras_name_counters()
    model = SPECS[name].build()
    return tuple(layer.name for layer in model.layers), model.input_shape, model.count_params()


def stage_members(spec, names) -> dict[str, list[str]]:
    members = {stage: [] for stage in spec.stage_names}
    for name in names:
        stage = spec.stage_of(name)
        if stage is not None:
            members[stage].append(name)
    return members


# --- the registry (cheap: no model is built) ---------------------------------------------------------------


def test_every_keras_application_is_registered_once_with_canonical_stages():
    keras_classifiers = {n for n in dir(keras.applications) if n[:1].isupper()}
    constructors = [v.constructor for f in keras_apps.FAMILIES for v in f.variants]
    assert sorted(constructors) == sorted(keras_classifiers)
    assert set(SPECS) == EXPECTED_NAMES and len(keras_apps.SPECS) == len(EXPECTED_NAMES)
    for spec in keras_apps.SPECS:
        assert registry._REGISTRY[spec.name] is spec
        blocks = spec.stage_names[1:-1]
        assert spec.stage_names == ["stem", *(f"block{i}" for i in range(1, len(blocks) + 1)), "head"]
        assert len(blocks) >= 3, spec.name
        for stage in spec.stages:
            re.compile(stage.pattern)
            assert stage.doc, (spec.name, stage.name)
        assert spec.input_size >= 224 and spec.top_activation == "softmax"
        assert spec.default_weights == "imagenet" and "imagenet" in spec.weight_sources
        assert spec.description.startswith("Keras ") and "params" in spec.description


@pytest.mark.parametrize("family", sorted(KERAS_PREPROCESS_MODULE))
def test_preprocessing_matches_keras_preprocess_input(family):
    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, 4, 4, 3)).astype("float32")
    expected = getattr(keras.applications, KERAS_PREPROCESS_MODULE[family]).preprocess_input(pixels.copy())
    pre = SMALLEST[family].preprocessing
    order = [2, 1, 0] if pre.bgr else [0, 1, 2]
    ours = (pixels[..., order] - np.array(pre.mean)) / np.array(pre.std)
    np.testing.assert_allclose(ours, np.asarray(expected), rtol=1e-5, atol=1e-4)
    if pre == Preprocessing.identity():  # Keras normalises inside these models
        assert any(re.search("rescaling|normalization", n) for n in built(SMALLEST[family].name)[0][:3])


# --- stage tables on real models -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_stages_cover_every_layer_contiguously(family):
    spec = SMALLEST[family]
    names, input_shape, params = built(spec.name)
    uncovered = [n for n in names if spec.stage_of(n) is None]
    assert not uncovered, f"{spec.name}: layers in no stage: {uncovered[:10]}"
    order = [spec.stage_names.index(spec.stage_of(n)) for n in names]
    backwards = [(names[i - 1], names[i]) for i in range(1, len(order)) if order[i] < order[i - 1]]
    assert not backwards, f"{spec.name}: stages not contiguous at {backwards[:5]}"
    members = stage_members(spec, names)
    assert names[0] in members["stem"]
    assert all(members[s] for s in spec.stage_names[:-1]), {s: len(m) for s, m in members.items()}
    assert input_shape == (None, spec.input_size, spec.input_size, 3)
    variant = next(v for f in keras_apps.FAMILIES for v in f.variants if v.name == spec.name)
    assert abs(params / 1e6 - variant.params_m) < 0.006
    assert f"{variant.params_m:.1f}M params" in spec.description


@pytest.mark.parametrize(
    "name, stage, first, last",
    [
        ("vgg16", "stem", "input_layer", "input_layer"),
        ("vgg16", "block1", "block1_conv1", "block1_pool"),
        ("vgg16", "block2", "block2_conv1", "block2_pool"),
        ("vgg16", "block3", "block3_conv1", "block3_pool"),
        ("resnet50", "stem", "input_layer", "pool1_pool"),
        ("resnet50", "block1", "conv2_block1_1_conv", "conv2_block3_out"),
        ("resnet50", "block2", "conv3_block1_1_conv", "conv3_block4_out"),
        ("resnet50", "block3", "conv4_block1_1_conv", "conv4_block6_out"),
        ("mobilenet_v2", "block1", "expanded_conv_depthwise", "expanded_conv_project_BN"),
        ("mobilenet_v2", "block2", "block_1_expand", "block_2_add"),
        ("mobilenet_v2", "block3", "block_3_expand", "block_5_add"),
        ("mobilenet_v2", "head", "Conv_1", "out_relu"),
        ("efficientnet_b0", "stem", "input_layer", "stem_activation"),
        ("efficientnet_b0", "block1", "block1a_dwconv", "block1a_project_bn"),
        ("efficientnet_b0", "block2", "block2a_expand_conv", "block2b_add"),
        ("efficientnet_b0", "block3", "block3a_expand_conv", "block3b_add"),
        ("efficientnet_b0", "head", "top_conv", "top_activation"),
    ],
)
def test_known_stage_boundaries(name, stage, first, last):
    members = stage_members(SPECS[name], built(name)[0])[stage]
    assert (members[0], members[-1]) == (first, last)


def test_resnet50_has_no_head_layers_and_says_so():
    spec = SPECS["resnet50"]
    assert stage_members(spec, built("resnet50")[0])["head"] == []
    assert spec.stages[-1].doc.startswith("none")


def test_layers_made_after_a_build_do_not_reuse_its_auto_names():
    names = set(built("inception_v3")[0])
    assert "conv2d_93" in names
    assert keras.layers.Conv2D(1, 1).name not in names


# --- build arguments ------------------------------------------------------------------------------------------


def test_include_top_builds_the_imagenet_softmax_classifier():
    model = SPECS["mobilenet_v3_small"].build(include_top=True)
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1000)
    probs = np.asarray(model(np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)


def test_include_top_with_another_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"input_shape=\(160, 160, 3\).*include_top=True.*\(224, 224, 3\)"):
        SPECS["mobilenet"].build(input_shape=(160, 160, 3), include_top=True)


def test_feature_extractor_takes_other_input_shapes():
    model = SPECS["vgg16"].build(input_shape=(64, 96, 3))
    assert model.output_shape == (None, 2, 3, 512)


def test_nasnet_refuses_dynamic_height_and_width():
    with pytest.raises(ValueError, match=r"input_shape=\(None, None, 3\).*'nasnet_mobile'.*\(224, 224, 3\)"):
        SPECS["nasnet_mobile"].build(input_shape=(None, None, 3))


def test_weights_file_path_loads_exactly(tmp_path):
    spec = SPECS["mobilenet"]
    source = spec.build()
    path = tmp_path / "w.weights.h5"
    source.save_weights(path)
    loaded = spec.build(weights=path)
    fresh = spec.build()
    kernel = np.asarray(source.get_layer("conv_pw_13").kernel)
    np.testing.assert_array_equal(np.asarray(loaded.get_layer("conv_pw_13").kernel), kernel)
    assert not np.array_equal(np.asarray(fresh.get_layer("conv_pw_13").kernel), kernel)


def test_missing_weights_path_is_a_value_error_naming_it(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(ValueError, match=re.escape(f"weights={str(missing)!r}") + ".*no such file"):
        SPECS["vgg16"].build(weights=missing)
    with pytest.raises(ValueError, match="weights=3 .*expected None, 'imagenet' or a file path"):
        SPECS["vgg16"].build(weights=3)


# --- ImageNet download failures -----------------------------------------------------------------------------


def _free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def vgg16_weights_from(monkeypatch, tmp_path):
    """Point Keras' cache at tmp_path and VGG16's no-top weights URL at a local address."""
    from keras.src.applications import vgg16
    from keras.src.backend import config

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))

    def use(base_url):
        url = f"{base_url}/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
        monkeypatch.setattr(vgg16, "WEIGHTS_PATH_NO_TOP", url)
        return url

    return use


def test_offline_imagenet_fails_fast_naming_file_url_cache_and_fix(vgg16_weights_from, tmp_path):
    from keras.src.utils import file_utils

    url = vgg16_weights_from(f"http://127.0.0.1:{_free_local_port()}")  # nothing listens: refused
    keras_get_file = file_utils.get_file
    with pytest.raises(WeightsUnavailableError) as caught:  # a refused connection: the error names the fix
        SPECS["vgg16"].build(weights="imagenet")
    error = caught.value
    file_name = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cache_path = str(tmp_path / "models" / file_name)
    assert (error.backbone, error.file_name, error.url, error.cache_path) == ("vgg16", file_name, url, cache_path)
    message = str(error)
    for part in ("'vgg16'", file_name, url, cache_path, "--weights PATH", "Connection"):
        assert part in message
    assert isinstance(error, RuntimeError)
    assert file_utils.get_file is keras_get_file and socket.getdefaulttimeout() is None


def test_a_silent_server_cannot_hang_the_download(vgg16_weights_from, monkeypatch):
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        vgg16_weights_from(f"http://127.0.0.1:{silent.getsockname()[1]}")
        # "timed out" is the proof that DOWNLOAD_TIMEOUT_S applied: without it the call would wait forever.
        with pytest.raises(WeightsUnavailableError, match="timed out"):
            SPECS["vgg16"].build(weights="imagenet")
