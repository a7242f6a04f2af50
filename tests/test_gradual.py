"""Gradual unfreezing: the schedule of steps, each step's plan and learning rates, a tiny end-to-end run (which
stages train when, what stays pretrained), and resume exactness across unfreeze boundaries."""

import csv
import json
import math

import numpy as np
import pytest

from tfl import freezing, job as jobs, models
from tfl.backbones import registry
from tfl.recipes import finetune as ft
from tfl.reporting.tensorboard import read_scalars, read_text
from tfl.training import checkpoint
from tfl.training.trainer import Callback
from tiny_runs import checkpoint_arrays, history, run_here, start

SPEC = registry.get("efficientnet_lite0")
LR, BACKBONE_LR, DECAY = 0.003, 0.0003, 2.6


@pytest.fixture(scope="module")
def classifier():
    return models.build_classifier("efficientnet_lite0", 3, 32, "none")


@pytest.fixture(scope="module")
def plan(classifier):
    return freezing.make_plan(SPEC, classifier, "block4")


def steps(plan, **options):
    return ft.gradual_steps(SPEC, plan, ft.FinetuneOptions(freeze_up_to="block4", **options))


# -- the schedule of steps ----------------------------------------------------------------------------------------
def test_the_stages_above_the_boundary_unfreeze_from_the_top(plan):
    assert ft.trainable_stages(SPEC, plan) == ["head", "block7", "block6", "block5"]


def test_one_stage_every_epoch_within_the_budget(plan):
    assert steps(plan, epochs=3, unfreeze_every=1) == [("head", 1), ("block7", 1), ("block6", 1)]
    assert steps(plan, epochs=5, unfreeze_every=2) == [("head", 2), ("block7", 2), ("block6", 1)]


def test_the_last_step_takes_the_remainder_and_never_goes_below_the_boundary(plan):
    assert steps(plan, epochs=5, unfreeze_every=1) == [("head", 1), ("block7", 1), ("block6", 1), ("block5", 2)]
    assert steps(plan, epochs=10, unfreeze_every=2) == [("head", 2), ("block7", 2), ("block6", 2), ("block5", 4)]
    for epochs in range(1, 12):
        for every in (1, 2, 3):
            found = steps(plan, epochs=epochs, unfreeze_every=every)
            assert sum(n for _, n in found) == epochs
            assert all(n == every for _, n in found[:-1])  # one more stage every --unfreeze-every epochs
            assert [name for name, _ in found] == ["head", "block7", "block6", "block5"][: len(found)]


def test_a_schedule_names_the_steps(plan):
    assert ft.parse_schedule("head:2, block7:1") == [("head", 2), ("block7", 1)]
    assert steps(plan, epochs=9, unfreeze_schedule="head:2,block7:1") == [("head", 2), ("block7", 1)]
    assert steps(plan, unfreeze_schedule="head:1,block7:1,block6:3,block5:1") == [
        ("head", 1), ("block7", 1), ("block6", 3), ("block5", 1)]


@pytest.mark.parametrize("schedule", [
    "block7:1,head:2",  # out of order
    "head:1,block6:1",  # skips block7
    "head:1,block9:1",  # no such stage
    "classifier:1",  # the new head is not a backbone stage
    "head:1,block7:1,block6:1,block5:1,block4:1",  # block4 is frozen by --freeze-up-to
    "head:1,head:1",
])
def test_a_schedule_out_of_order_unknown_or_below_the_boundary_is_refused(plan, schedule):
    with pytest.raises(ValueError) as err:
        steps(plan, unfreeze_schedule=schedule)
    message = str(err.value)
    assert f"--unfreeze-schedule {schedule!r}" in message
    assert "above --freeze-up-to block4: head, block7, block6, block5 (in that order)" in message


@pytest.mark.parametrize("schedule", ["head", "head:0", "head:two", "head:1,", ":1", "head:-1"])
def test_a_malformed_schedule_says_what_a_step_looks_like(plan, schedule):
    with pytest.raises(ValueError, match=r"is not STAGE:EPOCHS with EPOCHS >= 1, e.g. 'head:2,block7:1,block6:1'"):
        steps(plan, unfreeze_schedule=schedule)


def test_nothing_above_the_boundary_is_refused(classifier):
    plan = freezing.make_plan(SPEC, classifier, "head")
    with pytest.raises(ValueError, match="nothing lies above --freeze-up-to head to unfreeze"):
        ft.gradual_steps(SPEC, plan, ft.FinetuneOptions(freeze_up_to="head"))


@pytest.mark.parametrize("options, message", [
    ({"unfreeze_mode": "layerwise"}, "--unfreeze-mode 'layerwise' is not one of two_stage, gradual"),
    ({"unfreeze_mode": "gradual", "lr_decay_per_stage": 0.5}, r"--lr-decay-per-stage 0.5: must be >= 1"),
    ({"unfreeze_mode": "gradual", "unfreeze_every": 0}, "--unfreeze-every 0: must be >= 1"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, options, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        ft.finetune(ft.FinetuneOptions(dataset=str(tmp_path / "missing"), output_dir=str(out), **options),
                    log=lambda *_: None)
    assert not out.exists()


# -- each step's plan, groups and learning rates ------------------------------------------------------------------
def test_each_step_opens_one_more_stage_at_a_decayed_learning_rate(plan):
    schedule = [("head", 1), ("block7", 2), ("block6", 1), ("block5", 1)]
    stages = ft.unfreeze_stages(plan, schedule, 0.01, 0.004, 2.6)
    assert [s.name for s in stages] == ["+head", "+block7", "+block6", "+block5"]
    assert [s.epochs for s in stages] == [1, 2, 1, 1]
    order = ["head", "block7", "block6", "block5"]
    for i, stage in enumerate(stages):
        opened = order[: i + 1]
        assert stage.lrs == pytest.approx({"classifier": 0.01, **{s: 0.004 / 2.6 ** k for k, s in enumerate(opened)}},
                                          rel=1e-12)
        assert list(stage.lrs) == ["classifier", *opened]
        for layer, base in zip(stage.plan.layers, plan.layers, strict=True):
            assert layer.name == base.name
            assert layer.frozen == (base.frozen or layer.stage not in ["classifier", *opened]), layer.name
        assert stage.group_of("classifier") == "classifier" and stage.group_of(opened[-1]) == opened[-1]
        assert stage.policy.keep_optimizers is (i > 0)
        assert stage.policy.warmup is (i == 0)
    assert [s.policy.schedule_epochs for s in stages] == [5, 4, 2, 1]  # from the step that unfreezes to the end
    # The frozen prefix ends where the stage below the lowest open one ends: a clean cut for caching.
    assert [s.plan.boundary() for s in stages] == ["block7a_project_bn", "block6d_add", "block5c_add", "block4c_add"]
    assert stages[-1].plan.frozen_names() == plan.frozen_names()  # the last step trains what --freeze-up-to opens


def test_a_frozen_rule_inside_an_open_stage_stays_frozen(classifier):
    plan = freezing.make_plan(SPEC, classifier, "block4", [("freeze", "block6a_.*")])
    last = ft.unfreeze_stages(plan, [("head", 1), ("block7", 1), ("block6", 1)], 0.01, 0.004, 1.0)[-1]
    frozen = {layer.name for layer in last.plan.layers if layer.frozen}
    assert {layer.name for layer in plan.layers if layer.name.startswith("block6a_")} <= frozen
    assert not {layer.name for layer in plan.layers if layer.name.startswith("block6b_") and layer.params} & frozen


# -- a tiny end-to-end run ----------------------------------------------------------------------------------------
# 24 train / 8 val / 8 test images at 32 px, 3 steps an epoch; ImageNet weights, blocks up to block5 frozen.
TINY = dict(backbone="efficientnet_lite0", weights="default", image_size=32, val_split=0.25, freeze_up_to="block5",
            lr=LR, backbone_lr=BACKBONE_LR, batch_size=8, seed=3, unfreeze_mode="gradual", lr_decay_per_stage=DECAY)
STAGE_LR = {"head": BACKBONE_LR, "block7": BACKBONE_LR / DECAY, "block6": BACKBONE_LR / DECAY ** 2}


class EpochWeights(Callback):
    """Every backbone and classifier layer's weights after each epoch."""

    def __init__(self, model):
        self.model, self.after = model, {}

    def on_epoch_end(self, result):
        layers = list(models.backbone_of(self.model).layers) + list(models.head_layers(self.model))
        self.after[result.epoch] = {layer.name: [np.array(w.numpy()) for w in layer.weights] for layer in layers}


def observed_gradual(observers):
    """finetune's gradual recipe, with an EpochWeights callback added to the trainer it makes."""
    def recipe(job):
        prepare = job.prepare

        def prepare_and_observe(*args, **kwargs):
            prepare(*args, **kwargs)
            observers.append(EpochWeights(job.model))
            job.trainer.callbacks.append(observers[-1])
            return job

        job.prepare = prepare_and_observe
        return ft.gradual(job)

    return recipe


@pytest.fixture(scope="module")
def gradual_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gradual") / "run"
    opts = ft.FinetuneOptions(**TINY, dataset=data, output_dir=str(out), head_epochs=1, epochs=3, unfreeze_every=1)
    observers = []
    metrics = jobs.run(opts, observed_gradual(observers), log=lambda *_: None)
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows, observers[0].after, metrics


def test_history_shows_each_step_its_trainable_stages_and_learning_rates(gradual_run):
    _, rows, _, metrics = gradual_run
    assert metrics["epochs_run"] == 4
    assert [r["stage"] for r in rows] == ["head", "+head", "+block7", "+block6"]
    assert [r["trainable"] for r in rows] == ["classifier", "head;classifier", "block7;head;classifier",
                                              "block6;block7;head;classifier"]
    assert [k for k in rows[0] if k.startswith("lr_")] == ["lr_classifier", "lr_head", "lr_block7", "lr_block6"]
    # Each group's cosine schedule spans the epochs from the step that unfroze it to the end (epoch 4); stage 1's
    # classifier schedule spans stage 1 only, and the first step starts the classifier again.
    unfrozen = {"head": 2, "block7": 3, "block6": 4}
    for epoch, row in enumerate(rows, 1):
        if epoch == 1:
            assert float(row["lr_classifier"]) == pytest.approx(LR, rel=1e-6)
        else:
            assert float(row["lr_classifier"]) == pytest.approx(cosine(LR, epoch - 2, 3), rel=1e-6)
        for group, first in unfrozen.items():
            value = row[f"lr_{group}"]
            if epoch < first:
                assert value == "", (epoch, group)
            else:
                assert float(value) == pytest.approx(cosine(STAGE_LR[group], epoch - first, 5 - first), rel=1e-6)
    assert float(rows[3]["lr_block6"]) == pytest.approx(BACKBONE_LR / DECAY ** 2, rel=1e-6)
    assert float(rows[2]["lr_block7"]) == pytest.approx(BACKBONE_LR / DECAY, rel=1e-6)


def cosine(base, done_epochs, span_epochs):
    return base * 0.5 * (1 + math.cos(math.pi * done_epochs / span_epochs))


def test_frozen_layers_stay_pretrained_and_each_stage_moves_only_from_its_step(gradual_run):
    _, _, after, _ = gradual_run
    pretrained = models.build_classifier("efficientnet_lite0", 2, 32, "default")
    reference = {layer.name: [w.numpy() for w in layer.weights] for layer in models.backbone_of(pretrained).layers}
    names = list(reference)

    def same(epoch, layer):
        return all(np.array_equal(a, b) for a, b in zip(after[epoch][layer], reference[layer], strict=True))

    below = [n for n in names if SPEC.stage_of(n) in ("stem", "block1", "block2", "block3", "block4", "block5")]
    batch_norms = [layer.name for layer in models.backbone_of(pretrained).layers
                   if layer.__class__.__name__ == "BatchNormalization"]
    assert below and batch_norms
    for epoch in after:
        assert all(same(epoch, n) for n in below), epoch  # below --freeze-up-to: never trained
        assert all(same(epoch, n) for n in batch_norms), epoch  # BN frozen everywhere (train_bn off)
    unfrozen = {"head": 2, "block7": 3, "block6": 4}
    for stage, first in unfrozen.items():
        layers = [n for n in names if SPEC.stage_of(n) == stage and reference[n] and n not in batch_norms]
        assert layers
        for epoch in range(1, first):
            assert all(same(epoch, n) for n in layers), (stage, epoch)  # still frozen before its step
        assert not any(same(first, n) for n in layers), stage  # every conv of it moved in its first epoch
    logits = [np.array_equal(after[e]["logits"][0], after[e + 1]["logits"][0]) for e in (1, 2, 3)]
    assert logits == [False, False, False]  # the classifier trains at every step


# -- resume exactness across unfreeze boundaries ------------------------------------------------------------------
# 6 epochs: head (1), +head (2, 3), +block7 (4, 5), +block6 (6). The killed and the uninterrupted runs are
# `cli.py finetune` children (tiny_runs.start); TFL_FAULT kills one after step 1 of the given epoch.
RESUMABLE = dict(TINY, head_epochs=1, epochs=5, unfreeze_every=2)
STAGES = ["head", "+head", "+head", "+block7", "+block7", "+block6"]


def cli_args(options: dict) -> list[str]:
    """`cli.py finetune` arguments for FinetuneOptions fields (unfreeze_mode="gradual" as `--unfreeze-mode gradual`)."""
    return [arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """A run nobody kills, with its own boundary cache, in this process (the same command a child would run)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    cache = tmp_path_factory.mktemp("cache-uninterrupted")
    return out, run_here(cli_args({**RESUMABLE, "dataset": data, "output_dir": str(out)}), {"TFL_CACHE_DIR": str(cache)})


KILLS = [
    (3, "+head"),  # the last epoch before a boundary: resumes mid-step, then crosses it
    (4, "+head"),  # the first epoch of the second unfreeze step: resumes right after a boundary
    (5, "+block7"),  # mid-step in a step that kept the optimizers of the groups before it
]


def test_a_gradual_run_killed_and_resumed_ends_exactly_as_an_uninterrupted_one(data, uninterrupted, tmp_path):
    """One run killed three times, each kill at step 1 of the next epoch of KILLS and each resume from the
    checkpoint the kill left: the resumes after a boundary, mid-step and in a later step all continue exactly."""
    out = tmp_path / "run"
    options = {**RESUMABLE, "dataset": data, "output_dir": str(out)}
    for number, (epoch, _) in enumerate(KILLS):
        resumed_from = KILLS[number - 1] if number else None
        killed = start(cli_args(options) + (["--resume"] if number else []),
                       {"TFL_FAULT": f"kill-at-step:{epoch}:1"}).wait()
        assert killed.proc.returncode == -9, killed.why()
        if resumed_from:
            said = f"resuming after epoch {resumed_from[0] - 1} (stage {resumed_from[1]})"
            assert said in killed.out + killed.err, killed.why()
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert latest == f"ckpt-{epoch - 1:04d}.npz"
        saved = checkpoint.read(str(out / "checkpoints" / latest)).state
        assert [r["stage"] for r in saved["history"]] == STAGES[: epoch - 1]
        assert saved["stage_done"] is (STAGES[epoch - 2] != STAGES[epoch - 1])

    # In-process, through the library: the resume is refused unless the CLI made the same options.
    epoch, where = KILLS[-1]
    logs = []
    metrics = ft.finetune(ft.FinetuneOptions(**{**options, "resume": True}), log=logs.append)
    assert f"resuming after epoch {epoch - 1} (stage {where}) from the checkpoint in {out / 'checkpoints'}" in logs

    reference_dir, child = uninterrupted
    assert child.returncode == 0, child.why()
    resumed, reference = history(out), history(reference_dir)
    assert [r["stage"] for r in reference] == STAGES
    assert resumed == reference  # every loss, accuracy and learning rate, and the trainable column
    assert [r["trainable"] for r in resumed] == ["classifier", "head;classifier", "head;classifier",
                                                 "block7;head;classifier", "block7;head;classifier",
                                                 "block6;block7;head;classifier"]  # nothing re-frozen after resume
    with open(reference_dir / "metrics.json") as f:
        expected = json.load(f)
    assert (metrics["test_loss"], metrics["best_epoch"]) == (expected["test_loss"], expected["best_epoch"])
    for split, tag in (("train", "step/loss"), ("train", "step/lr/block7"), ("val", "epoch/accuracy")):
        assert logged(out, split, tag) == logged(reference_dir, split, tag), (split, tag)  # killed + resumed events
    assert sorted(logged(out, "train", "step/loss")) == list(range(1, 6 * 3 + 1))
    # Each stage's marker sits at its first step, in the resumed run as in the uninterrupted one.
    marks = lambda d: {step for step, _ in read_text(str(d / "tensorboard"))["stage"]}  # noqa: E731
    assert marks(out) == marks(reference_dir) == {1, 4, 10, 16}
    final, final_reference = checkpoint_arrays(out, 6), checkpoint_arrays(reference_dir, 6)
    assert final.keys() == final_reference.keys()
    assert [k for k in final if k.startswith("opt.")]  # every group's optimizer state is in it
    assert all(np.array_equal(final[k], final_reference[k]) for k in final), \
        [k for k in final if not np.array_equal(final[k], final_reference[k])][:5]


def logged(run_dir, split, tag) -> dict:
    """step -> value of a TensorBoard scalar; a step logged twice (by a killed run and its resume) must agree."""
    pairs = read_scalars(str(run_dir / "tensorboard" / split))[tag]
    merged = dict(pairs)
    assert len(set(pairs)) == len(merged), f"{tag}: a step logged twice with different values"
    return merged
