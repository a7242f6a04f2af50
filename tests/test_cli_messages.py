"""What a newcomer reads: no TensorFlow start-up noise on a CPU machine, help for every option, CLI names in messages."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest

from tfl.cli import cli
from tfl.tf_logging import _FilteredStderr, has_nvidia_driver, is_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICES = ("All log messages before absl::InitializeLog", "oneDNN custom operations are on", "failed call to cuInit",
           "cpu_feature_guard")


def test_a_command_that_runs_tensorflow_prints_no_start_up_notices():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "inspect", "mobilenet", "--num-classes",
                             "2", "--image-size", "32"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "trainable params" in result.stdout
    for notice in NOTICES:
        assert notice not in result.stderr, result.stderr
    if not has_nvidia_driver():
        assert "Could not find cuda drivers" not in result.stderr


def test_the_filter_drops_exactly_the_notices(capfd):
    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1796166344.466809    1730 port.cc:153] oneDNN custom operations are on. You may see slightly "
        "different numerical results due to floating-point round-off errors from different computation orders. To "
        "turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n",
        "I0000 00:00:1796166344.472367    1730 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
        "will not be used.\n",
        "E0000 00:00:1796166349.382500    1730 some_op.cc:52] a real error\n",
        "W0000 00:00:1796166349.382500    1730 cuda_driver.cc:52] a real GPU warning\n",
        "a Python warning printed while importing\n",
    ]
    with _FilteredStderr(driver=False):
        os.write(2, "".join(lines).encode())
    err = capfd.readouterr().err
    assert err == "".join(lines[3:])
    # With an NVIDIA driver present, "could not find cuda drivers" is a real problem and stays.
    assert not is_noise(lines[2], driver=True) and is_noise(lines[2], driver=False)
    assert is_noise(lines[1], driver=True)


def test_tensorflows_retracing_advice_is_dropped_and_its_other_warnings_kept():
    """tfl traces a new step function per stage, split and job on purpose; the CLI (which imports tfl.cli, so
    quiet_tensorflow ran) drops TensorFlow's advice about it and nothing else of TensorFlow's logger."""
    import logging

    import tensorflow as tf

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    tf.get_logger().addHandler(handler)
    try:
        tf.get_logger().warning("5 out of the last 5 calls to <function Trainer._distributed.<locals>.distributed at "
                                "0x7f> triggered tf.function retracing. Tracing is expensive and ...")
        tf.get_logger().warning("a real TensorFlow warning")
    finally:
        tf.get_logger().removeHandler(handler)
    assert seen == ["a real TensorFlow warning"]


def _help_of(command: str) -> dict[str, str]:
    ctx = click.Context(cli)
    cmd = cli.get_command(ctx, command)
    return {opt: (param.help or "") for param in cmd.params if isinstance(param, click.Option) for opt in param.opts}


@pytest.mark.parametrize("command, option", [("evaluate", "--data-dir"), ("evaluate", "--json"),
                                             ("predict", "--top-k"), ("predict", "--trust-saved-model")])
def test_options_have_help(command, option):
    assert _help_of(command)[option].strip()


def test_every_option_of_every_command_has_help():
    ctx = click.Context(cli)
    missing = [f"{name} {param.opts[0]}" for name in cli.list_commands(ctx)
               for param in cli.get_command(ctx, name).params
               if isinstance(param, click.Option) and not param.help]
    assert missing == []


def test_library_messages_name_command_line_options():
    # The library's user-facing messages are read on the command line: they say --skip-bad-images and --unsafe.
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tfl")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                offenders += [f"{name}: {needle}" for needle in ("pass skip_bad_images=True", "pass unsafe=True")
                              if needle in text]
    assert offenders == []
