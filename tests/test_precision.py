"""--mixed-precision auto|on|off (tfl.precision): the device rules, the remembered choice, the measurement leaving the
run's random state alone, float16's loss scaling, and a resumed run refusing another precision."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import keras

import tfl.cli as cli
from tfl import models, precision
from tfl.training.trainer import ParamGroup, TrainConfig, Trainer

from tiny_runs import TINY

KEY = {"backbone": "compact_cnn", "image_size": 32, "freeze_up_to": "block2", "batch_size": 8}
HALF_CPU = {"kind": "cpu", "name": "a CPU with bfloat16", "half": "bfloat16", "why": "CPU has avx512_bf16"}


def quiet(*_):
    pass


def never(p):
    raise AssertionError(f"measured {p} although the choice needs no timing")


@pytest.fixture
def auto(monkeypatch):
    """--mixed-precision auto as a user gets it (the suite otherwise pins off via TFL_MIXED_PRECISION)."""
    monkeypatch.delenv(precision.ENV, raising=False)


def test_the_fast_half_precision_of_cpus_and_gpus():
    assert precision.cpu_half(["avx2", "avx512f", "avx512_bf16"]) == "bfloat16"
    assert precision.cpu_half(["avx2", "amx_tile", "amx_bf16"]) == "bfloat16"
    assert precision.cpu_half(["avx2", "avx512f", "fma"]) is None
    assert precision.gpu_half((9, 0)) == precision.gpu_half((8, 0)) == "bfloat16"  # Hopper, Ampere
    assert precision.gpu_half((7, 5)) == precision.gpu_half((7, 0)) == "float16"  # Turing, Volta: loss scaling
    assert precision.gpu_half((6, 1)) is None and precision.gpu_half(None) is None


def test_this_machines_cpu_is_read_from_proc_cpuinfo():
    info = precision.cpu_info()
    assert info["cores"] == os.cpu_count() and info["model"]
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            assert ("avx512_bf16" in f.read()) == ("avx512_bf16" in info["flags"])


def test_off_and_on_need_no_timing(auto):
    assert precision.resolve("off", KEY, never, None, log=quiet).precision == "float32"
    on = precision.resolve("on", KEY, never, None, log=quiet)
    assert on.precision == (precision.device()["half"] or "bfloat16")


def test_the_environment_sets_what_auto_means_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv(precision.ENV, "off")
    assert precision.resolve("auto", KEY, never, None, log=quiet).requested == "off"
    assert precision.resolve("on", KEY, never, None, log=quiet).requested == "on"  # an explicit option wins
    monkeypatch.setenv(precision.ENV, "fast")
    with pytest.raises(ValueError, match="TFL_MIXED_PRECISION='fast'"):
        precision.resolve("auto", KEY, never, None, log=quiet)
    with pytest.raises(ValueError, match="--mixed-precision 'half'"):
        precision.resolve("half", KEY, never, None, log=quiet)


def test_auto_keeps_the_faster_remembers_it_per_key_and_keeps_a_resumed_runs(auto, monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "device", lambda: HALF_CPU)
    timed = []

    def measure(p):
        timed.append(p)
        return {"float32": 0.30, "bfloat16": 0.12}[p]

    logs = []
    first = precision.resolve("auto", KEY, measure, str(tmp_path), log=logs.append)
    assert first.precision == "bfloat16" and not first.remembered and timed == ["float32", "bfloat16"]
    assert first.seconds_per_step == {"float32": 0.3, "bfloat16": 0.12} and "2.50x" in first.reason
    assert any("timing" in line for line in logs)
    stored = json.loads((tmp_path / precision.MEMORY).read_text())
    (entry,) = stored.values()
    assert entry["precision"] == "bfloat16" and entry["key"]["backbone"] == "compact_cnn"

    again = precision.resolve("auto", KEY, never, str(tmp_path), log=quiet)  # remembered: no timing
    assert again.precision == "bfloat16" and again.remembered and again.seconds_per_step == first.seconds_per_step

    slower_half = lambda p: {"float32": 0.1, "bfloat16": 0.4}[p]  # noqa: E731
    other = precision.resolve("auto", {**KEY, "image_size": 64}, slower_half, str(tmp_path), log=quiet)
    assert other.precision == "float32" and len(json.loads((tmp_path / precision.MEMORY).read_text())) == 2

    resumed = precision.resolve("auto", KEY, never, str(tmp_path), saved="float32", log=quiet)
    assert resumed.precision == "float32" and resumed.remembered


def test_a_damaged_memory_file_is_measured_again_and_rewritten(auto, monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "device", lambda: HALF_CPU)
    (tmp_path / precision.MEMORY).write_text("{not json")
    choice = precision.resolve("auto", KEY, lambda p: {"float32": 1.0, "bfloat16": 2.0}[p], str(tmp_path), log=quiet)
    assert choice.precision == "float32"
    assert len(json.loads((tmp_path / precision.MEMORY).read_text())) == 1


def test_no_fast_half_precision_means_float32_without_timing(auto, monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "device", lambda: {**HALF_CPU, "half": None, "why": "CPU has neither"})
    choice = precision.resolve("auto", KEY, never, str(tmp_path), log=quiet)
    assert choice.precision == "float32" and choice.reason == "CPU has neither"
    assert not (tmp_path / precision.MEMORY).exists()


def test_timing_train_steps_leaves_the_runs_random_state_alone():
    keras.utils.set_random_seed(3)
    plain = models.build_classifier("compact_cnn", 3, 32, "none")
    keras.utils.set_random_seed(3)
    for p in ("float32", "bfloat16"):
        assert precision.time_train_steps("compact_cnn", 3, 32, "block2", 4, p, steps=1) > 0
    measured = models.build_classifier("compact_cnn", 3, 32, "none")
    assert [w.name for w in measured.weights] == [w.name for w in plain.weights]
    for a, b in zip(measured.weights, plain.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_float16_trains_with_dynamic_loss_scaling():
    keras.utils.set_random_seed(0)
    model = models.build_classifier("compact_cnn", 2, 32, "none", precision="float16")
    assert models.backbone_of(model).compute_dtype == "float16" and model.get_layer("logits").compute_dtype == "float32"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(8)
    trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(loss_scale=True), log=quiet)
    head, body = model.get_layer("logits").trainable_weights, models.backbone_of(model).trainable_weights
    before = [w.numpy().copy() for w in head + body]
    trainer.run_stage("finetune", model, [ParamGroup("backbone", body, 1e-3), ParamGroup("head", head, 1e-3)], 2,
                      data, data, steps_per_epoch=2, global_batch=8)
    optimizers = [live.optimizer for live in trainer._optimizers.values()]
    assert len(optimizers) == 2 and all(isinstance(o, keras.optimizers.LossScaleOptimizer) for o in optimizers)
    assert all(np.isfinite(h.train_loss) for h in trainer.history)
    after = [w.numpy() for w in head + body]
    assert all(np.isfinite(a).all() for a in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(after, before)) >= len(before) // 2  # both groups stepped


def test_a_run_records_its_precision_and_a_resume_refuses_another(auto, data, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--dataset", str(data), *TINY, "--batch-size", "8", "--no-tensorboard",
            "--output-dir", str(out)]
    result = CliRunner().invoke(cli.cli, [*args, "--mixed-precision", "off"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == "float32" and config["precision_choice"]["requested"] == "off"
    assert "precision: float32 (--mixed-precision off)" in result.output

    on = precision.device()["half"] or "bfloat16"
    refused = CliRunner().invoke(cli.cli, [*args, "--mixed-precision", "on"])
    assert refused.exit_code == 2, refused.output
    assert "cannot resume" in refused.output and "precision" in refused.output and on in refused.output
    kept = CliRunner().invoke(cli.cli, [*args, "--mixed-precision", "auto"])  # auto keeps the run's float32
    assert kept.exit_code == 0, kept.output
    assert "precision: float32 (the resumed run's precision" in kept.output


def test_auto_on_a_real_run_times_once_then_remembers(auto, data, tmp_path):
    cache_dir = tmp_path / "cache"
    args = ["finetune", "--dataset", str(data), *TINY, "--batch-size", "8", "--no-tensorboard", "--head-epochs", "1",
            "--epochs", "0", "--cache-dir", str(cache_dir)]
    first = CliRunner().invoke(cli.cli, [*args, "--output-dir", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    choice = config["precision_choice"]
    assert config["precision"] in ("float32", "bfloat16", "float16") and choice["requested"] == "auto"
    if precision.device()["half"]:  # this machine has a fast half precision: both were timed, and remembered
        assert set(choice["seconds_per_step"]) == {"float32", precision.device()["half"]}
        assert (cache_dir / precision.MEMORY).exists()
        second = CliRunner().invoke(cli.cli, [*args, "--output-dir", str(tmp_path / "b")])
        assert second.exit_code == 0 and "remembered" in second.output
        assert json.loads((tmp_path / "b" / "config.json").read_text())["precision"] == config["precision"]


def test_a_run_from_before_the_precision_option_resumes_with_its_precision():
    from tfl.job import saved_precision

    assert saved_precision({"mixed_precision": False}) == "float32"
    assert saved_precision({"mixed_precision": True}) == "bfloat16"  # the old flag meant mixed_bfloat16
    assert saved_precision({"mixed_precision": "auto", "precision": "float16"}) == "float16"
