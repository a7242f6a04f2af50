"""Freeze plans per backbone, rule order, and what training does to frozen and trainable weights."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from tfl import freezing, models
from tfl.backbones import registry
from tfl.training.trainer import ParamGroup, TrainConfig, Trainer

FROZEN_STAGES = {"stem", "block1", "block2", "block3"}


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0", "efficientnet_lite0"])
def test_freeze_up_to_block3_freezes_exactly_stem_to_block3(backbone):
    spec = registry.get(backbone)
    model = models.build_classifier(backbone, 10, image_size=64 if backbone != "efficientnet_b0" else 64, weights="none")
    plan = freezing.make_plan(spec, model, "block3")
    for layer in plan.layers:
        assert layer.frozen == (layer.stage in FROZEN_STAGES), (layer.name, layer.stage, layer.frozen)
    assert plan.frozen_params > 0 and plan.trainable_params > 0
    assert plan.frozen_params + plan.trainable_params == sum(layer.params for layer in plan.layers)
    # the plan is prefix-shaped, so it has a boundary right after block3
    boundary = plan.boundary()
    names = [layer.name for layer in plan.layers]
    assert all(layer.stage in FROZEN_STAGES for layer in plan.layers[: names.index(boundary) + 1])


def test_vgg16_block3_is_its_own_block3():
    spec = registry.get("vgg16")
    model = models.build_classifier("vgg16", 10, image_size=64, weights="none")
    plan = freezing.make_plan(spec, model, "block3")
    frozen_weighted = [layer.name for layer in plan.layers if layer.frozen and layer.params]
    assert frozen_weighted == ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
                               "block3_conv1", "block3_conv2", "block3_conv3"]
    assert plan.boundary() == "block3_pool"


@pytest.fixture(scope="module")
def lite():
    spec = registry.get("efficientnet_lite0")
    return spec, models.build_classifier("efficientnet_lite0", 4, image_size=32, weights="none")


def test_freeze_up_to_accepts_layer_names_and_prefixes(lite):
    spec, model = lite
    by_layer = freezing.make_plan(spec, model, "block2b_project_bn")
    by_prefix = freezing.make_plan(spec, model, "block2b")
    by_stage = freezing.make_plan(spec, model, "block2")
    assert by_prefix.frozen_names() == by_stage.frozen_names()
    assert by_layer.frozen_names() == [n for n in by_stage.frozen_names() if n not in ("block2b_drop", "block2b_add")]


def test_unknown_stage_lists_valid_stages(lite):
    spec, model = lite
    with pytest.raises(ValueError, match=r"'block9'.*stages are: stem, block1, .*block7, head"):
        freezing.make_plan(spec, model, "block9")


def test_rules_apply_in_order_and_last_match_wins(lite):
    spec, model = lite
    plan = freezing.make_plan(spec, model, None, [("freeze", r"block[12].*"), ("unfreeze", r"block2.*"), ("freeze", r"block2b_.*")])
    frozen = set(plan.frozen_names())
    assert "block1a_dwconv" in frozen
    assert "block2a_dwconv" not in frozen
    assert "block2b_dwconv" in frozen
    assert plan.boundary() is None  # block2a trains between frozen layers: not prefix-shaped


def test_bad_regex_names_the_rule(lite):
    spec, model = lite
    with pytest.raises(ValueError, match=r"--freeze 'block\[' is not a valid regular expression"):
        freezing.make_plan(spec, model, None, [("freeze", "block[")])


def test_stop_gradient_refuses_non_prefix_plans(lite):
    spec, model = lite
    plan = freezing.make_plan(spec, model, None, [("freeze", r"block2.*")])
    with pytest.raises(ValueError, match="prefix-shaped"):
        freezing.training_graph(model, plan, "stop_gradient")


def test_stop_gradient_refuses_a_cut_crossed_by_a_skip_connection(lite):
    spec, model = lite
    plan = freezing.make_plan(spec, model, "block2b_expand_conv")  # block2a output skips to block2b_add
    with pytest.raises(ValueError, match="skip connection"):
        freezing.training_graph(model, plan, "stop_gradient")


# --- training: frozen means bit-identical, and both modes agree ---------------------------------------------------
def _tiny_data(n=32, size=32, classes=4, seed=1):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(n, size, size, 3)).astype("float32")
    labels = rng.randint(0, classes, size=(n,)).astype("int32")
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)


def _train(mode, seed=3, train_bn=False, epochs=2):
    keras.utils.set_random_seed(seed)
    spec = registry.get("efficientnet_lite0")
    # Real ImageNet weights: with random init and inference-mode BN, activations vanish and nothing trains.
    model = models.build_classifier("efficientnet_lite0", 4, image_size=32, weights="default")
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    plan = freezing.make_plan(spec, model, "block3")
    graph = freezing.training_graph(model, plan, mode, train_bn)
    trainer = Trainer(tf.distribute.get_strategy(), model, 4, TrainConfig(optimizer="sgd"), log=lambda *_: None)
    groups = [ParamGroup("backbone", graph.backbone_variables, 0.05), ParamGroup("head", graph.head_variables, 0.05)]
    data = _tiny_data()
    trainer.run_stage("finetune", graph.model, groups, epochs, data, data, steps_per_epoch=4, global_batch=8)
    after = {v.path: np.array(v.numpy()) for v in model.weights}
    return plan, before, after, [h.train_loss for h in trainer.history]


@pytest.mark.parametrize("mode", ["trainable", "stop_gradient"])
def test_frozen_weights_and_bn_statistics_are_bit_identical(mode):
    plan, before, after, _ = _train(mode)
    frozen_layers = {layer.name for layer in plan.layers if layer.frozen}
    checked = changed = 0
    for path in before:
        layer = path.split("/")[-2]
        if layer in frozen_layers:
            np.testing.assert_array_equal(before[path], after[path], err_msg=path)
            checked += 1
        elif not np.array_equal(before[path], after[path]):
            changed += 1
    # stem conv+BN (5), block1a (10), blocks 2a 2b 3a 3b (15 each): every kernel and BN gamma/beta/mean/var
    assert checked == 75
    assert changed > 20  # the unfrozen convolutions and the head did train
    assert any("block3b_project_bn/moving_variance" in p for p in before)


def test_bn_above_the_boundary_stays_frozen_unless_train_bn():
    _, before, after, _ = _train("trainable", train_bn=False, epochs=1)
    key = next(p for p in before if p.endswith("block5a_bn/moving_mean"))
    np.testing.assert_array_equal(before[key], after[key])
    _, before, after, _ = _train("trainable", train_bn=True, epochs=1)
    assert not np.array_equal(before[key], after[key])


def test_trainable_and_stop_gradient_modes_give_identical_training():
    _, _, after_a, losses_a = _train("trainable")
    _, _, after_b, losses_b = _train("stop_gradient")
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-6)
    for path in after_a:
        np.testing.assert_allclose(after_a[path], after_b[path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("stage, boundary", [("block1", "layer1_1_out"), ("block2", "layer2_1_out")])
def test_resnet_block_boundary_stops_before_the_next_blocks_padding(stage, boundary):
    # The next block starts with a weightless ZeroPadding2D that its downsample branch skips; cutting after
    # it would be crossed by a skip connection, so the boundary must stay at the block's own output.
    model = models.build_classifier("resnet18", 3, 64, "none")
    plan = freezing.make_plan(registry.get("resnet18"), model, stage)
    assert plan.boundary() == boundary
    graph = freezing.training_graph(model, plan, "stop_gradient")
    assert graph.boundary == boundary and graph.model.get_layer("freeze_boundary") is not None
