"""Where exports go on disk: BASE/<integer version>/ as TF Serving reads it, each version written whole or not at all.

TF Serving watches BASE and loads the highest integer-named subdirectory, so a half-written version directory
would be loaded half-written. Exports are therefore built in a hidden sibling (`.tmp-*`, a name TF Serving
ignores) and renamed into place, and an existing version is never overwritten.

The sibling's name says who builds it: `.tmp-<version>-<random>-pid<pid>@<host>`. An export killed mid-way (SIGKILL,
a power cut) leaves it behind; the next export into the same base directory removes such folders when their owner
is gone (this host, no such process) or they are older than STALE_AFTER (no export takes that long). Nothing
else is touched: folders of that form only, and the unnamed `.tmp-<version>-<random>` of older tfl versions only
after STALE_AFTER.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
import uuid
from typing import Callable

from tfl.errors import UsageError
from tfl.training.rundir import CALIBRATION

DEFAULT_ROOT = "saved_models"
LABELS_FILE = "labels.txt"
SAVED_MODEL_FILE = "saved_model.pb"


def default_base(run_path: str, suffix: str = "", root: str = DEFAULT_ROOT) -> str:
    """saved_models/<run directory's name><suffix>."""
    name = os.path.basename(os.path.normpath(os.path.abspath(run_path)))
    return os.path.join(root, name + suffix)


MAX_VERSION = 2**63 - 1  # TF Serving reads version directory names as int64 and skips any larger one


def existing_versions(base: str) -> list[int]:
    if not os.path.isdir(base):
        return []
    return sorted(int(name) for name in os.listdir(base)
                  if name.isascii() and name.isdigit() and os.path.isdir(os.path.join(base, name)))


def version_dir(base: str, version: int | None) -> str:
    """BASE/<version>, or BASE/<highest existing + 1> when version is None; refuses one that exists."""
    if os.path.exists(base) and not os.path.isdir(base):
        raise UsageError(f"--output {base!r} is a file; give a directory (the model's base directory)")
    if version is None:
        version = max(existing_versions(base), default=0) + 1
        if version > MAX_VERSION:
            raise UsageError(f"{base} holds version {version - 1}, so the next would be above {MAX_VERSION}, the "
                             "largest version TF Serving reads (int64); pass --version N with a free N below that, "
                             "or choose another --output")
    elif isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise UsageError(f"--version {version!r}: versions are integers from 1 to {MAX_VERSION} (TF Serving reads "
                         "them as int64 and loads the highest); pick one in that range")
    path = os.path.join(base, str(version))
    if os.path.exists(path):
        raise UsageError(f"{path} already exists; pick another --version (next free: "
                         f"{max(existing_versions(base), default=0) + 1}) or remove it")
    return path


STALE_AFTER = 24 * 3600  # seconds: a build folder this old is abandoned whoever made it
_OWNED_TMP = re.compile(r"\.tmp-\d+-[0-9a-f]{8}-pid(?P<pid>\d+)@(?P<host>[^/]+)")
_OLD_TMP = re.compile(r"\.tmp-\d+-[0-9a-f]{8}")  # tfl before build folders named their owner


def _tmp_name(version: str) -> str:
    return f".tmp-{version}-{uuid.uuid4().hex[:8]}-pid{os.getpid()}@{socket.gethostname()}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, under another user
        return False
    return False


def remove_stale_builds(base: str) -> list[str]:
    """Delete the build folders that interrupted exports left in `base` (see the module's docstring)."""
    if not os.path.isdir(base):
        return []
    removed, host, now = [], socket.gethostname(), time.time()
    for name in sorted(os.listdir(base)):
        folder = os.path.join(base, name)
        owned, old = _OWNED_TMP.fullmatch(name), _OLD_TMP.fullmatch(name)
        if not (owned or old) or os.path.islink(folder) or not os.path.isdir(folder):
            continue
        try:
            age = now - os.stat(folder).st_mtime
        except FileNotFoundError:  # another export removed it first
            continue
        gone = bool(owned) and owned["host"] == host and _process_gone(int(owned["pid"]))
        if gone or age > STALE_AFTER:
            shutil.rmtree(folder, ignore_errors=True)
            if not os.path.exists(folder):
                removed.append(folder)
    return removed


def write_version(path: str, build: Callable[[str], None], log=None) -> None:
    """Run build(tmp) on an empty directory beside `path`, then rename it to `path` in one step. First remove what
    interrupted exports left beside it (remove_stale_builds), saying so through `log`."""
    base = os.path.dirname(path) or "."
    os.makedirs(base, exist_ok=True)
    for folder in remove_stale_builds(base):
        if log:
            log(f"removed {folder}, the partial folder of an interrupted export")
    # os.mkdir honours the umask (mkdtemp would make it 0700, unreadable for a server running as another user).
    tmp = os.path.join(base, _tmp_name(os.path.basename(path)))
    os.mkdir(tmp)
    try:
        build(tmp)
        if os.path.exists(path):  # another export took this version while we were building
            raise UsageError(f"{path} appeared while exporting; pick another --version")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file_version(path: str, run, labels: str, name: str, content: bytes, log=None) -> None:
    """A version directory of a one-file format (TFLite, ONNX): the model file `name`, labels.txt and, for a
    calibrated run, its calibration.json; written as write_version writes every export."""
    def build(tmp):
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(content)
        with open(os.path.join(tmp, LABELS_FILE), "w", encoding="utf-8") as f:
            f.write(labels)
        write_calibration(run, tmp)

    write_version(path, build, log)


# What a writer that is not Python's (TensorFlow's file system layer) says when the disk refuses: its messages end
# in the C library's text for the errno, which is all that is left of it.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def disk_error(message: str, path: str) -> OSError | None:
    """The OSError (errno, text, `path`) a file-system failure reported as `message` stands for; None if it is not
    one. So a full disk under TensorFlow's writer reads like one under Python's (one line, exit 1)."""
    for number in _DISK_ERRNOS:
        if os.strerror(number) in message:
            return OSError(number, os.strerror(number), path)
    return None


def labels_text(class_names) -> str:
    """One class name per line, line i = class index i; names must survive that round trip."""
    for name in class_names:
        if not isinstance(name, str) or "\n" in name or "\r" in name:
            raise UsageError(f"class name {name!r} cannot be written one per line to {LABELS_FILE}; "
                             "rename the class (folder) and train again")
    return "".join(name + "\n" for name in class_names)


def resolve_saved_model(path: str) -> str:
    """A SavedModel directory, or a base directory whose highest version is used (as TF Serving does)."""
    if os.path.isfile(os.path.join(path, SAVED_MODEL_FILE)):
        return path
    versions = existing_versions(path)
    if versions and os.path.isfile(os.path.join(path, str(versions[-1]), SAVED_MODEL_FILE)):
        return os.path.join(path, str(versions[-1]))
    where = f" or in its highest version {versions[-1]}/" if versions else ""
    raise UsageError(f"--saved-model {path!r}: no {SAVED_MODEL_FILE} there{where}; give a directory written by "
                     "`tfl export --format saved_model`")


# -- a calibrated run's temperature (tfl.calibration) in an export ---------------------------------------------------
def scaled(logits, temperature: float):
    """logits / T in the serving graph; an uncalibrated run's graph (T = 1) stays as it was."""
    return logits if temperature == 1.0 else logits / temperature


def write_calibration(run, folder: str) -> None:
    """Copy the run's calibration.json (its temperature, how it was fitted, ECE before and after) into `folder`
    of the export; nothing for an uncalibrated run."""
    if run.calibrated():
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(run.file(CALIBRATION), os.path.join(folder, CALIBRATION))


def describe_temperature(run) -> str:
    """", calibrated: T = 1.53" (and the TTA mode and the abstain threshold) for a log line; "" for an uncalibrated
    run."""
    if not run.calibrated():
        return ""
    threshold, tta = run.threshold(), run.tta()
    return f", calibrated: T = {run.temperature():.4g}" + ("" if tta is None else f", TTA {tta}") + (
        "" if threshold is None else f", confident when the top probability >= {threshold:.4g}")


def confident(probabilities, threshold: float | None) -> dict:
    """{"confident": top probability >= threshold} in the serving graph (bool [N]); nothing without a threshold."""
    if threshold is None:
        return {}
    import tensorflow as tf

    return {"confident": tf.reduce_max(probabilities, axis=-1) >= tf.constant(threshold, tf.float32)}


# -- the serving graph every format exports ---------------------------------------------------------------------------
LOGITS = "logits"
PROBABILITIES = "probabilities"
CONFIDENT = "confident"

# Keras dtype policies that compute in a half precision (tfl.dtype_policy.POLICY's values, and plain half dtypes).
_HALF = {"mixed_bfloat16", "mixed_float16", "bfloat16", "float16"}


def float32_model(model):
    """`model` computing in float32: itself when every layer already does, else a copy with the same weights.

    A run trained with --mixed-precision bf16/fp16 holds float32 variables but computes in the half precision; its
    graph has bfloat16 Conv2D and Relu that TFLite's builtin ops refuse (a ConverterError asking for FLEX_OPS) and that
    ONNX runtimes mostly lack. The copy is the same model config with every half-precision dtype policy replaced by
    float32, rebuilt, then given the original's weights (float32 already, so copied exactly)."""
    import keras

    from tfl.trusted_layers import custom_objects

    config = keras.saving.serialize_keras_object(model)
    if not _to_float32(config):
        return model
    copy = keras.saving.deserialize_keras_object(config, custom_objects=custom_objects())
    copy.set_weights(model.get_weights())
    return copy


def _to_float32(node) -> int:
    """Rewrite, in place, every half-precision dtype policy in a serialized Keras config to float32; how many."""
    changed = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "dtype" and isinstance(value, str) and value in _HALF:
                node[key] = "float32"
                changed += 1
            elif (key == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy"
                  and value.get("config", {}).get("name") in _HALF):
                value["config"]["name"] = "float32"
                changed += 1
            else:
                changed += _to_float32(value)
    elif isinstance(node, list):
        changed += sum(_to_float32(item) for item in node)
    return changed


def serving_outputs(model, temperature: float = 1.0, threshold: float | None = None, tta: str | None = None):
    """The serving graph of every export format, as a function of raw pixels: images float32 [N, S, S, 3], 0-255
    RGB at the model's size -> {"logits": raw [N, C], "probabilities": softmax(logits / temperature) [N, C]} and,
    with a threshold, "confident": top probability >= threshold (bool [N]). With a kept TTA mode (RunDir.tta())
    the logits are the mean over its views, through tfl.tta.tta_logits as evaluation computes them.

    One function so a change to what a served model computes lands in SavedModel, TFLite and ONNX at once. It
    computes in float32 whatever precision the run trained in (float32_model); a format exposes the outputs it
    names (SavedModel and TFLite leave out the raw logits)."""
    import tensorflow as tf

    from tfl.tta import tta_logits  # TensorFlow: this module stays light

    net = float32_model(model)

    def outputs(images):
        logits = tta_logits(net, images, tta)
        probabilities = tf.nn.softmax(scaled(logits, temperature), axis=-1)
        return {LOGITS: logits, PROBABILITIES: probabilities, **confident(probabilities, threshold)}

    return outputs
