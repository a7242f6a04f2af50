"""TensorFlow's start-up lines on a machine without a GPU, which newcomers read as errors, kept out of tfl's output.

On a CPU-only machine `import tensorflow` prints, before its logging is even set up (so TF_CPP_MIN_LOG_LEVEL cannot
silence them), absl's "All log messages before absl::InitializeLog() ..." notice, the oneDNN notice ("oneDNN custom
operations are on ...") and "Could not find cuda drivers on your machine"; the first op then logs "failed call to
cuInit: ... UNKNOWN ERROR (303)" at ERROR level. The CLI calls quiet_tensorflow() before anything imports
TensorFlow:
- TF_CPP_MIN_LOG_LEVEL defaults to 2 (warnings and errors only); to 3 only when the machine has no NVIDIA driver at
  all (no /proc/driver/nvidia, no /dev/nvidiactl), where the cuInit failure is certain and means nothing. With a
  driver present, GPU errors stay visible. CUDA_VISIBLE_DEVICES is left alone: setting it would not stop the cuInit
  call (measured with TF 2.21) and would hide a GPU that exists.
- While `import tensorflow` runs, file descriptor 2 goes to a temporary file; afterwards every line is copied to
  stderr except exactly those start-up notices (the cuda-drivers line only when there is no driver).
A TF_CPP_MIN_LOG_LEVEL set by the user is kept as it is. 0 turns all of this off (they asked for every line of
TensorFlow's logging); any higher level (the common `export TF_CPP_MIN_LOG_LEVEL=2`) hides INFO, which these
notices are but cannot obey, so they are still filtered. Below 3 TensorFlow would then print the cuInit failure at
the first op: without a driver, the GPU list is read inside the filtered window, so that certain and meaningless
line is dropped there too (with a driver it stays: a real GPU problem).
TF_ENABLE_ONEDNN_OPTS is not touched either: it changes the kernels, not just the notice.

And one warning in the run's log: "5 out of the last 5 calls to <function ...> triggered tf.function retracing".
tfl makes a new step function for each stage, split and job on purpose (each traced once); TensorFlow counts those
traces together and advises on code the user did not write, so the CLI drops that warning (RetracingFilter).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile

_NOISE = (
    re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(r"I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\..*"),
)
_NO_DRIVER_NOISE = (
    re.compile(r"I\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not "
               r"be used\."),
    re.compile(r"E\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*\(303\)"),
)


def has_nvidia_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def is_noise(line: str, driver: bool) -> bool:
    line = line.rstrip("\n")
    return any(p.fullmatch(line) for p in _NOISE) or (not driver and any(p.fullmatch(line) for p in _NO_DRIVER_NOISE))


def _level(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0  # TensorFlow reads what is not a number as 0


class RetracingFilter(logging.Filter):
    """Drops TensorFlow's "... triggered tf.function retracing" warning (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def quiet_tensorflow() -> None:
    """Set the log level default and filter the import's notices (see the module docstring). Idempotent."""
    tf_logger = logging.getLogger("tensorflow")  # the logger TensorFlow's Python side writes to
    if not any(isinstance(f, RetracingFilter) for f in tf_logger.filters):
        tf_logger.addFilter(RetracingFilter())
    if "tensorflow" in sys.modules:
        return
    driver = has_nvidia_driver()
    given = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if given is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2" if driver else "3"
    elif _level(given) <= 0:
        return
    level = _level(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport(driver, probe_gpus=not driver and level < 3))


class _QuietImport:
    """A meta-path hook that finds nothing itself: it wraps the real loader of the first `import tensorflow`.

    It stays in place until that import runs: a bare importlib.util.find_spec("tensorflow") (a library asking
    whether TensorFlow is installed) must not use it up. probe_gpus: read the GPU list inside the filtered window
    (see the module docstring)."""

    def __init__(self, driver: bool, probe_gpus: bool = False):
        self.driver = driver
        self.probe_gpus = probe_gpus

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        import importlib.util

        sys.meta_path.remove(self)  # so the real finders answer the lookup below
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module
        hook = self

        def exec_module(module):
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)  # the import is running: the hook's work is done
            try:
                with _FilteredStderr(hook.driver):
                    run(module)
                    if hook.probe_gpus:
                        try:
                            module.config.list_physical_devices("GPU")
                        except Exception:  # noqa: BLE001 - a probe only; the first op meets the same problem
                            pass
            finally:
                spec.loader.__dict__.pop("exec_module", None)  # back to the class's own method

        spec.loader.exec_module = exec_module
        return spec


class _FilteredStderr:
    def __init__(self, driver: bool):
        self.driver = driver

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.capture = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self.capture.fileno(), 2)

    def __exit__(self, *exc):
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        self.capture.seek(0)
        kept = [line for line in self.capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not is_noise(line, self.driver)]
        self.capture.close()
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
        return False
