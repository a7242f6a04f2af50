"""The GPU check (scripts/gpu_check.sh runs this): on a machine with an NVIDIA GPU and TensorFlow, in one process,

1. the GPU-only tests, tests/gpu/gpu_cases.py: float16 with loss scaling, bfloat16 (compute capability >= 8.0),
   MirroredStrategy over every visible GPU;
2. `tfl bench` cases on the GPU (--quick sizes): head_only, resnet50_forward (and _bf16 from compute 8.0),
   input_pipeline;
3. the seeds' experiment at reduced size: ResNet18 with ImageNet weights -> tfds CIFAR-10 at 224 px, the head alone
   for 3 epochs, then the last two stages (block3, block4) for 2 more, on --limit-train training images;

and prints one table (--json FILE also writes it as JSON). Exit 0 when every test passed (or was skipped for the
GPU's compute capability) and the bench and the experiment ran; 1 otherwise; 2 when there is no GPU.

--cpu runs the same path on the CPU at tiny size: the tests on the CPU (bfloat16 there, the mirrored strategy over
two logical CPUs), the input_pipeline case on 12 small JPEGs, and the experiment's two stages with compact_cnn
(random weights) at 32 px on a generated folder of 24 JPEGs (tfds downloads need the internet). The test suite
runs it (tests/test_gpu_check.py). The GPU path is written from TensorFlow's documented APIs
(tf.config.list_physical_devices, tf.config.experimental.get_device_details, Keras mixed precision,
tf.distribute.MirroredStrategy) and has not been run on a GPU by tfl's developers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TESTS = os.path.join(ROOT, "tests", "gpu", "gpu_cases.py")
CPU_REPLICAS = 2  # logical CPUs for the mirrored test with --cpu (tests/gpu/gpu_cases.py agrees)


@dataclasses.dataclass(frozen=True)
class Experiment:
    dataset: str
    backbone: str
    weights: str
    image_size: int
    limit_train: int | None
    batch_size: int
    head_epochs: int = 3
    epochs: int = 2  # the last two stages


def experiment(cpu: bool, work: str, limit_train: int) -> Experiment:
    if cpu:
        return Experiment(tiny_folder(os.path.join(work, "data")), "compact_cnn", "none", 32, None, 8)
    return Experiment("cifar10", "resnet18", "default", 224, limit_train, 64)


def tiny_folder(root: str) -> str:
    """24 JPEGs of 40-64 px in 4 classes under root/train/ (the input_pipeline case's generator)."""
    from tfl.bench import write_jpeg_folder

    write_jpeg_folder(os.path.join(root, "train"), 24, (40, 64), seed=0)
    return root


def bench_plan(cpu: bool, gpus: list):
    """(config, cases): --quick sizes on a GPU; on the CPU the input_pipeline case alone, tiny."""
    from tfl import bench

    if cpu:
        tiny = dataclasses.replace(bench.QUICK, matmul_size=128, pipeline_images=12, pipeline_size=32,
                                   source_sides=(40, 64), batch_size=8, pipeline_rounds=1)
        return tiny, ("input_pipeline",)
    cases = ["head_only", "resnet50_forward", "input_pipeline"]
    if compute_capability(gpus[0]) >= (8, 0):
        cases.insert(2, "resnet50_forward_bf16")
    return bench.QUICK, tuple(cases)


def compute_capability(gpu) -> tuple:
    import tensorflow as tf

    return tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))


class Outcomes:
    """A pytest plugin keeping each test's outcome, seconds, CPU seconds and (skipped, failed) the reason's last
    line."""

    def __init__(self):
        self.tests: dict = {}
        self._cpu_start = 0.0

    def pytest_runtest_logstart(self, nodeid, location):
        self._cpu_start = _process_cpu()

    def pytest_runtest_logfinish(self, nodeid, location):
        name = nodeid.split("::")[-1]
        if name in self.tests:
            self.tests[name]["cpu_seconds"] = round(_process_cpu() - self._cpu_start, 2)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            reason = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                reason = report.longrepr[2].removeprefix("Skipped: ")
            elif report.failed:
                reason = str(report.longrepr).strip().splitlines()[-1][:200]
            self.tests[report.nodeid.split("::")[-1]] = {"outcome": report.outcome,
                                                         "seconds": round(report.duration, 2), "reason": reason}


def run_tests() -> dict:
    import pytest

    outcomes = Outcomes()
    # --noconftest: the suite's tests/conftest.py (shared folders, matplotlib) is not needed by these tests
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--noconftest", "--rootdir", ROOT, GPU_TESTS],
                       plugins=[outcomes])
    return {"exit_code": int(code), "tests": outcomes.tests}


def run_bench(cpu: bool, gpus: list) -> dict:
    from tfl import bench

    cfg, cases = bench_plan(cpu, gpus)
    return bench.run_bench(cfg, cases, log=lambda line: print(line, file=sys.stderr))


def run_experiment(spec: Experiment, work: str) -> dict:
    """The head for spec.head_epochs, then the last two stages for spec.epochs (tfl.finetune)."""
    import tfl
    from tfl.backbones import registry

    stages = [s for s in registry.get(spec.backbone).stage_names if s != "head"]
    start = time.perf_counter()
    result = tfl.finetune(dataset=spec.dataset, backbone=spec.backbone, weights=spec.weights,
                          image_size=spec.image_size, limit_train=spec.limit_train, batch_size=spec.batch_size,
                          head_epochs=spec.head_epochs, epochs=spec.epochs, freeze_up_to=stages[-3],
                          tensorboard=False, output_dir=os.path.join(work, "experiment"), overwrite=True)
    metrics = result.metrics
    return {**dataclasses.asdict(spec), "trains": stages[-2:], "freeze_up_to": stages[-3],
            "seconds": round(time.perf_counter() - start, 1), "run_dir": result.run_dir,
            "precision": _config(result.run_dir).get("precision"), "val_accuracy": metrics.get("val_accuracy"),
            "test_accuracy": metrics.get("test_accuracy"), "stages": _stage_scores(result.run_dir)}


def _config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def _stage_scores(run_dir: str) -> dict:
    """Each stage's last val accuracy and its seconds, from history.csv."""
    import csv

    stages: dict = {}
    with open(os.path.join(run_dir, "history.csv")) as f:
        for row in csv.DictReader(f):
            stage = stages.setdefault(row["stage"], {"epochs": 0, "seconds": 0.0})
            stage["epochs"] += 1
            stage["seconds"] = round(stage["seconds"] + float(row["seconds"]), 2)
            stage["val_accuracy"] = float(row["val_accuracy"])
    return stages


def table(report: dict) -> str:
    rows = [("device", d["name"], d["detail"]) for d in report["devices"]]
    for name, t in report["tests"]["tests"].items():
        spent = f"{t['seconds']} s, {t.get('cpu_seconds', '?')} s CPU"
        rows.append(("test", name, f"{t['outcome']} ({spent}){': ' + t['reason'] if t['reason'] else ''}"))
    for case in report["bench"]["cases"]:
        rows.append(("bench", case["name"], _bench_summary(case)))
    for warning in report["bench"]["warnings"]:
        rows.append(("bench", "warning", warning))
    if "error" in report["bench"]:
        rows.append(("bench", "failed", report["bench"]["error"]))
    e = report["experiment"]
    if "error" in e:
        rows.append(("experiment", "failed", e["error"]))
    else:
        what = f"{e['backbone']} ({e['weights']} weights) -> {os.path.basename(e['dataset'])} at {e['image_size']} px"
        rows.append(("experiment", what, f"precision {e['precision']}, {e['seconds']} s, test accuracy "
                                         f"{_score(e['test_accuracy'])}"))
        for stage, s in e["stages"].items():
            which = "head only" if stage == "head" else f"{', '.join(e['trains'])} (above {e['freeze_up_to']})"
            rows.append(("experiment", f"{stage}: {which}", f"{s['epochs']} epoch(s), {s['seconds']} s, val accuracy "
                                                            f"{_score(s['val_accuracy'])}"))
    spent = ", ".join(f"{k} {v} s" for k, v in report["cpu_seconds"].items())
    rows.append(("result", "passed" if report["ok"] else "FAILED", f"{report['mode']}; CPU time: {spent}"))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)


def _score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _bench_summary(case: dict) -> str:
    if case["name"] == "input_pipeline":
        per_core = case["images_per_core_second"]
        return (f"tfl streamed {per_core['tfl_streamed']:.0f} img/s/core, {case['streamed_ratio']:.0%} of the bare "
                f"decoder ({per_core['bare_decoder']:.0f}); {case['cores_for_gpu']['tfl_streamed']:.1f} cores for "
                f"{case['gpu_images_per_second']} img/s")
    if "speedup" in case:
        return (f"tfl {case['tfl_seconds']} s, baseline {case['baseline_seconds']} s, {case['speedup']}x, "
                f"{case['fraction_of_peak']:.0%} of the {case['precision']} matmul peak")
    return json.dumps(case.get("images_per_second", {}))


def _process_cpu() -> float:
    """This process's CPU seconds so far, every thread."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _cpu_clock(into: dict, name: str):
    """The CPU seconds spent in the block, into[name]."""
    start = _process_cpu()
    yield
    into[name] = round(_process_cpu() - start, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the same path on the CPU at tiny size")
    parser.add_argument("--work", help="where the data and runs go (default: a temporary directory)")
    parser.add_argument("--limit-train", type=int, default=10000, help="CIFAR-10 training images (GPU path)")
    parser.add_argument("--json", dest="json_file", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    os.environ["TFL_GPU_CHECK_DEVICE"] = "cpu" if args.cpu else "gpu"
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # before TensorFlow starts
    sys.path.insert(0, ROOT)
    import tfl.cli  # noqa: F401 (quiets TensorFlow's import, as the command line does)
    from tfl.training import strategy as strategies

    if args.cpu:
        strategies.make_strategy("mirrored", CPU_REPLICAS)  # the logical CPUs, before TensorFlow's devices start
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not args.cpu and not gpus:
        print("gpu_check: TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty): check the "
              "NVIDIA driver and a CUDA-enabled TensorFlow (pip install 'tensorflow[and-cuda]'), or run "
              "scripts/gpu_check.sh --cpu", file=sys.stderr)
        return 2
    devices = [{"name": f"GPU {i}", "detail": f"{d.get('device_name', '?')}, compute capability "
                f"{'.'.join(map(str, d.get('compute_capability') or ('?',)))}"}
               for i, d in enumerate(tf.config.experimental.get_device_details(g) for g in gpus)]
    if args.cpu:
        devices = [{"name": "CPU", "detail": f"{os.cpu_count()} cores, split into {CPU_REPLICAS} logical devices"}]
    with tempfile.TemporaryDirectory(prefix="tfl-gpu-check-") as scratch:
        work = args.work or scratch
        os.makedirs(work, exist_ok=True)
        cpu_seconds = {}
        with _cpu_clock(cpu_seconds, "tests"):
            tests = run_tests()
        with _cpu_clock(cpu_seconds, "experiment"):
            try:
                found = run_experiment(experiment(args.cpu, work, args.limit_train), work)
            except Exception as error:  # reported in the table: the rest of the check still counts
                found = {"error": f"{type(error).__name__}: {error}"}
        with _cpu_clock(cpu_seconds, "bench"):
            try:
                bench = run_bench(args.cpu, gpus)
            except Exception as error:
                bench = {"cases": [], "warnings": [], "error": f"{type(error).__name__}: {error}"}
    ok = tests["exit_code"] == 0 and bool(tests["tests"]) and "error" not in found and "error" not in bench
    report = {"mode": "cpu (tiny)" if args.cpu else "gpu", "devices": devices, "tests": tests, "bench": bench,
              "experiment": found, "cpu_seconds": cpu_seconds, "ok": ok}
    print(table(report))
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
