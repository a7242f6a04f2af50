"""tfl finetune --balance: the class weights and the sampler on hand-made labels, the sampler's batches as the
trainer gets them from a real job (cached features), and a tiny imbalanced run per mode recording its choice."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import tfl.cli as cli
from tfl import job as jobs
from tfl.recipes import balance
from tfl.recipes import stages as stages_module
from tfl.recipes.finetune import FinetuneOptions
from tiny_runs import image_folder

TINY = dict(backbone="efficientnet_lite0", image_size=32, head_epochs=1, epochs=0, val_split=0.25, batch_size=8,
            lr=0.01, tensorboard=False)


def test_class_weights_are_balanced_and_average_one_over_the_rows():
    labels = np.array([0, 0, 0, 1, 2, 2])
    weights = balance.class_weights(labels, 4)  # class 3 has no row
    assert weights.tolist() == pytest.approx([6 / 9, 6 / 3, 6 / 6, 0.0])
    assert weights[labels].mean() == pytest.approx(1.0)


def test_the_sampler_draws_each_class_equally_often():
    labels = np.array([0] * 90 + [1] * 10)
    rows = balance.balanced_indices(labels, 20000, seed=0)
    assert np.mean(labels[rows] == 1) == pytest.approx(0.5, abs=0.02)
    assert len(np.unique(rows[labels[rows] == 1])) == 10  # the rare class's rows all come back


def test_the_sampler_order_is_seeded_per_epoch_in_full_batches():
    labels = np.array([0] * 30 + [1] * 5)
    order = balance.balanced_order(labels, batch=4, seed=3)
    first = [b.numpy() for b in order(1)]
    assert len(first) == 35 // 4 and all(len(b) == 4 for b in first)
    assert all((a == b).all() for a, b in zip(first, [b.numpy() for b in order(1)]))
    assert any((a != b).any() for a, b in zip(first, [b.numpy() for b in order(2)]))


def test_an_unknown_balance_is_refused():
    with pytest.raises(ValueError, match="--balance 'smote': choose one of none, sampler, loss"):
        balance.check_balance("smote")


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """c0 with 32 training images, c1 with 4 (and 8 test images each)."""
    root = image_folder(tmp_path_factory.mktemp("bal") / "data", classes=("c0", "c1"), per_class=32)
    rare = os.path.join(root, "train", "c1")
    for name in sorted(os.listdir(rare))[4:]:
        os.remove(os.path.join(rare, name))
    return root


def _epoch_labels(opts):
    """The labels of the head stage's training batches of epochs 1-3, as the trainer would get them."""
    from tfl import freezing
    from tfl.freezing import head_only_plan
    from tfl.job import Stage

    def recipe(job):
        stages = [Stage("head", head_only_plan(job.plan), 3, {"head": job.lr})]
        stages_module.prepare_balanced(job, stages)
        graph = freezing.training_graph(job.model, stages[0].plan, "trainable", False)
        feed = job.inputs.feed("head", graph, [])
        assert feed.boundary is not None  # cached pooled features: the sampler orders them too
        return np.concatenate([b["label"].numpy() for epoch in (1, 2, 3) for b in feed.train(epoch)])

    return jobs.run(opts, recipe, log=lambda *_: None)


def test_the_sampler_balances_the_batches_the_trainer_gets(imbalanced, tmp_path):
    plain = _epoch_labels(FinetuneOptions(**TINY, dataset=imbalanced, output_dir=str(tmp_path / "a")))
    sampled = _epoch_labels(FinetuneOptions(**TINY, dataset=imbalanced, output_dir=str(tmp_path / "b"),
                                            balance="sampler"))
    assert len(plain) == len(sampled)  # the same steps per epoch
    assert np.mean(plain == 1) < 0.15  # 3 of the 27 training rows
    assert np.mean(sampled == 1) > 0.3  # about half in expectation


@pytest.mark.parametrize("mode", ["loss", "sampler"])
def test_a_balanced_run_records_its_mode_counts_and_weights(imbalanced, tmp_path, mode):
    out = tmp_path / mode
    result = CliRunner().invoke(cli.cli, ["finetune", "--dataset", imbalanced, "--backbone", "efficientnet_lite0",
                                          "--image-size", "32", "--head-epochs", "2", "--epochs", "0", "--val-split",
                                          "0.25", "--batch-size", "8", "--no-tensorboard", "--balance", mode,
                                          "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["balance"] == mode
    assert config["balance_record"]["class_counts"] == {"c0": 24, "c1": 3}
    if mode == "loss":
        assert config["balance_record"]["class_weights"] == {"c0": pytest.approx(27 / 48), "c1": pytest.approx(27 / 6)}
    with open(out / "metrics.json") as f:
        assert 0.0 <= json.load(f)["test_accuracy"] <= 1.0
    shutil.rmtree(out)


def test_the_cli_refuses_an_unknown_balance(imbalanced, tmp_path):
    result = CliRunner().invoke(cli.cli, ["finetune", "--dataset", imbalanced, "--balance", "smote"])
    assert result.exit_code == 2 and "--balance" in result.output
