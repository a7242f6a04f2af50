"""Results tables: columns as data, widths from the cells, missing values as '-'."""

from __future__ import annotations

from tfl.recipes import compare, forgetting, self_training
from tfl.reporting.table import Column, format_table


def test_columns_align_to_their_widest_cell_and_a_missing_value_prints_as_a_dash():
    rows = [{"arm": "scratch", "acc": 0.5, "n": 1200}, {"arm": "lp", "acc": None, "n": 3}]
    text = format_table([Column("arm", "arm"), Column("acc", "acc", ".4f"), Column("n", "n", ",")], rows,
                        notes=["a note"])
    assert text.splitlines() == ["arm         acc      n",
                                 "scratch  0.5000  1,200",
                                 "lp            -      3",
                                 "a note"]


def test_recipe_tables_print_their_rows():
    summary = [{"arm": "two_stage", "label_fraction": 0.1, "test_accuracy_mean": 0.91234, "test_accuracy_sd": None,
                "n": 1, "wall_seconds_mean": 12.34, "trainable_params": 12345}]
    lines = compare.format_table({"summary": summary}).splitlines()
    assert lines[1].split() == ["two_stage", "0.1", "0.9123", "±", "-", "1", "12.3", "12,345"]
    run = {"strategy": "ewc", "scenario": "class-il", "tasks": [[0, 1]], "train_seconds": 3.0, "wall_seconds": None,
           "run_dir": "x", "metrics": {"acc": 0.5, "average_incremental_accuracy": 0.75, "bwt": -0.25,
                                       "forgetting": 0.25, "min_old_accuracy": None}}
    assert forgetting.format_table({"strategies": [run]}).splitlines()[1].split() == [
        "ewc", "0.5000", "0.7500", "-0.2500", "0.2500", "-", "3.0", "-"]
    rounds = [{"round": 0, "labeled": 10, "pseudo_labeled": 0, "pseudo_accuracy_trained": None, "val_accuracy": 0.5,
               "test_accuracy": 0.25, "selected": {"passed": 0, "accuracy": None}}]
    text = self_training.format_table({"rounds": rounds, "metrics": {"test_accuracy": 0.25,
                                                                     "baseline_test_accuracy": 0.25}})
    assert text.splitlines()[1].split() == ["0", "10", "0", "-", "0.5000", "0.2500", "0", "-"]
    assert text.endswith("best round by val: test accuracy 0.2500 (labeled only: 0.2500)")
