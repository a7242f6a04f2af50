"""The command line's shape: one entry point three ways, options generated from the options dataclasses (a command
offers exactly what it uses, one spelling per concept), and exit codes by kind of failure."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

import click
import pytest
from click.testing import CliRunner

from tfl import api
from tfl.cli import cli
from tfl.cli.core import call
from tfl.cli.params import described_flags
from tfl.errors import Unavailable, UsageError
from tiny_runs import ROOT, TINY, run_here, start

ENV = {**os.environ, "PYTHONPATH": ROOT}


def _help(*argv) -> str:
    return subprocess.run([*argv, "--help"], capture_output=True, text=True, cwd=ROOT, env=ENV, check=True).stdout


def test_python_m_tfl_the_tfl_script_and_cli_py_print_the_same_help():
    module = _help(sys.executable, "-m", "tfl")
    shim = _help(sys.executable, os.path.join(ROOT, "cli.py"))
    assert "finetune" in module and "Usage: tfl" in module
    assert module == shim
    script = shutil.which("tfl", path=os.path.dirname(sys.executable))
    assert script, "the tfl console script is installed next to the interpreter"
    assert _help(script) == module


def _flags(command: str) -> set[str]:
    cmd = cli.get_command(click.Context(cli), command)
    return {opt for p in cmd.params if isinstance(p, click.Option) for opt in p.opts if opt.startswith("--")}


@pytest.mark.parametrize("name", sorted(api.COMMANDS))
def test_a_training_command_offers_exactly_its_options_class_minus_what_it_does_not_use(name):
    cls = api.COMMANDS[name].load("options")
    expected = described_flags(cls) | {"--json"}
    if "rules" not in getattr(cls, "unused", ()):
        expected |= {"--freeze", "--unfreeze"}
    offered = _flags(name) - {f"--no-{f[2:]}" for f in _flags(name)} - {"--frozen-backbone", "--no-baseline"}
    assert offered == expected
    params = {p.name for p in cli.get_command(click.Context(cli), name).params}
    assert not params & set(getattr(cls, "unused", ())), f"{name} offers options it ignores"


def test_one_spelling_per_concept():
    every = set().union(*(_flags(name) for name in api.COMMANDS))
    assert "--labeled-fraction" not in every and "--gradual" not in every
    assert {"--label-fraction", "--unfreeze-mode", "--unfreeze"} <= _flags("finetune")
    for name in ("finetune", "forgetting", "distill", "dann", "multitask", "advise", "self-train", "compare",
                 "pretext"):
        assert "--label-fraction" in _flags(name), name
    # --unfreeze is a layer rule everywhere; the mode has its own flag
    result = CliRunner().invoke(cli, ["finetune", "--unfreeze", "gradual", "--epochs", "-1"])
    assert result.exit_code == 2 and "--epochs" in result.output


def test_defaults_and_help_come_from_the_dataclass_fields():
    from tfl.recipes.finetune import FinetuneOptions

    cmd = cli.get_command(click.Context(cli), "finetune")
    by_name = {p.name: p for p in cmd.params}
    for field in dataclasses.fields(FinetuneOptions):
        if field.metadata.get("cli", True):
            param = by_name[field.name]
            assert param.help == field.metadata["help"], field.name
            if not isinstance(field.default, tuple):
                assert param.default == field.default, field.name


def test_a_usage_error_is_one_line_and_exit_2():
    result = CliRunner().invoke(cli, ["finetune", "--backbone", "nosuchnet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip().splitlines()[-1]]
    assert "unknown backbone 'nosuchnet'" in result.output


def test_call_maps_failures_to_exit_codes_and_reports_a_bug_with_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)

    def usage():
        raise UsageError("--x 3: must be < 2")

    def environment():
        raise Unavailable("no network")

    def bug():
        return {}["missing"]

    with pytest.raises(click.ClickException) as err:
        call(usage)
    assert err.value.exit_code == 2 and err.value.message == "--x 3: must be < 2"
    with pytest.raises(click.ClickException) as err:
        call(environment)
    assert err.value.exit_code == 1 and err.value.message == "no network"
    with pytest.raises(click.ClickException) as err:
        call(bug)
    assert err.value.exit_code == 1 and err.value.message.startswith("a bug in tfl: KeyError: 'missing'.")
    written = list(tmp_path.glob("tfl-bug-*.txt"))
    assert len(written) == 1 and str(written[0]) in err.value.message
    assert "Traceback" in written[0].read_text() and "def bug" not in err.value.message
    monkeypatch.setenv("TFL_DEBUG", "1")
    with pytest.raises(KeyError):
        call(bug)


def test_a_crash_inside_training_says_bug_names_its_traceback_and_keeps_the_last_checkpoint(data_8_a_class, tmp_path,
                                                                                           monkeypatch):
    data = data_8_a_class
    out = tmp_path / "run"
    args = ["--dataset", data, *TINY, "--output-dir", out, "--batch-size", "8", "--cache", "off", "--no-tensorboard"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the traceback goes (TMPDIR, read once a process)
    crashed = run_here(args, {"TFL_CACHE_DIR": str(tmp_path / "cache"), "TFL_FAULT": "crash-at-step:2:1"})
    assert crashed.returncode == 1, crashed.why()
    lines = [line for line in crashed.out.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "a bug in tfl: RuntimeError: TFL_FAULT crash-at-step:2:1" in lines[0], crashed.why()
    assert "Traceback" not in crashed.out
    written = list(tmp_path.glob("tfl-bug-*.txt"))
    assert len(written) == 1 and "RuntimeError" in written[0].read_text()
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())  # epoch 1 survives


def test_ctrl_c_names_the_default_run_directory_from_the_library_not_the_log(data_8_a_class, tmp_path):
    data = data_8_a_class
    args = ["--dataset", data, *TINY, "--batch-size", "8", "--cache", "off", "--no-tensorboard"]
    env = {"TFL_CACHE_DIR": str(tmp_path / "cache"), "TFL_FAULT": "interrupt-at-step:2:1"}
    child = start(args, env, cwd=tmp_path).wait()
    assert child.returncode == 130, child.why()
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    assert f"run the same command again with --output-dir {os.path.join('runs', runs[0].name)}" in child.err


def test_inspect_without_freeze_up_to_shows_the_plan_finetune_uses():
    import json

    from tfl.backbones import registry

    def plan(*extra):
        result = CliRunner().invoke(cli, ["inspect", "resnet50", "--image-size", "32", "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    default = plan()
    assert default == plan("--freeze-up-to", registry.get("resnet50").default_freeze_up_to)
    assert default["frozen_params"] > 0 and default["trainable_params"] > 0
    trained = {layer["stage"] for layer in default["layers"] if not layer["frozen"] and layer["params"]}
    assert "block4" in trained  # conv5_x trains in stage 2: block4 is not the default on ResNet50
    assert plan("--freeze-up-to", "none")["frozen_params"] == 0
