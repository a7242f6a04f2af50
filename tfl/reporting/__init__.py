"""Reporting for tfl runs: figures (matplotlib), TensorBoard events, the report of a run on a split.

    from tfl.reporting import report_run, format_report, TensorBoardCallback, write_curves

Imports are lazy so `import tfl.reporting` pays for neither matplotlib nor TensorFlow.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "write_curves": "tfl.reporting.figures", "read_history_csv": "tfl.reporting.figures",
    "write_confusion_matrix": "tfl.reporting.figures", "write_misclassified_grid": "tfl.reporting.figures",
    "write_reliability": "tfl.reporting.figures",
    "TensorBoardCallback": "tfl.reporting.tensorboard", "read_scalars": "tfl.reporting.tensorboard",
    "read_text": "tfl.reporting.tensorboard", "read_plugin_tags": "tfl.reporting.tensorboard",
    "report_run": "tfl.reporting.report", "format_report": "tfl.reporting.report",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tfl.reporting' has no attribute {name!r}")
