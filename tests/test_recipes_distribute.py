"""The multi-run recipes under MirroredStrategy over 2 logical CPUs give the numbers of one device: tfl dann,
multitask, self-train, pretext, compare, distill and forgetting, each run once with --devices 2 --batch-size 4 in a
child process and once here on one device with --batch-size 8 (the same global batch). tfl fewshot has no --devices
(it trains nothing through the strategy), so it is not here.

All but self-train run several jobs one after another in one process; each job asks for the strategy again, and a
second MirroredStrategy over the same devices used to collide with the first one's collectives (multitask's soft
arm after the hard arm, pretext's fine-tunes after the pretext run: "Shape mismatch in the collective instance
100"). distill loaded its teacher before its first job made the strategy, so --devices was refused (TensorFlow's
devices were already initialised); it now makes the strategy first. Dropout is 0. dann, multitask, self-train,
compare and forgetting run on the compact CNN from random weights, whose BatchNorm layers stay frozen above the
boundary (no --train-bn): what they check is the strategy's arithmetic, not a backbone's, and it builds and traces in
half the time of EfficientNet-Lite0. pretext and distill's student start the compact CNN from the teacher's weights
(--init-from), so they train as a pretrained backbone does: from random weights they train every layer, BN
included, and each replica would normalise over its own share of the batch."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tfl.cli import cli
from tiny_runs import ROOT, TIMEOUT, checkpoint_arrays, history, image_folder, largest_change

# Float sums in another order (the compact CNN's pretext run, on four rotated copies of each image: up to 1.1e-6);
# an epoch of training moves the weights by orders of magnitude more (MOVED).
TOLERANCE, MOVED = 2e-6, 1e-3
COMPACT = ["--backbone", "compact_cnn", "--weights", "none"]
COMMON = ["--image-size", "32", "--val-split", "0.25", "--lr", "0.01", "--dropout", "0", "--no-tensorboard"]


def recipes(tmp):
    """name -> (command, arguments but --batch-size/--devices/--output-dir, run directories under the output)."""
    three = image_folder(tmp / "shapes3", classes=("c0", "c1", "c2"), per_class=16)  # 36 train, 12 val, 12 test
    two = image_folder(tmp / "shapes2")
    taught = teacher(tmp, two)
    tasks = tmp / "tasks.json"
    tasks.write_text(json.dumps({"fine": {"c0": "c0", "c1": "c1", "c2": "c2"},
                                 "odd": {"c0": "no", "c1": "yes", "c2": "no"}}))
    return {
        "dann": ("dann", ["--dataset", three, "--target-shift", "texture", "--seeds", "1", "--limit-train", "20",
                          "--head-epochs", "2", "--domain-hidden", "16", "--head-hidden", "32", *COMPACT, *COMMON],
                 ["source_only/seed0", "dann/seed0"]),
        # soft after hard: another block, so gradients of another size in the second job of the process
        "multitask": ("multitask", ["--dataset", three, "--tasks", tasks, "--task-weight", "odd=0.5", "--arms",
                                    "hard,soft", "--soft-penalty", "0.1", "--head-epochs", "2", "--head-hidden", "16",
                                    *COMPACT, *COMMON],
                      ["hard/seed0", "soft/seed0"]),
        # threshold 0.26: the random compact CNN's top probability over 4 classes sits just above 1/4
        "self-train": ("self-train", ["--dataset", image_folder(tmp / "shapes4", classes=("c0", "c1", "c2", "c3")),
                                      "--label-fraction", "0.5", "--threshold", "0.26", "--rounds", "2",
                                      "--head-epochs", "2", *COMPACT, *COMMON],
                       ["."]),
        # the compact CNN from the teacher's weights (--init-from), above block2 with BN frozen, in the pretext run
        # and both fine-tunes: from random weights they would train every layer, BN included
        "pretext": ("pretext", ["--dataset", two, *COMPACT, "--init-from", taught / "model.keras",
                                "--pretext-epochs", "2", "--head-epochs", "1", "--epochs", "1", "--label-fraction",
                                "1", *COMMON],
                    ["pretext", "frac1/baseline", "frac1/pretext"]),
        # two arms: the probe on cached features, then tfl finetune's two stages above block3
        "compare": ("compare", ["--dataset", two, "--arms", "linear_probe,two_stage", *COMPACT, "--freeze-up-to",
                                "block3",
                                "--head-epochs", "1", "--epochs", "1", *COMMON],
                    ["linear_probe/frac1/seed0", "two_stage/frac1/seed0"]),
        # the student on cached teacher logits, then its labels-only baseline: the compact CNN started from the
        # teacher's weights (--init-from), so it trains as a pretrained student does, above block2 with BN frozen
        "distill": ("distill", ["--teacher", taught, "--dataset", two, "--student", "compact_cnn",
                                "--init-from", taught / "model.keras", "--head-epochs", "1", "--epochs", "1",
                                "--throughput-seconds", "0.01", *COMMON],
                    ["student", "labels_only"]),
        # replay's buffer rows in every batch, then ewc's Fisher and penalty; one epoch per task
        "forgetting": ("forgetting", ["--dataset", image_folder(tmp / "shapes4f", classes=("c0", "c1", "c2", "c3")),
                                      "--tasks", "0,1;2,3", "--strategies", "replay,ewc", "--memory", "4",
                                      "--ewc-lambda", "100", "--epochs", "1", *COMPACT, *COMMON],
                       ["replay", "ewc"]),
    }


def teacher(tmp, data):
    """distill's teacher: a one-device `tfl finetune` run directory (compact_cnn from scratch, one epoch)."""
    out = tmp / "teacher"
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, "--backbone", "compact_cnn", "--weights", "none",
                                      "--freeze-up-to", "none", "--head-epochs", "0", "--epochs", "1",
                                      "--batch-size", "8", *COMMON, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    return out


# The 2-replica runs, one after another in one child process (as a notebook would run them; TensorFlow's devices
# are configured once, for the first): each with its own cache directory; what each printed and its exit code.
CHILD = """
import json, os, sys
from click.testing import CliRunner
from tfl.cli import cli
todo, report = json.loads(sys.argv[1]), sys.argv[2]
done = {}
for name, (args, cache) in todo.items():
    os.environ["TFL_CACHE_DIR"] = cache
    result = CliRunner().invoke(cli, args)
    crash = result.exception if not isinstance(result.exception, SystemExit) else None
    done[name] = {"exit_code": result.exit_code, "output": result.output + (repr(crash) if crash else "")}
    with open(report, "w") as f:
        json.dump(done, f)
"""


@dataclasses.dataclass
class Ran:
    """One recipe's 2-replica run in the child: its exit code and what it printed (log and errors)."""

    returncode: int
    err: str

    def why(self) -> str:
        return f"exit {self.returncode}\n{self.err[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every recipe's 2-replica run in one child process; meanwhile the one-device references run in this
    process. Returns (tmp, {name: (run dirs, the child's Ran, reference result)})."""
    tmp = tmp_path_factory.mktemp("recipes-distribute")
    table = recipes(tmp)
    todo = {name: ([command, *map(str, args), "--batch-size", "4", "--devices", "2", "--output-dir",
                    str(tmp / "devices2" / name)], str(tmp / f"cache-{name}"))
            for name, (command, args, _) in table.items()}
    report = tmp / "child.json"
    env = {**{k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TFL_FAULT")}, "PYTHONPATH": ROOT}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(todo), str(report)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    references = {}
    for name, (command, args, _) in table.items():
        references[name] = CliRunner().invoke(cli, [command, *map(str, args), "--batch-size", "8",
                                                    "--output-dir", str(tmp / "devices1" / name)])
    printed, _ = child.communicate(timeout=TIMEOUT * len(table))
    done = read_json(report) if report.exists() else {}
    ran = {name: Ran(done[name]["exit_code"], done[name]["output"]) if name in done else
           Ran(child.returncode, f"the child stopped before this run:\n{printed[-3000:]}") for name in table}
    return tmp, {name: (table[name][2], ran[name], references[name]) for name in table}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def check_two_replicas_match_one(tmp, name, run_dirs, child, reference):
    """Both runs succeed, and every job's config, history and last checkpoint (weights and optimizer state) agree."""
    assert reference.exit_code == 0, reference.output
    assert child.returncode == 0, child.why()
    assert "2 replica(s)" in child.err and "Traceback" not in child.err
    for run in run_dirs:
        two, one = tmp / "devices2" / name / run, tmp / "devices1" / name / run
        config = read_json(two / "config.json")
        assert (config["replicas"], config["global_batch_size"], config["batch_size"]) == (2, 8, 4)
        assert (read_json(one / "config.json")["replicas"], read_json(one / "config.json")["global_batch_size"]) \
            == (1, 8)
        rows, expected = history(two), history(one)
        assert len(rows) == len(expected) >= 2
        for row, want in zip(rows, expected, strict=True):
            assert row.keys() == want.keys()
            for key, value in row.items():
                try:
                    assert float(value) == pytest.approx(float(want[key]), abs=2e-6), (run, row["epoch"], key)
                except ValueError:  # stage, trainable
                    assert value == want[key]
        last = len(rows)
        ours, theirs = checkpoint_arrays(two, last), checkpoint_arrays(one, last)
        assert ours.keys() == theirs.keys()
        worst = max(float(np.max(np.abs(ours[k].astype(np.float64) - theirs[k]))) for k in ours if ours[k].size)
        assert worst < TOLERANCE, (run, worst)
        # The last epoch trained (the optimizer state moves even where a stage restored its best weights).
        before = checkpoint_arrays(one, last - 1)
        common = {k: theirs[k] for k in theirs.keys() & before.keys() if theirs[k].shape == before[k].shape}
        assert largest_change(common, before, prefix="") > MOVED
    return tmp / "devices2" / name, tmp / "devices1" / name


def test_dann_over_two_replicas_matches_one_device(runs):
    tmp, by = runs
    two, one = check_two_replicas_match_one(tmp, "dann", *by["dann"])
    ours, theirs = read_json(two / "dann.json"), read_json(one / "dann.json")
    assert [r["arm"] for r in ours["runs"]] == ["source_only", "dann"]
    for run, want in zip(ours["runs"], theirs["runs"], strict=True):
        for key in ("source_test_accuracy", "target_test_accuracy", "val_domain_accuracy", "final_lambda"):
            assert 0.0 <= run[key] <= 1.0
            assert run[key] == pytest.approx(want[key], abs=1e-6), key
    assert ours["runs"][0]["final_lambda"] == 0.0 and ours["runs"][1]["final_lambda"] > 0.99
    assert ours["comparisons"] == theirs["comparisons"]
    assert os.path.getsize(two / "dann.png") > 1000 and (two / "dann.csv").exists()


def test_multitask_soft_after_hard_over_two_replicas_matches_one_device(runs):
    tmp, by = runs
    two, one = check_two_replicas_match_one(tmp, "multitask", *by["multitask"])
    ours, theirs = read_json(two / "multitask.json"), read_json(one / "multitask.json")
    assert [r["arm"] for r in ours["runs"]] == ["hard", "soft"]
    # soft sharing's second hidden layer on the compact CNN's 256 pooled features
    assert ours["runs"][1]["trainable_params"] - ours["runs"][0]["trainable_params"] == 256 * 16 + 16
    for run, want in zip(ours["runs"], theirs["runs"], strict=True):
        assert run["test_accuracy"].keys() == {"fine", "odd"}
        for task, accuracy in run["test_accuracy"].items():
            assert 0.0 <= accuracy <= 1.0 and accuracy == pytest.approx(want["test_accuracy"][task], abs=1e-6)
    with open(two / "multitask.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert os.path.getsize(two / "multitask.png") > 1000


def test_self_train_over_two_replicas_matches_one_device(runs):
    tmp, by = runs
    two, one = check_two_replicas_match_one(tmp, "self-train", *by["self-train"])
    ours, theirs = read_json(two / "self_training.json"), read_json(one / "self_training.json")
    assert [r["round"] for r in ours["rounds"]] == [0, 1, 2]
    for record, want in zip(ours["rounds"], theirs["rounds"], strict=True):
        # the same pseudo-labels: the same rows passed the threshold, per class
        assert (record["labeled"], record["pseudo_labeled"], record["selected"]["per_class"]) == \
            (want["labeled"], want["pseudo_labeled"], want["selected"]["per_class"])
        for key in ("val_accuracy", "test_accuracy"):
            assert 0.0 <= record[key] <= 1.0 and record[key] == pytest.approx(want[key], abs=1e-6)
    assert ours["rounds"][1]["pseudo_labeled"] > 0
    assert ours["metrics"]["test_accuracy"] == pytest.approx(theirs["metrics"]["test_accuracy"], abs=1e-6)
    assert (two / "model.keras").exists() and os.path.getsize(two / "self_training.png") > 1000


def test_pretext_and_its_fine_tunes_over_two_replicas_match_one_device(runs):
    tmp, by = runs
    two, one = check_two_replicas_match_one(tmp, "pretext", *by["pretext"])
    ours, theirs = read_json(two / "pretext.json"), read_json(one / "pretext.json")
    for key in ("test_accuracy", "test_loss", "val_accuracy"):
        assert ours["pretext"][key] == pytest.approx(theirs["pretext"][key], abs=2e-6), key
    assert [r["arm"] for r in ours["runs"]] == ["baseline", "pretext"]
    for run, want in zip(ours["runs"], theirs["runs"], strict=True):
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1e-6)
        assert run["train_examples"] == want["train_examples"] == 24
    assert (two / "backbone.keras").exists() and os.path.getsize(two / "pretext.png") > 1000
    # --init-from is a pretrained start: the pretext run and the baseline restore it, and train BN frozen
    assert [r["start"] for r in ours["runs"]] == ["model.keras", "model.keras"]
    for run in ("pretext", "frac1/baseline"):
        config = read_json(two / run / "config.json")
        assert config["init_from"].endswith("model.keras") and config["train_bn"] is False, run
        assert (two / run / "restore_report.json").exists(), run


def test_compare_arms_over_two_replicas_match_one_device(runs):
    tmp, by = runs
    two, one = check_two_replicas_match_one(tmp, "compare", *by["compare"])
    ours, theirs = read_json(two / "compare.json"), read_json(one / "compare.json")
    assert [r["arm"] for r in ours["runs"]] == ["linear_probe", "two_stage"]
    assert ours["runs"][0]["trainable_params"] < ours["runs"][1]["trainable_params"]
    for run, want in zip(ours["runs"], theirs["runs"], strict=True):
        assert (run["epochs"], run["train_examples"]) == (want["epochs"], want["train_examples"]) == (2, 24)
        for key in ("test_accuracy", "best_val_accuracy"):
            assert 0.0 <= run[key] <= 1.0 and run[key] == pytest.approx(want[key], abs=1e-6), key
    with open(two / "compare.csv") as f:
        assert [row["arm"] for row in csv.DictReader(f)] == ["linear_probe", "two_stage"]
    assert os.path.getsize(two / "compare.png") > 1000


def test_distill_student_and_baseline_over_two_replicas_match_one_device(runs):
    """The teacher loads before the first member's job: distill makes the strategy (the logical devices) first."""
    tmp, by = runs
    two, one = check_two_replicas_match_one(tmp, "distill", *by["distill"])
    ours, theirs = read_json(two / "distill.json"), read_json(one / "distill.json")
    assert [m["role"] for m in ours["members"]] == ["student", "labels_only"]
    assert ours["members"][0]["teacher_logits"] == "cached" and ours["members"][1]["teacher"] is None
    for member, want in zip(ours["members"], theirs["members"], strict=True):
        for key in ("test_accuracy", "test_loss", "val_accuracy"):
            assert member[key] == pytest.approx(want[key], abs=2e-6), (member["role"], key)
    assert [m["role"] for m in ours["models"]] == ["teacher", "student", "labels_only"]
    for model, want in zip(ours["models"], theirs["models"], strict=True):
        assert 0.0 <= model["test_accuracy"] <= 1.0
        assert (model["test_accuracy"], model["params"]) == (pytest.approx(want["test_accuracy"], abs=1e-6),
                                                             want["params"])
    # The student's distillation loss is not the baseline's cross-entropy: the teacher's logits were used.
    assert history(two / "student")[0]["train_loss"] != history(two / "labels_only")[0]["train_loss"]
    assert os.path.getsize(two / "distill.png") > 1000 and (two / "distill.csv").exists()


def test_forgetting_strategies_over_two_replicas_match_one_device(runs):
    tmp, by = runs
    two, one = check_two_replicas_match_one(tmp, "forgetting", *by["forgetting"])
    ours, theirs = read_json(two / "forgetting.json"), read_json(one / "forgetting.json")
    assert [r["strategy"] for r in ours["strategies"]] == ["replay", "ewc"]
    for run, want in zip(ours["strategies"], theirs["strategies"], strict=True):
        assert run["tasks"] == [[0, 1], [2, 3]] and np.shape(run["R"]) == (2, 2)
        assert run["R"][0][1] == 0.0  # class-IL: task 2's classes are masked out before it is trained
        assert np.allclose(run["R"], want["R"], atol=1e-6, rtol=0), run["strategy"]
        assert run["metrics"].keys() == want["metrics"].keys()
        for key, value in run["metrics"].items():
            if isinstance(value, float):
                assert value == pytest.approx(want["metrics"][key], abs=1e-6), key
    # replay mixed its buffer into task 2's batches; ewc's penalty added to task 2's loss: the two differ there.
    replay, ewc = history(two / "replay"), history(two / "ewc")
    assert (replay[0]["train_loss"], replay[0]["val_loss"]) == (ewc[0]["train_loss"], ewc[0]["val_loss"])
    assert replay[1]["train_loss"] != ewc[1]["train_loss"]
    for name in ("forgetting.png", "accuracy_curves.png"):
        assert os.path.getsize(two / name) > 1000, name
