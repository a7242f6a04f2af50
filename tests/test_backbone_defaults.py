"""Each backbone's default --freeze-up-to (BackboneSpec.default_freeze_up_to): the measured rule, how a stage the
backbone lacks is refused, what `tfl inspect` shows, and a ResNet50 fine-tune that trains conv5_x by default (and
resumes against the resolved stage). What the default freezes on every registered backbone is checked in
test_stage_contract.py, on the same model as the stage contract (each backbone built once)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner

from tfl import freezing, models
from tfl.backbones import registry
from tfl.cli import cli
from tfl.job import JobOptions
from tiny_runs import freeze_defaults_rule

SPECS = registry.all_specs()


RULE = freeze_defaults_rule()


def test_the_rule_picks_the_stage_nearest_a_quarter_to_a_third_by_ratio():
    # Hand-made parameter counts (trainable share above each stage in the comments).
    assert RULE.choose({"stem": 10, "block1": 20, "block2": 40, "block3": 30}) == "block2"  # 0.9, 0.7, 0.3, 0
    assert RULE.choose({"stem": 1, "block1": 24, "block2": 71, "block3": 4}) == "block1"  # 0.99, 0.75, 0.04, 0
    assert RULE.choose({"stem": 1, "block1": 24, "block2": 60, "block3": 15}) == "block2"  # 0.99, 0.75, 0.15, 0
    assert RULE.choose({"stem": 10, "block1": 90}) == "stem"  # never everything frozen


def test_lite0_keeps_block4_the_measured_default_of_the_embedded_run():
    spec = registry.get("efficientnet_lite0")
    assert JobOptions().backbone == spec.name and JobOptions().freeze_up_to == "default"
    assert freezing.resolve_freeze_up_to(spec, JobOptions().freeze_up_to) == "block4"


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_a_stage_the_backbone_lacks_is_refused_naming_its_stages(spec):
    blocks = [s for s in spec.stage_names if s.startswith("block")]
    missing = f"block{len(blocks) + 1}"
    with pytest.raises(ValueError) as err:
        freezing.resolve_freeze_up_to(spec, missing)
    message = str(err.value)
    assert f"--freeze-up-to {missing!r} is not a stage of {spec.name}" in message
    assert "its stages are: " + ", ".join(spec.stage_names) in message
    assert f"(default {spec.default_freeze_up_to})" in message
    # The words keep their meaning everywhere; stage names pass through.
    assert freezing.resolve_freeze_up_to(spec, "default") == spec.default_freeze_up_to
    assert freezing.resolve_freeze_up_to(spec, "none") is None
    assert freezing.resolve_freeze_up_to(spec, None) is None
    assert freezing.resolve_freeze_up_to(spec, "auto") == "auto"
    assert freezing.resolve_freeze_up_to(spec, blocks[0]) == blocks[0]


def test_a_stage_name_is_not_read_as_a_layer_prefix():
    # Xception's canonical stages end at block4; its Keras layers block5_* .. block12_* sit inside block3.
    spec = registry.get("xception")
    names = ["block1_conv1", "block5_sepconv1", "block13_sepconv1"]
    with pytest.raises(ValueError, match=r"not a stage of xception.*For its layers named block5_\*, pass the prefix "
                                         r"'block5_'"):
        freezing.resolve_up_to(spec, names, "block5")
    assert freezing.resolve_up_to(spec, names, "block5_") == 1


def test_finetune_with_a_stage_the_backbone_lacks_is_a_one_line_usage_error(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--backbone", "inception_v3", "--weights", "none",
                                      "--freeze-up-to", "block4", "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    assert ("--freeze-up-to 'block4' is not a stage of inception_v3; its stages are: stem, block1, block2, block3, "
            "head (default block2)") in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    assert not out.exists()  # refused before any data is read or file written


def _inspect(*args):
    result = CliRunner().invoke(cli, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_default_shows_the_plan_finetune_uses_and_none_freezes_nothing():
    spec = registry.get("resnet50")
    shown = _inspect("resnet50", "--image-size", "32", "--freeze-up-to", "default")
    assert shown["freeze_up_to"] == "block3"
    frozen = {layer["name"]: layer["frozen"] for layer in shown["layers"] if layer["params"]}
    assert all(frozen[n] for n in frozen if spec.stage_of(n) in ("stem", "block1", "block2", "block3"))
    assert not any(frozen[n] for n in frozen if n.startswith("conv5_") or spec.stage_of(n) is None)
    assert shown == _inspect("resnet50", "--image-size", "32", "--freeze-up-to", "block3")

    nothing = _inspect("resnet50", "--image-size", "32", "--freeze-up-to", "none")
    assert nothing["freeze_up_to"] is None and nothing["frozen_params"] == 0


def test_make_plan_default_is_what_a_finetune_plans_for_every_word():
    spec = registry.get("compact_cnn")
    model = models.build_classifier(spec.name, 3, 32, "none")
    default = freezing.make_plan(spec, model, "default")
    assert default.to_json() == freezing.make_plan(spec, model, spec.default_freeze_up_to).to_json()
    assert freezing.make_plan(spec, model, "none").to_json() == freezing.make_plan(spec, model, None).to_json()


@pytest.fixture(scope="module")
def resnet50_run(data_8_a_class, tmp_path_factory):
    """`tfl finetune --backbone resnet50` with nothing said about freezing: 12 images, 32 px, one epoch a stage."""
    data = data_8_a_class
    out = tmp_path_factory.mktemp("resnet50") / "run"
    args = ["--backbone", "resnet50", "--weights", "none", "--dataset", data, "--image-size", "32",
            "--head-epochs", "1", "--epochs", "1", "--batch-size", "4", "--limit-train", "12", "--val-split", "0.25",
            "--no-tensorboard", "--output-dir", str(out)]
    result = CliRunner().invoke(cli, ["finetune", *args])
    assert result.exit_code == 0, result.output
    return out, args


def test_resnet50_finetune_trains_conv5_x_by_default(resnet50_run):
    out, _ = resnet50_run
    plan = json.loads((out / "freeze_plan.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert plan["freeze_up_to"] == config["freeze_up_to"] == "block3"
    weighted = [layer for layer in plan["layers"] if layer["params"]]
    conv5 = [layer for layer in weighted if layer["name"].startswith("conv5_")]
    conv4 = [layer for layer in weighted if layer["name"].startswith("conv4_")]
    assert conv5 and not any(layer["frozen"] for layer in conv5)
    assert conv4 and all(layer["frozen"] for layer in conv4)
    assert config["stages"][-1]["freeze_boundary"] == "conv4_block6_out"
    # What the trainer really trained in stage 2: conv5_x (block4) and the new head, nothing below.
    with open(out / "history.csv", newline="") as f:
        finetune = [row for row in csv.DictReader(f) if row["stage"] == "finetune"]
    assert finetune and all(row["trainable"].split(";") == ["block4", "classifier"] for row in finetune)


def test_a_run_resumes_against_the_resolved_stage(resnet50_run, tmp_path):
    out, args = resnet50_run
    # The same stage spelled out compares equal: the run is finished, so the rerun resumes and only evaluates.
    result = CliRunner().invoke(cli, ["finetune", *args, "--freeze-up-to", "block3"])
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 2 (stage finetune)" in result.output

    # A run directory from before per-backbone defaults recorded block4; passing nothing now means block3: refused,
    # naming the setting (its recorded value and the resolved one), never compared as "default".
    old = tmp_path / "old"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("checkpoints"))
    os.symlink(out / "checkpoints", old / "checkpoints")  # ~100 MB a checkpoint: linked, and only read
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "freeze_up_to": "block4"}))
    before = (old / "config.json").read_text()
    result = CliRunner().invoke(cli, ["finetune", *[str(old) if a == str(out) else a for a in args]])
    assert result.exit_code == 2, result.output
    assert f"cannot resume {old}" in result.output
    assert re.search(r'freeze_up_to: "block4" -> "block3"', result.output), result.output
    assert (old / "config.json").read_text() == before
