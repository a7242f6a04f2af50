"""scripts/gpu_check.sh --cpu: the GPU check's whole path (the GPU-only tests, a bench case, the experiment's two
stages) on the CPU at tiny size, in one child process, with one table. No test here needs a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tfl import bench
from tiny_runs import ROOT, TIMEOUT

GPU_TESTS = ("test_float16_trains_with_dynamic_loss_scaling", "test_bfloat16_trains_on_compute_capability_8_or_more",
             "test_mirrored_over_every_device_steps_as_one_device_on_the_global_batch")


def test_gpu_check_runs_its_cpu_path_and_prints_one_table(tmp_path):
    report_file = tmp_path / "report.json"
    child = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--cpu", "--work", str(tmp_path / "work"),
                            "--json", str(report_file)], capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, "PYTHON": sys.executable})
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["ok"] and report["mode"] == "cpu (tiny)"
    assert {name: t["outcome"] for name, t in report["tests"]["tests"].items()} == dict.fromkeys(GPU_TESTS, "passed")
    check_input_pipeline_case(report["bench"])
    experiment = report["experiment"]
    assert (experiment["backbone"], experiment["freeze_up_to"], experiment["trains"]) == (
        "compact_cnn", "block1", ["block2", "block3"])  # the last two stages of the backbone
    assert {stage: s["epochs"] for stage, s in experiment["stages"].items()} == {"head": 3, "finetune": 2}
    assert 0.0 <= experiment["val_accuracy"] <= 1.0 and experiment["precision"] == "float32"
    lines = child.stdout.splitlines()
    assert lines[-1].split()[:2] == ["result", "passed"]
    assert all(any(line.startswith("test") and name in line and "passed" in line for line in lines)
               for name in GPU_TESTS)
    assert any(line.startswith("bench") and "input_pipeline" in line and "img/s/core" in line for line in lines)
    assert sum(line.startswith("experiment") for line in lines) == 3


def check_input_pipeline_case(report: dict) -> None:
    """tfl bench's input_pipeline case on 12 JPEGs of 40-64 px read at 32 px in batches of 8 (a partial last batch):
    every variant's numbers are there and positive, and the ratios are those of the numbers (no speed is asserted)."""
    json.dumps(report, allow_nan=False)
    (case,) = report["cases"]
    assert case["name"] == "input_pipeline" and case["images"] == 12 and case["image_size"] == 32
    for field in ("images_per_core_second", "images_per_second", "cores_busy", "cores_for_gpu"):
        assert set(case[field]) == set(bench.PIPELINE_VARIANTS) and all(v > 0 for v in case[field].values())
    per_core = case["images_per_core_second"]
    for name, ratio in case["ratio_to_bare"].items():
        assert ratio > 0 and ratio == pytest.approx(per_core[name] / per_core["bare_decoder"], rel=0.02)
    assert case["streamed_ratio"] == case["ratio_to_bare"]["tfl_streamed"]
    assert case["streamed_goal_met"] == (case["streamed_ratio"] >= bench.STREAMED_GOAL)
    assert case["streamed_ratio_same_resize"] == pytest.approx(
        per_core["tfl_streamed"] / per_core["bare_decoder_antialias"], rel=0.02)
    assert case["cores_for_gpu"]["tfl_streamed"] == pytest.approx(2500 / per_core["tfl_streamed"], rel=0.02)
    assert case["keep_decode"]["images_per_core_second"] > 0 and case["jpeg_mb"] > 0
    assert len(case["load"]["before"]) == 3 and 0.0 <= case["load"]["others_cpu_share"] <= 1.0
    table = bench.format_table(report)
    assert "tfl streamed / bare decoder" in table and all(name in table for name in bench.PIPELINE_VARIANTS)

