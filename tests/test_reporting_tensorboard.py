"""tfl.reporting.tensorboard: drive the callback as a trainer would, read the event files back, compare exactly."""

import dataclasses
import shutil

import pytest

from tfl.reporting.tensorboard import TensorBoardCallback, read_plugin_tags, read_scalars, read_text

STAGES = [("head", ["head"], {"head": 0.01}), ("finetune", ["block7", "head"], {"backbone": 0.001, "head": 0.01})]
EPOCHS, STEPS = 2, 3


@dataclasses.dataclass
class Result:
    epoch: int
    stage: str
    train: dict
    val: dict
    lr: dict
    seconds: float
    trainable: list


def values(epoch):
    """Exactly representable in float32, so the values read back compare with ==."""
    return {"loss": 2.0 / 2 ** epoch, "accuracy": epoch / 8}, {"loss": 4.0 / 2 ** epoch, "accuracy": epoch / 16}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("tb"))
    callback = TensorBoardCallback(logdir, hparams={"backbone": "mobilenet", "lr": 0.01, "epochs": 2,
                                                    "freeze_up_to": None, "head_hidden": (128,), "jit": False},
                                   plan_text="| stage | trainable |\n|---|---|\n| block7 | yes |")
    history, step, epoch = [], 0, 0
    for stage, trainable, groups in STAGES:
        callback.on_stage_begin(stage, {"epochs": EPOCHS, "steps_per_epoch": STEPS, "groups": groups,
                                        "trainable": trainable})
        for _ in range(EPOCHS):
            epoch += 1
            for _ in range(STEPS):
                step += 1
                callback.on_train_step(stage, step, {"loss": 1.0 / step, "accuracy": step / 16,
                                                     **{f"lr/{g}": lr for g, lr in groups.items()}})
            train, val = values(epoch)
            history.append(Result(epoch, stage, train, val, dict(groups), 0.5, trainable))
            callback.on_epoch_end(history[-1])
    callback.on_run_end(history)
    return logdir


def test_train_scalars(logdir):
    scalars = read_scalars(f"{logdir}/train")
    assert sorted(scalars) == ["epoch/accuracy", "epoch/loss", "epoch/lr/backbone", "epoch/lr/head", "epoch/seconds",
                               "step/accuracy", "step/loss", "step/lr/backbone", "step/lr/head"]
    assert scalars["step/loss"] == [(s, pytest.approx(1.0 / s)) for s in range(1, 13)]
    assert [s for s, _ in scalars["step/lr/backbone"]] == list(range(7, 13))  # only the stage that trains it
    assert scalars["epoch/loss"] == [(e, values(e)[0]["loss"]) for e in range(1, 5)]
    assert scalars["epoch/accuracy"] == [(e, values(e)[0]["accuracy"]) for e in range(1, 5)]
    assert scalars["epoch/lr/head"] == [(e, pytest.approx(0.01)) for e in range(1, 5)]
    assert scalars["epoch/lr/backbone"] == [(3, pytest.approx(0.001)), (4, pytest.approx(0.001))]


def test_val_scalars(logdir):
    scalars = read_scalars(f"{logdir}/val")
    assert sorted(scalars) == ["epoch/accuracy", "epoch/loss"]
    assert scalars["epoch/accuracy"] == [(e, values(e)[1]["accuracy"]) for e in range(1, 5)]
    assert scalars["epoch/loss"] == [(e, values(e)[1]["loss"]) for e in range(1, 5)]


def test_hparams_plan_stages_and_final_metrics(logdir):
    tags = read_plugin_tags(logdir)
    assert tags["hparams"] == ["_hparams_/experiment", "_hparams_/session_start_info"]
    texts = read_text(logdir)
    assert texts["freeze_plan"] == [(0, "| stage | trainable |\n|---|---|\n| block7 | yes |")]
    assert [step for step, _ in texts["stage"]] == [1, 7]
    assert "**stage finetune**: 2 epoch(s) × 3 steps; trainable: block7, head" in texts["stage"][1][1]
    final = read_scalars(logdir)
    assert final["final/best_val_accuracy"] == [(4, 0.25)]
    assert final["final/best_epoch"] == [(4, 4.0)]
    assert final["final/val_loss"] == [(4, 0.25)]


def test_hparams_values_are_scalars(logdir):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = ea.EventAccumulator(logdir, size_guidance={ea.TENSORS: 0})
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
               for k, v in data.session_start_info.hparams.items()}
    assert hparams == {"backbone": "mobilenet", "lr": 0.01, "epochs": 2.0, "freeze_up_to": "none",
                       "head_hidden": "[128]", "jit": False}


def test_read_scalars_names_the_subfolders_that_have_events(logdir, tmp_path):
    shutil.copytree(f"{logdir}/train", tmp_path / "train")
    shutil.copytree(f"{logdir}/val", tmp_path / "val")
    with pytest.raises(ValueError, match="no TensorBoard event files in this folder; these subfolders have some: "
                                         "train, val"):
        read_scalars(str(tmp_path))


def test_long_epochs_log_every_kth_step_only(tmp_path):
    from tfl.reporting.tensorboard import STEP_POINTS, TensorBoardCallback, read_scalars

    steps = 3 * STEP_POINTS + 1  # -> every 4th step
    callback = TensorBoardCallback(str(tmp_path))
    callback.on_stage_begin("head", {"epochs": 1, "steps_per_epoch": steps, "groups": {"head": 0.1}, "trainable": []})
    for step in range(1, steps + 1):
        callback.on_train_step("head", step, {"loss": float(step)})
    callback.close()
    logged = read_scalars(str(tmp_path / "train"))["step/loss"]
    assert [s for s, _ in logged] == list(range(4, steps + 1, 4)) and all(v == s for s, v in logged)
