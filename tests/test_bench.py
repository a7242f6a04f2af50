"""tfl bench on a tiny configuration: the report's schema and that its numbers agree with each other (no timing)."""

from __future__ import annotations

import json

import pytest

from tfl import bench

# MobileNet (random weights: the numbers' consistency is what is tested) traces faster than EfficientNet-Lite0.
TINY = bench.BenchConfig(backbone="mobilenet", weights="none", image_size=32, train=64, val=32, test=32,
                         head_epochs=2, batch_size=16, resnet_size=32, resnet_images=8, matmul_size=128)
REQUIRED = ("name", "tfl_seconds", "baseline_seconds", "speedup", "tfl_accuracy", "baseline_accuracy",
            "fraction_of_peak")


@pytest.fixture(scope="module")
def report():
    return bench.run_bench(TINY, cases=("head_only", "resnet50_forward"), log=lambda *_: None)


def test_report_schema(report):
    json.dumps(report, allow_nan=False)  # what --json prints must be valid JSON
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["matmul_gflops"] > 0 and machine["tensorflow"]
    assert [c["name"] for c in report["cases"]] == ["head_only", "resnet50_forward"]
    for case in report["cases"]:
        assert all(key in case for key in REQUIRED), case


def test_numbers_are_positive_and_consistent(report):
    head, resnet = report["cases"]
    for case in (head, resnet):
        assert case["tfl_seconds"] > 0 and case["baseline_seconds"] > 0 and case["fraction_of_peak"] > 0
        assert case["speedup"] == pytest.approx(case["baseline_seconds"] / case["tfl_seconds"], rel=0.02)
        assert case["fraction_of_peak"] == pytest.approx(case["physical_limit_seconds"] / case["tfl_seconds"], rel=0.02)
        peak = report["machine"]["matmul_gflops"] * 1e9
        images = case["train_images"] + case["val_images"] if "train_images" in case else case["images"]
        assert case["physical_limit_seconds"] == pytest.approx(
            case["backbone_gflops_per_image"] * 1e9 * images / peak, rel=0.02)
    for key in ("tfl_accuracy", "baseline_accuracy", "tfl_nocache_accuracy"):
        assert 0.0 <= head[key] <= 1.0
    assert resnet["tfl_accuracy"] is None and resnet["baseline_accuracy"] is None
    assert head["cache_speedup"] == pytest.approx(head["tfl_nocache_seconds"] / head["tfl_seconds"], rel=0.02)
    assert head["warm_speedup"] == pytest.approx(head["baseline_seconds"] / head["tfl_warm_seconds"], rel=0.02)
    assert (head["head_epochs"], head["finetune_epochs"]) == (2, 0)
    assert head["images_per_second"]["tfl"] == pytest.approx((TINY.train + TINY.val) * 2 / head["tfl_seconds"], rel=0.02)
    # The cached and uncached tfl runs train the same model on the same batches.
    assert head["tfl_accuracy"] == pytest.approx(head["tfl_nocache_accuracy"], abs=1e-6)
    table = bench.format_table(report)
    assert "head_only" in table and "resnet50_forward" in table


def test_flop_count_matches_resnet50s_published_figure():
    from tfl import models

    # He et al. 2016, Table 1: ResNet-50 is 3.8e9 multiply-adds at 224 px (3.86e9 counting the projection
    # shortcuts; Keras' v1 strides in the first 1x1 convolution, unlike the 4.1e9 of "v1.5").
    gflops = bench.forward_flops(models.backbone_of(models.build_classifier("resnet50", 10, 224, "none"))) / 1e9
    assert gflops == pytest.approx(2 * 3.86, rel=0.01)


def test_unknown_case_is_a_value_error():
    with pytest.raises(ValueError, match="unknown bench case.*head_only"):
        bench.run_bench(TINY, cases=("everything",))
