"""Native EfficientNet-Lite against the PyTorch reference implementation, and its architecture table."""

import numpy as np
import pytest

from tfl import models
from tfl.backbones import efficientnet_lite as lite
from tfl.inference import imagenet_labels

FIXTURE = "tests/fixtures/lite0_reference.npz"  # made by scripts/make_torch_fixtures.py with real torch


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURE)


def test_lite0_logits_match_pytorch_reference(reference):
    model = lite.build_lite("efficientnet_lite0", include_top=True, weights="imagenet")
    logits = model(reference["input_nhwc"], training=False).numpy()
    assert np.abs(logits - reference["logits"]).max() < 1e-3
    assert logits.argmax() == reference["logits"].argmax() == 285  # Egyptian cat


def test_lite0_classifier_takes_raw_pixels(reference):
    """Preprocessing lives inside the model: uint8 pixels in, the reference's probabilities out."""
    model = models.build_imagenet_classifier("efficientnet_lite0")
    probs = model(reference["image"].astype("float32"), training=False).numpy()
    ref = np.exp(reference["logits"] - reference["logits"].max())
    ref /= ref.sum()
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    assert imagenet_labels()[int(probs.argmax())] == "Egyptian cat"


@pytest.mark.parametrize("name,params", [("efficientnet_lite0", 4.65), ("efficientnet_lite1", 5.42),
                                         ("efficientnet_lite2", 6.09), ("efficientnet_lite3", 8.20),
                                         ("efficientnet_lite4", 13.01)])
def test_variant_sizes_match_the_tf_reference(name, params):
    """Published parameter counts (millions, with the 1000-class head; BN statistics not counted)."""
    model = lite.build_lite(name, include_top=True)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert abs(trainable / 1e6 - params) / params < 0.01


def test_stem_and_head_are_not_scaled_and_end_groups_keep_repeats():
    plan = lite.block_plan(lite.VARIANTS["efficientnet_lite4"])
    groups = [b["name"][5] for b in plan]
    assert [groups.count(str(g)) for g in range(1, 8)] == [1, 4, 4, 6, 6, 8, 1]
    assert plan[0]["filters_in"] == 32 and plan[-1]["filters_out"] == 448
    model = lite.build_lite("efficientnet_lite4")
    assert model.get_layer("stem_conv").filters == 32 and model.get_layer("top_conv").filters == 1280
    assert not [l for l in model.layers if "se_" in l.name]


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(ValueError, match="no ImageNet weights are packaged for efficientnet_lite4.*--weights PATH"):
        lite.build_lite("efficientnet_lite4", weights="imagenet")
    with pytest.raises(ValueError, match="no such file"):
        lite.build_lite("efficientnet_lite0", weights=str(tmp_path / "missing.pth"))
