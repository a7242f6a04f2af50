"""Tiny `cli.py finetune` (or another recipe's) runs in child processes, for tests/test_resume.py,
tests/test_distribute.py and tests/test_recipes_distribute.py.

Child processes because logical devices and the multi-worker cluster must be set up in a fresh TensorFlow,
and because a run killed with SIGKILL must not take the test process with it.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds: a hung collective or a stuck child fails the test instead of hanging CI (not a speed bound)

# 24 train / 8 val / 8 test images at 32 px, the random-init compact CNN (a tiny run in about half the time of
# MobileNet's), stage 2 trains block3, the top conv and the head.
TINY = ["--backbone", "compact_cnn", "--weights", "none", "--image-size", "32", "--head-epochs", "1", "--epochs", "2",
        "--val-split", "0.25", "--freeze-up-to", "block2", "--lr", "0.01", "--backbone-lr", "0.01"]


def image_folder(root, classes=("circle", "square"), per_class=16, size=32):
    """Bright discs vs green squares on noise: ROOT/train/<class>/*.png and ROOT/test/<class>/*.png."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", per_class), ("test", per_class // 4)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                img = rng.randint(0, 60, (size, size, 3))
                if c % 2 == 0:
                    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / (3 + c)) ** 2] = 230
                else:
                    img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = [40, 200, 90]
                Image.fromarray(img.astype("uint8")).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


@dataclasses.dataclass
class Child:
    proc: subprocess.Popen
    out: str | None = None
    err: str | None = None

    def wait(self) -> "Child":
        if self.out is None:
            try:
                self.out, self.err = self.proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                pytest.fail(f"child {self.proc.args} did not finish in {TIMEOUT}s")
        return self

    @property
    def returncode(self) -> int:
        return self.wait().proc.returncode

    def why(self) -> str:
        return f"exit {self.proc.returncode}\n{self.out[-3000:]}\n{self.err[-3000:]}"


def start(args, env: dict | None = None, command: str = "finetune", cwd=ROOT) -> Child:
    """`python cli.py COMMAND ARGS` (default: finetune) in the background, in `cwd` (default: the checkout)."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TFL_FAULT")}
    child_env.update(env or {})
    # SIGINT back to its default in the child: a test suite started in the background by a non-interactive shell
    # (`make test &`, as CI may) runs with SIGINT ignored, the child would inherit that, and Python would then never
    # turn a Ctrl-C into KeyboardInterrupt.
    child_env["PYTHONPATH"] = ROOT  # the checkout's tfl, also when cwd is elsewhere
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cli.py"), command, *map(str, args)], cwd=cwd,
                            env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return Child(proc)


@dataclasses.dataclass
class Here:
    """A run in this process, through the command line as a child would run it: for a reference nobody kills or
    stops, it gives the same files without a child's start-up (TensorFlow's import and first traces, ~5 s of CPU)."""

    returncode: int
    out: str
    err: str = ""

    def wait(self) -> "Here":
        return self

    def why(self) -> str:
        return f"exit {self.returncode}\n{self.out[-3000:]}"


def run_here(args, env: dict | None = None, command: str = "finetune") -> Here:
    """`tfl COMMAND ARGS` in this process, with `env` set for its duration (TF_CONFIG and TFL_FAULT unset, as
    `start` leaves them)."""
    from click.testing import CliRunner

    from tfl.cli import cli

    with pytest.MonkeyPatch.context() as patch:
        for name in ("TF_CONFIG", "TFL_FAULT"):
            patch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        result = CliRunner().invoke(cli, [command, *map(str, args)])
    crash = result.exception if not isinstance(result.exception, SystemExit) else None
    return Here(result.exit_code, result.output + (repr(crash) if crash else ""))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def checkpoint_arrays(run_dir, epoch: int) -> dict:
    with np.load(os.path.join(run_dir, "checkpoints", f"ckpt-{epoch:04d}.npz")) as archive:
        return {k: archive[k] for k in archive.files if k != "state"}


def history(run_dir) -> list[dict]:
    """history.csv without the wall-clock column."""
    with open(os.path.join(run_dir, "history.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def largest_change(a: dict, b: dict, prefix: str = "model.") -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a if k.startswith(prefix) and a[k].size)


# -- interrupting a run in-process (exact-resume tests) --------------------------------------------------------
class Stop(Exception):
    pass


def stop_at(epoch, stage=None):
    """A trainer callback that stops the run right after the checkpoint of `epoch` (1-based; of `stage` when
    given): monkeypatch tfl.training.trainer.default_callbacks to return [stop_at(...)]."""
    from tfl.training import trainer

    class StopAt(trainer.Callback):
        def on_epoch_end(self, result):
            if result.epoch == epoch and stage in (None, result.stage):
                raise Stop

    return StopAt()


def history_rows(run_dir):
    """history.csv without its timing column."""
    with open(os.path.join(run_dir, "history.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def stop_then_resume(recipe, opts, stage: str, run_dir: str, monkeypatch):
    """A pooled recipe's first run three ways: `recipe(opts("reference"))` uninterrupted; `recipe(opts("run"))`
    stopped after the first epoch of `stage`; the same rerun. Returns (the reference's runs[0], the checkpoint
    left at the stop in `run_dir`, the rerun's runs[0], the rerun's log lines)."""
    from tfl.training import checkpoint, trainer

    quiet = lambda *_: None  # noqa: E731
    reference = recipe(opts("reference"), log=quiet)["runs"][0]
    monkeypatch.setattr(trainer, "default_callbacks", lambda: [stop_at(1, stage)])
    with pytest.raises(Stop):
        recipe(opts("run"), log=quiet)
    snapshot = checkpoint.load_latest(os.path.join(run_dir, "checkpoints"), log=quiet)
    monkeypatch.setattr(trainer, "default_callbacks", lambda: [])
    lines = []
    resumed = recipe(opts("run"), log=lines.append)["runs"][0]
    return reference, snapshot, resumed, lines


def freeze_defaults_rule():
    """scripts/freeze_defaults.py as a module: the rule that chose each backbone's default --freeze-up-to (how the
    specs' data was chosen, not something tfl runs)."""
    import importlib.util

    loader = importlib.util.spec_from_file_location("freeze_defaults", os.path.join(ROOT, "scripts", "freeze_defaults.py"))
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module
