"""`tfl bench`: tfl against the Keras transfer-learning guide recipe, timed in one process."""

from __future__ import annotations

import json

import click

from tfl.cli.core import call, cli, echo_err
from tfl.options import BENCH_CASES


@cli.command()
@click.option("--quick", is_flag=True,
              help="Small subsets, 64px and few epochs: a couple of minutes instead of about a quarter of an hour.")
@click.option("--case", "cases", multiple=True, type=click.Choice(BENCH_CASES),
              help="Run only this case (repeatable). Default: all of them.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"machine": {...}, "cases": [{"name", "tfl_seconds", "baseline_seconds", "speedup", '
                   '"tfl_accuracy", "baseline_accuracy", "fraction_of_peak", ...}]}; input_pipeline\'s case has '
                   '"images_per_core_second", "ratio_to_bare", "streamed_ratio", "cores_for_gpu", ....')
def bench(quick, cases, as_json):
    """Time tfl against the Keras transfer-learning guide recipe, in one process, on the same data.

    Cases: head_only (EfficientNet-Lite0, head training on the frozen backbone), partial_finetune (Lite0,
    --freeze-up-to block5), resnet50_forward and resnet50_forward_bf16 (frozen forward throughput of Keras'
    ResNet50, random weights, float32 and bfloat16 compute), serving (an exported SavedModel's serving_default
    on JPEG bytes at batch 1 and 64, next to Keras predict) and input_pipeline (a generated folder of JPEGs read at
    224 px: images/s per core of tf.data's bare decode_jpeg + resize against tfl's training pipeline, streamed and
    kept, with and without augmentation, and the cores a 2,500 img/s GPU would need). Each Lite0 case runs tfl
    with boundary caching (cold, then warm: reusing the cache), the Keras recipe (compile + fit, recomputing the
    backbone every epoch) and tfl without caching, on the same embedded Fashion-MNIST subset, weights, resolution
    and epochs. Reports wall seconds, images/second, test accuracy, speedups, where the cold run's time went, and
    tfl's fraction of the physical limit (backbone forward FLOPs x images / the measured matmul FLOP/s of the case's
    precision).

    The machine: CPU model, its AVX/AMX flags, cores, the matmul peak per precision; every case records the load
    average before and after and the share of the CPU other processes took, and is marked busy (with a warning)
    above 10%. Progress goes to stderr; the table or JSON to stdout. Run it on an otherwise idle machine.
    """
    from tfl import bench as benchmarks

    cfg = benchmarks.QUICK if quick else benchmarks.FULL
    report = call(benchmarks.run_bench, cfg, cases or benchmarks.CASES, log=echo_err)
    click.echo(json.dumps(report, indent=2) if as_json else benchmarks.format_table(report))
