"""The `tfl` command line: parses and validates options, calls the library (tfl.api), prints the result.

One module per family of commands: training (finetune and the recipes, generated from their options
dataclasses), models (backbones, inspect, inspect-checkpoint, convert), runs (evaluate, predict, report,
export), averaging (wise-ft, soup) and bench; core has the group, the exit codes and the shared output helpers.
"""

from __future__ import annotations

from tfl.tf_logging import quiet_tensorflow

quiet_tensorflow()  # before anything imports TensorFlow: its CPU-machine start-up notices stay out of the output

from tfl.cli import averaging, bench, models, runs, training  # noqa: E402,F401  (each registers its commands)
from tfl.cli.core import cli, describe_os_error  # noqa: E402,F401


def main():
    cli(prog_name="tfl")


if __name__ == "__main__":
    main()
