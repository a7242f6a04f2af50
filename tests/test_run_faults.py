"""What a careless or hostile user does to what a run left: a classes.json that no longer fits its model, a disk that
fills up or a kill during export, absurd --version values, SavedModels missing their weights, HDF5 names that are
not UTF-8, file names that are not UTF-8, one bad file in a predict list, a directory where --weights wants a file,
and TensorFlow's start-up noise in the commands that only read.

One tiny run (a 3-class conv net at 8 px, written as finetune writes a run) and one export of it serve the module;
the file-system faults are real: a child process with a file-size limit (ulimit -f), as on a full disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import tfl
from tfl.cli import cli
from tfl.checkpoints import read_checkpoint
from tfl.errors import UsageError
from tfl.serving import layout
from tfl.training import rundir

from tiny_runs import ROOT

CLASSES = ["a", "b", "c"]
SIZE = 8
NOISE = ("failed call to cuInit", "Could not find cuda drivers", "All log messages before absl::InitializeLog",
         "oneDNN custom operations are on")
# Runs cli.py in a child whose writes beyond LIMIT bytes fail (EFBIG, as ENOSPC on a full disk) or kill it.
LIMITED = ("import resource, signal, sys, runpy; mode, limit = sys.argv[1], int(sys.argv[2]); "
           "signal.signal(signal.SIGXFSZ, signal.SIG_DFL if mode == 'kill' else signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)); "
           "sys.argv = sys.argv[3:]; runpy.run_path(sys.argv[0], run_name='__main__')")
LIMIT = 16 * 1024  # the run's model.keras is only read; the export's saved_model.pb (~48 KB) is larger


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def write_run(path, classes=CLASSES):
    """A run directory as finetune leaves it, with a tiny seeded model (raw pixels in, logits out)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(len(classes), name="logits")(x))
    run = rundir.RunDir(str(path))
    run.write_json(rundir.CONFIG, {"dataset": str(path) + "-data", "backbone": "tiny", "image_size": SIZE})
    run.write_json(rundir.CLASSES, list(classes))
    run.save_model(model)
    return path


def image(path, value=100):
    Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("run_faults")


@pytest.fixture(scope="module")
def run(root):
    return write_run(root / "run")


@pytest.fixture(scope="module")
def export(run, root):
    return tfl.export(run, output=root / "exported", log=lambda *_: None)


@pytest.fixture(scope="module")
def photo(root):
    return image(root / "photo.png")


# -- classes.json against the model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c", "d", "e"]])
def test_a_classes_json_that_does_not_fit_the_model_is_refused_by_every_command(run, root, photo, tmp_path, names):
    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    (edited / "classes.json").write_text(json.dumps(names))
    expected = f"classes.json names {len(names)} classes but {edited / 'model.keras'} outputs 3"
    for args in (["predict", "--run", edited, photo], ["evaluate", "--run", edited], ["report", "--run", edited],
                 ["export", "--run", edited, "--output", tmp_path / "sm"],
                 ["export", "--run", edited, "--format", "tflite", "--output", tmp_path / "lite"]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "restore the run's own classes.json" in result.output, result.output
        assert "Traceback" not in result.output and "bug" not in result.output
    assert not (tmp_path / "sm").exists() and not (tmp_path / "lite").exists()  # no label file for the wrong model
    for call in (lambda: tfl.load_model(edited), lambda: tfl.predict([str(photo)], edited),
                 lambda: tfl.export(edited, output=tmp_path / "api")):
        with pytest.raises(UsageError, match=expected):
            call()
    assert tfl.load_model(run).output_shape == (None, 3)  # the run's own classes.json still loads


# -- export: the disk, kills, versions -----------------------------------------------------------------------------
def test_a_full_disk_during_saved_model_export_is_one_line_and_leaves_no_version(run, tmp_path):
    base = tmp_path / "served"
    proc = subprocess.run([sys.executable, "-c", LIMITED, "ignore", str(LIMIT), os.path.join(ROOT, "cli.py"),
                           "export", "--run", str(run), "--output", str(base)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "a bug in tfl" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (f"Error: cannot use {base / '1'}: File too large; the file-size limit (ulimit -f) is too low "
                         "for this file"), proc.stderr[-2000:]
    assert os.listdir(base) == []  # no version directory, no partial build folder


def test_the_next_export_removes_what_a_killed_export_left_and_nothing_else(run, tmp_path):
    base = tmp_path / "served"
    killed = subprocess.run([sys.executable, "-c", LIMITED, "kill", str(LIMIT), os.path.join(ROOT, "cli.py"),
                             "export", "--run", str(run), "--output", str(base)],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]  # killed mid-write, like SIGKILL
    left = os.listdir(base)
    assert len(left) == 1 and left[0].startswith(".tmp-1-"), left
    # Not tfl's, or not abandoned: a folder of the user's, a build of a live process, a recent one of an older tfl.
    live = f".tmp-7-0123abcd-pid{os.getpid()}@{socket.gethostname()}"
    for name in (".tmp-mine", live, ".tmp-8-89abcdef"):
        (base / name).mkdir()
    old = base / ".tmp-9-deadbeef"  # an older tfl's build folder, two days old
    old.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    logs = []
    assert tfl.export(run, output=base, log=logs.append) == str(base / "1")
    assert sorted(os.listdir(base)) == sorted(["1", ".tmp-mine", live, ".tmp-8-89abcdef"])
    assert sum("the partial folder of an interrupted export" in line for line in logs) == 2, logs


@pytest.mark.parametrize("version", ["99999999999999999999", str(2**63)])
def test_a_version_beyond_tf_servings_int64_is_a_usage_error(run, tmp_path, version):
    result = invoke("export", "--run", run, "--output", tmp_path / "served", "--version", version)
    assert result.exit_code == 2, result.output
    assert f"--version {version}: versions are integers from 1 to {2**63 - 1}" in result.output
    assert not (tmp_path / "served").exists()


def test_the_largest_version_is_accepted_and_none_is_guessed_above_it(tmp_path):
    assert layout.version_dir(str(tmp_path), 2**63 - 1) == str(tmp_path / str(2**63 - 1))
    (tmp_path / str(2**63 - 1)).mkdir()
    with pytest.raises(UsageError, match=f"holds version {2**63 - 1}, so the next would be above"):
        layout.version_dir(str(tmp_path), None)


# -- predict --saved-model on an incomplete export --------------------------------------------------------------------
@pytest.mark.parametrize("remove,missing", [("variables", "variables/variables.index"),
                                            ("variables/variables.data-00000-of-00001",
                                             "variables/variables.data-00000-of-00001")])
def test_an_export_missing_its_weights_is_named_by_predict(export, photo, tmp_path, remove, missing):
    copy = tmp_path / "1"
    shutil.copytree(export, copy)
    target = copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = invoke("predict", "--saved-model", copy, photo)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"Error: --saved-model {copy}: a SavedModel without {missing}"
        + (" holds no weights" if remove == "variables" else ": its weights are incomplete")
        + "; copy the whole version directory again, or export it again with `tfl export`"]
    inspected = invoke("inspect-checkpoint", copy)  # the same check, the same words
    assert inspected.exit_code == 2 and f"a SavedModel without {missing}" in inspected.output


# -- predict: file names and bad files ------------------------------------------------------------------------------
def test_predict_reads_a_file_whose_name_is_not_utf8(run, export, tmp_path):
    odd = image(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))  # legal on Linux: Latin-1 bytes
    name = os.fsdecode(odd)
    for source in (["--run", run], ["--saved-model", export]):
        result = invoke("predict", *source, "--json", name)
        assert result.exit_code == 0, result.output
        (entry,) = json.loads(result.stdout)
        assert entry["image"] == name and len(entry["top"]) == 3
        text = invoke("predict", *source, name)
        assert text.exit_code == 0 and text.stdout.splitlines()[0] == str(tmp_path / "caf\\xe9.png")


def test_one_bad_file_in_a_predict_list_is_named_and_the_others_predicted(run, export, photo, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    other = image(tmp_path / "other.png", 200)
    for source in (["--run", run], ["--saved-model", export]):
        result = invoke("predict", *source, "--json", photo, broken, other, notes)
        assert result.exit_code == 2, result.output
        entries = json.loads(result.stdout)
        assert [e["image"] for e in entries] == [str(p) for p in (photo, broken, other, notes)]
        assert [("top" in e, "error" in e) for e in entries] == [(True, False), (False, True), (True, False),
                                                                 (False, True)]
        err = result.stderr.strip().splitlines()
        assert err[0].startswith(f"{broken}: ") and err[1].startswith(f"{notes}: not an image file type")
        assert err[-1] == "Error: 2 of 4 images could not be predicted (named above); the other 2 were"
        assert "Traceback" not in result.output
    good, bad = tfl.predict([str(photo), str(broken)], run)  # the API: the same entries, nothing raised
    assert "top" in good and bad["error"].startswith("not a readable image")


# -- checkpoints: HDF5 names that are not UTF-8, --weights DIR -----------------------------------------------------
def _weights_h5(path):
    """A Keras 3 .weights.h5 whose layer group and one variable are named with bytes that are not UTF-8."""
    with h5py.File(path, "w") as f:
        variables = f.create_group("layers").create_group(b"dense\xff").create_group("vars")
        variables.create_dataset("0", data=np.ones((2, 3), np.float32))
        variables.create_dataset(b"1\xfe", data=np.zeros(3, np.float32))
    return path


def _legacy_h5(path):
    """A Keras 2 .h5 (layer_names / weight_names attributes) with such names."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"dense\xff"])
        group = f.create_group(b"dense\xff")
        group.attrs["weight_names"] = np.array([b"dense\xff/kernel\xfe:0"])
        group.create_group(b"dense\xff").create_dataset(b"kernel\xfe:0", data=np.ones((2, 3), np.float32))
    return path


def test_hdf5_names_that_are_not_utf8_are_read_as_escaped_text(tmp_path):
    weights, legacy = _weights_h5(tmp_path / "odd.weights.h5"), _legacy_h5(tmp_path / "odd.h5")
    assert {k: v.shape for k, v in read_checkpoint(weights).tensors.items()} == {
        "dense\\xff/vars/0": (2, 3), "dense\\xff/vars/1\\xfe": (3,)}
    assert {k: v.shape for k, v in read_checkpoint(legacy).tensors.items()} == {"dense\\xff/kernel\\xfe": (2, 3)}
    result = invoke("inspect-checkpoint", legacy)
    assert result.exit_code == 0, result.output
    assert "dense\\xff/kernel\\xfe  (2, 3)" in result.output
    # Keras' own loader (--weights of a Keras Applications backbone) cannot read them: refused by name.
    from tfl.backbones import registry

    with pytest.raises(UsageError, match=r"weights='.*odd\.h5' for backbone 'mobilenet': Keras cannot load this "
                                         r"file into it \(UnicodeDecodeError"):
        registry.get("mobilenet").build(input_shape=(32, 32, 3), weights=str(legacy))


def test_weights_given_a_directory_say_it_is_one_and_what_is_expected(tmp_path):
    from tfl.backbones import efficientnet_lite, registry, resnet

    for refuse in (lambda: registry.get("mobilenet").build(input_shape=(32, 32, 3), weights=str(tmp_path)),
                   lambda: resnet.weights_file("resnet18", str(tmp_path)),
                   lambda: efficientnet_lite.weights_file("efficientnet_lite0", str(tmp_path))):
        with pytest.raises(UsageError) as err:
            refuse()
        assert f"{str(tmp_path)!r}" in str(err.value) and "is a directory; " in str(err.value)
        assert "--init-from DIR" in str(err.value) and "no such file" not in str(err.value)


# -- start-up noise ----------------------------------------------------------------------------------------------------
def test_commands_that_only_read_start_quiet_also_with_a_users_log_level(run, photo, tmp_path):
    """TF_CPP_MIN_LOG_LEVEL=2 (a common setting) cannot hide TensorFlow's notices printed before its logging starts,
    nor (on a machine without a GPU driver) the cuInit failure: tfl filters them for every command."""
    weights = _weights_h5(tmp_path / "odd.weights.h5")
    commands = (["predict", "--run", str(run), str(photo)], ["inspect-checkpoint", str(weights)],
                ["convert", str(weights), "--backbone", "mobilenet", "--image-size", "32", "--output", str(tmp_path / "x.keras")])
    children = [subprocess.Popen([sys.executable, os.path.join(ROOT, "cli.py"), *args], cwd=ROOT,
                                 env=child_env(TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for args in commands]
    for args, child in zip(commands, children):
        _, err = child.communicate(timeout=300)
        assert "Traceback" not in err, err
        assert child.returncode == (2 if args[0] == "convert" else 0), err  # convert: the file fits no mobilenet
        for notice in NOISE:
            assert notice not in err, (args[0], err)
