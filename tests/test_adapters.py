"""LoRA adapters (tfl.adapters, --adapter lora): the plan counts what trains by the LoRA formula, the merged model
(model.keras, the SavedModel) computes what the adapted one does, training leaves the base weights as they were,
an adapter-only file loads back with --init-from, and bad settings exit 2. One tiny end-to-end run."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfl import adapters, freezing, models
from tfl.backbones import registry
from tfl.job import Job
from tfl.recipes.finetune import FinetuneOptions, finetune
from tfl.training import checkpoint, rundir
from tfl.training.strategy import make_strategy

RANK, ALPHA = 2, 4.0
SIZE = 32
# compact_cnn above block2: block3a_conv (3x3, 96 -> 160) and top_conv (1x1, 160 -> 256) get adapters.
ADAPTED = {"block3a_conv": (3, 3, 96, 160), "top_conv": (1, 1, 160, 256)}
TINY = dict(backbone="compact_cnn", weights="none", image_size=SIZE, head_epochs=1, epochs=2, val_split=0.25,
            freeze_up_to="block2", lr=0.01, backbone_lr=0.01, batch_size=8, seed=0, tensorboard=False)


def adapted_classifier(num_classes=2):
    keras.utils.set_random_seed(0)
    spec = registry.get("compact_cnn")
    model = models.build_classifier("compact_cnn", num_classes, SIZE, "none")
    plan = freezing.make_plan(spec, model, "block2")
    names = adapters.add_lora(model, plan, RANK, ALPHA)
    return spec, model, names


def nudge_adapters(model):
    """Give every adapter's b (zeros at first) random values, so the adapters change the outputs."""
    rng = np.random.default_rng(1)
    for layer in freezing.leaf_layers(model):
        if adapters.has_adapter(layer):
            layer.lora_kernel_b.assign(rng.normal(0, 0.05, layer.lora_kernel_b.shape).astype("float32"))


def test_plan_and_optimizer_train_exactly_the_lora_formula_and_the_head():
    spec, model, names = adapted_classifier()
    assert sorted(names) == sorted(ADAPTED)
    plan = freezing.make_plan(spec, model, "block2")
    head = sum(int(np.prod(w.shape)) for layer in models.head_layers(model) for w in layer.weights)
    formula = sum(RANK * (kh * kw * cin + cout) for kh, kw, cin, cout in ADAPTED.values())  # a: kh.kw.cin x r, b: r x out
    assert plan.trainable_params == formula + head
    graph = freezing.training_graph(model, plan)
    trained = [v for vs in graph.variables.values() for v in vs]
    assert sum(int(np.prod(v.shape)) for v in trained) == formula + head  # what the optimizer gets
    backbone = models.backbone_of(model)
    for name in ADAPTED:
        layer = backbone.get_layer(name)
        assert not any(v is layer._kernel for v in trained) and any(v is layer.lora_kernel_a for v in trained)
    listed = {l["name"]: l for l in plan.to_json()["layers"]}
    assert listed["top_conv"] == {"name": "top_conv", "stage": "head", "frozen": True, "params": 160 * 256,
                                  "adapter": "lora", "adapter_params": RANK * (160 + 256)}
    assert listed["block3a_bn"]["frozen"] and not listed["logits"]["frozen"]


def test_merged_model_and_saved_model_compute_what_the_adapted_model_does(tmp_path):
    from tfl.serving.layout import PROBABILITIES
    from tfl.serving.saved_model import IMAGES_SIGNATURE, write_saved_model

    _, model, _ = adapted_classifier()
    images = np.random.default_rng(2).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    before = model(images, training=False).numpy()
    nudge_adapters(model)
    adapted = model(images, training=False).numpy()
    assert np.abs(adapted - before).max() > 1e-4  # the adapters matter
    base_kernel = models.backbone_of(model).get_layer("top_conv")._kernel.numpy()
    plain = adapters.merged(model)
    assert not any(adapters.has_adapter(layer) for layer in freezing.leaf_layers(plain))
    assert "lora" not in json.dumps(plain.get_config())
    np.testing.assert_allclose(plain(images, training=False).numpy(), adapted, atol=1e-5)
    merged_kernel = models.backbone_of(plain).get_layer("top_conv").kernel.numpy()
    assert np.abs(merged_kernel - base_kernel).max() > 1e-3  # the update is in the kernel, not dropped
    # model.keras as a run saves it, and the SavedModel export built from it
    run = rundir.RunDir(str(tmp_path / "run"))
    run.write_json(rundir.CLASSES, ["a", "b"])
    run.save_model(plain)
    loaded = run.load_model()
    np.testing.assert_allclose(loaded(images, training=False).numpy(), adapted, atol=1e-5)
    write_saved_model(loaded, "a\nb\n", str(tmp_path / "sm"), top_k=1)
    served = tf.saved_model.load(str(tmp_path / "sm")).signatures[IMAGES_SIGNATURE](images=tf.constant(images))
    np.testing.assert_allclose(served[PROBABILITIES].numpy(), tf.nn.softmax(adapted).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    # No head stage: every epoch trains the adapters, so the best epoch's (what the file holds) are not zeros.
    opts = FinetuneOptions(**{**TINY, "head_epochs": 0}, dataset=data, output_dir=str(out), adapter="lora",
                           lora_rank=RANK, lora_alpha=ALPHA, save_adapters_only=True)
    return out, finetune(opts, log=lambda *_: None)


def test_adapter_file_round_trips_with_init_from_and_the_base_stays(lora_run, data):
    out, metrics = lora_run
    assert not (out / rundir.MODEL).exists()
    manifest = json.loads((out / rundir.ADAPTERS_MANIFEST).read_text())
    assert manifest["rank"] == RANK and manifest["alpha"] == ALPHA and sorted(manifest["layers"]) == sorted(ADAPTED)
    assert manifest["params"] == sum(RANK * (kh * kw * cin + cout) for kh, kw, cin, cout in ADAPTED.values()) + 256 * 2 + 2
    # A new run's model from the file, through --init-from as `tfl finetune` reads it.
    opts = FinetuneOptions(**TINY, dataset=data, adapter="lora", lora_rank=RANK, lora_alpha=ALPHA,
                           init_from=str(out / rundir.ADAPTERS))
    job = Job.setup(opts, lambda *_: None, make_strategy("default"))
    assert job.restored.values_loaded == manifest["params"]
    # Same outputs: its test loss is the first run's (the test split's 8 images, float32).
    split, dataset = job.eval_split()
    logits, labels = [], []
    for batch in dataset:
        logits.append(job.model(batch["image"], training=False).numpy())
        labels.append(batch["label"].numpy())
    loss = keras.losses.sparse_categorical_crossentropy(np.concatenate(labels), np.concatenate(logits),
                                                        from_logits=True)
    assert split == "test"
    assert float(np.mean(loss)) == pytest.approx(metrics["test_loss"], abs=1e-5)
    # Training changed the adapters, not the base weights: the last checkpoint's kernels are the seeded init's.
    snapshot = checkpoint.load_latest(str(out / rundir.CHECKPOINTS), lambda *_: None)
    saved = {path: snapshot.arrays[f"model.{i:05d}"] for i, (path, _) in enumerate(snapshot.state["variables"])}
    backbone = models.backbone_of(job.model)
    for name in ADAPTED:
        layer = backbone.get_layer(name)
        kernel = next(v for p, v in saved.items() if p.endswith(f"{name}/kernel"))
        lora_b = next(v for p, v in saved.items() if p.endswith(f"{name}/lora_kernel_b"))
        np.testing.assert_array_equal(kernel, layer._kernel.numpy())
        assert np.abs(lora_b).max() > 0 and np.abs(layer.lora_kernel_b.numpy()).max() > 0  # trained, and loaded
    bn = backbone.get_layer("top_bn")
    moving = next(v for p, v in saved.items() if p.endswith("top_bn/moving_mean"))
    np.testing.assert_array_equal(moving, bn.moving_mean.numpy())  # frozen batch norm kept its statistics


@pytest.mark.parametrize("args, message", [
    (["--adapter", "lora", "--lora-rank", "0"], "--lora-rank"),
    (["--lora-rank", "4"], "without --adapter lora"),
    (["--adapter", "lora", "--freeze-up-to", "head"], "no Dense, EinsumDense or Conv layer"),
    (["--adapter", "lora", "--save-adapters-only", "--export"], "--save-adapters-only writes no model.keras"),
])
def test_usage_errors_exit_2(args, message, data, tmp_path):
    from tfl.cli import cli

    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, "--backbone", "compact_cnn", "--weights", "none",
                                      "--image-size", "32", "--batch-size", "8", "--output-dir",
                                      str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not os.path.exists(tmp_path / "run" / rundir.MODEL)


def test_an_adapter_file_needs_its_adapter_options(lora_run, data, tmp_path):
    from tfl.cli import cli

    out, _ = lora_run
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, "--backbone", "compact_cnn", "--weights", "none",
                                      "--init-from", str(out / rundir.ADAPTERS), "--output-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert f"--adapter lora --lora-rank {RANK} --lora-alpha {ALPHA:g}" in result.output


def test_adapter_file_holds_what_trains_and_batch_norm_only_with_train_bn():
    spec, model, _ = adapted_classifier()
    plan = freezing.make_plan(spec, model, "block2")
    kept = set(adapters.trained_weights(model, plan))
    adapter_names = {f"{name}/lora_kernel_{ab}" for name in ADAPTED for ab in "ab"}
    assert kept == adapter_names | {"logits/kernel", "logits/bias"}
    with_bn = set(adapters.trained_weights(model, plan, train_bn=True))
    assert with_bn - kept == {f"{bn}/{w}" for bn in ("block3a_bn", "top_bn")
                              for w in ("gamma", "beta", "moving_mean", "moving_variance")}
