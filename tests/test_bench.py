"""tfl bench on a tiny configuration: the report's schema and that its numbers agree with each other (no timing)."""

from __future__ import annotations

import json

import pytest

from tfl import bench

# The compact CNN from random weights (the numbers' consistency is what is tested, not a backbone's): its runs take
# two thirds of MobileNet's time (the file: 16.6 s against 24.7 s).
TINY = bench.BenchConfig(backbone="compact_cnn", weights="none", image_size=32, train=64, val=32, test=32,
                         head_epochs=2, batch_size=16, resnet_size=32, resnet_images=8, matmul_size=128,
                         serving_images=8)
REQUIRED = ("name", "tfl_seconds", "baseline_seconds", "speedup", "tfl_accuracy", "baseline_accuracy",
            "fraction_of_peak")


@pytest.fixture(scope="module")
def report():
    return bench.run_bench(TINY, cases=("head_only", "resnet50_forward", "resnet50_forward_bf16", "serving"),
                           log=lambda *_: None)


def test_report_schema(report):
    json.dumps(report, allow_nan=False)  # what --json prints must be valid JSON
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["matmul_gflops"] > 0 and machine["tensorflow"]
    assert [c["name"] for c in report["cases"]] == ["head_only", "resnet50_forward", "resnet50_forward_bf16", "serving"]
    for case in report["cases"][:3]:
        assert all(key in case for key in REQUIRED), case
    assert set(machine["matmul_gflops_by_precision"]) == {"float32", "bfloat16"}
    assert machine["matmul_gflops"] == machine["matmul_gflops_by_precision"]["float32"]
    assert set(machine["cpu_flags"]) <= set(bench.FLAGS)
    assert isinstance(report["busy"], bool) and len(report["warnings"]) == sum(c["load"]["busy"] for c in report["cases"])


def test_every_case_records_the_load_and_what_others_took(report):
    for case in report["cases"]:
        load = case["load"]
        assert len(load["before"]) == len(load["after"]) == 3
        assert 0.0 <= load["others_cpu_share"] <= 1.0
        assert load["busy"] == (load["others_cpu_share"] > bench.BUSY_SHARE)


def test_load_watch_counts_another_processes_cpu():
    import os
    import resource
    import subprocess
    import sys

    child = "import time\nwhile time.process_time() < 0.6: pass"  # 0.6 CPU seconds, however long that takes
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with bench.LoadWatch() as watch:
        subprocess.run([sys.executable, "-c", child], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    (start, _, _), (end, _, _) = watch.start, watch.end
    others_cpu = watch.others_share() * (end - start) * (os.cpu_count() or 1)
    assert child_cpu >= 0.6 and others_cpu >= child_cpu - 0.1  # /proc/stat counts in ticks of 10 ms


def test_serving_reports_the_export_and_keras_predict_at_batch_1_and_64(report):
    serving = report["cases"][3]
    assert set(serving["images_per_second"]) == {"saved_model_jpeg_batch1", "saved_model_jpeg_batch64",
                                                 "keras_predict_batch1", "keras_predict_batch64"}
    assert all(v > 0 for v in serving["images_per_second"].values()) and serving["images"] == 8


def test_numbers_are_positive_and_consistent(report):
    head, resnet, resnet_bf16, _ = report["cases"]
    for case in (head, resnet, resnet_bf16):
        assert case["tfl_seconds"] > 0 and case["baseline_seconds"] > 0 and case["fraction_of_peak"] > 0
        assert case["speedup"] == pytest.approx(case["baseline_seconds"] / case["tfl_seconds"], rel=0.02)
        assert case["fraction_of_peak"] == pytest.approx(case["physical_limit_seconds"] / case["tfl_seconds"], rel=0.02)
        peak = report["machine"]["matmul_gflops_by_precision"][case["precision"]] * 1e9
        images = case["train_images"] + case["val_images"] if "train_images" in case else case["images"]
        assert case["physical_limit_seconds"] == pytest.approx(
            case["backbone_gflops_per_image"] * 1e9 * images / peak, rel=0.02)
    for key in ("tfl_accuracy", "baseline_accuracy", "tfl_nocache_accuracy"):
        assert 0.0 <= head[key] <= 1.0
    assert resnet["tfl_accuracy"] is None and resnet["baseline_accuracy"] is None
    assert (resnet["precision"], resnet_bf16["precision"], head["precision"]) == ("float32", "bfloat16", "float32")
    parts = head["cold_breakdown_seconds"]
    assert parts["cache_extraction"] + parts["training"] == pytest.approx(head["tfl_seconds"], rel=0.02)
    assert 0 < parts["cache_extraction"] < head["tfl_seconds"]
    assert head["extraction_fraction_of_peak"] == pytest.approx(
        head["physical_limit_seconds"] / parts["cache_extraction"], rel=0.02)
    assert head["cache_speedup"] == pytest.approx(head["tfl_nocache_seconds"] / head["tfl_seconds"], rel=0.02)
    assert head["warm_speedup"] == pytest.approx(head["baseline_seconds"] / head["tfl_warm_seconds"], rel=0.02)
    assert (head["head_epochs"], head["finetune_epochs"]) == (2, 0)
    assert head["images_per_second"]["tfl"] == pytest.approx((TINY.train + TINY.val) * 2 / head["tfl_seconds"], rel=0.02)
    # The cached and uncached tfl runs train the same model on the same batches.
    assert head["tfl_accuracy"] == pytest.approx(head["tfl_nocache_accuracy"], abs=1e-6)
    table = bench.format_table(report)
    assert "head_only" in table and "resnet50_forward_bf16" in table and "cache extraction" in table
    assert "SavedModel on JPEG bytes" in table


def test_flop_count_matches_resnet50s_published_figure():
    from tfl import models

    # He et al. 2016, Table 1: ResNet-50 is 3.8e9 multiply-adds at 224 px (3.86e9 counting the projection
    # shortcuts; Keras' v1 strides in the first 1x1 convolution, unlike the 4.1e9 of "v1.5").
    gflops = bench.forward_flops(models.backbone_of(models.build_classifier("resnet50", 10, 224, "none"))) / 1e9
    assert gflops == pytest.approx(2 * 3.86, rel=0.01)


def test_unknown_case_is_a_value_error():
    with pytest.raises(ValueError, match="unknown bench case.*head_only"):
        bench.run_bench(TINY, cases=("everything",))


# The input_pipeline case's report is checked on the tiny run scripts/gpu_check.sh --cpu makes
# (tests/test_gpu_check.py), so that the suite pays for one such run, not two.

def test_jpeg_folder_sides_come_from_the_range(tmp_path):
    from PIL import Image

    paths, source = bench.write_jpeg_folder(str(tmp_path), 6, (40, 48), seed=1)
    assert len(paths) == 6 and source
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and all(40 <= side <= 48 for side in image.size)
