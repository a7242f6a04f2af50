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
A TF_CPP_MIN_LOG_LEVEL set by the user turns all of this off: they asked for TensorFlow's own logging.
TF_ENABLE_ONEDNN_OPTS is not touched either: it changes the kernels, not just the notice.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

_NOISE = (
    re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(r"I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\..*"),
)
_NO_DRIVER_NOISE = re.compile(r"I\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your "
                              r"machine, GPU will not be used\.")


def has_nvidia_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def is_noise(line: str, driver: bool) -> bool:
    line = line.rstrip("\n")
    return any(p.fullmatch(line) for p in _NOISE) or (not driver and bool(_NO_DRIVER_NOISE.fullmatch(line)))


def quiet_tensorflow() -> None:
    """Set the log level default and filter the import's notices (see the module docstring). Idempotent."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    driver = has_nvidia_driver()
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2" if driver else "3"
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport(driver))


class _QuietImport:
    """A meta-path hook that finds nothing itself: it wraps the real loader of the first `import tensorflow`."""

    def __init__(self, driver: bool):
        self.driver = driver

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and so the real finders answer the lookup below
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module
        driver = self.driver

        def exec_module(module):
            try:
                with _FilteredStderr(driver):
                    run(module)
            finally:
                del spec.loader.exec_module  # back to the class's own method

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
