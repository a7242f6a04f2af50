"""Commands on what a run left: evaluate, predict, report, calibrate, export."""

from __future__ import annotations

import os

import click

from tfl import api
from tfl.cli.core import UsageFailure, call, cli, echo_err, echo_json
from tfl.cli.params import eval_batch_size, non_negative, positive
from tfl.options import EXPORT_FORMATS, IMAGE_EXTENSIONS, SPLITS, TFLITE_MODES, TTA_MODES, TTA_NONE

RUN_HELP = "A run directory from `tfl finetune` (or any recipe's run)."
DATA_DIR_HELP = ("Where the dataset is read from (tfds data_dir, IDX files). Default: the run's own, for its own "
                 "dataset.")


@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help=RUN_HELP)
@click.option("--dataset", help="Evaluate on another dataset with the same classes (default: the run's).")
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@eval_batch_size
@click.option("--json", "as_json", is_flag=True,
              help='Print {"run", "dataset", "split", "examples", "accuracy", "loss"}, and "temperature" for a '
                   'calibrated run (`tfl calibrate`): its loss is then the NLL of softmax(logits / T); with an abstain '
                   'threshold (`tfl calibrate --abstain`), "abstain": {"threshold", "coverage", '
                   '"selective_accuracy"}; with TTA kept (`tfl calibrate --tta`), "tta": its mode.')
def evaluate(run_dir, dataset, data_dir, batch_size, as_json):
    """Accuracy and loss of a run's best model on the test split (or val when there is no test split)."""
    result = call(api.evaluate, run_dir, dataset, data_dir, batch_size,
                  log=(lambda *_: None) if as_json else click.echo)
    if as_json:
        echo_json(result)
    else:
        calibrated = f" (calibrated, T = {result['temperature']:.4g})" if "temperature" in result else ""
        calibrated += f" (TTA {result['tta']})" if "tta" in result else ""
        click.echo(f"{result['split']} accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}{calibrated} "
                   f"on {result['examples']} examples of {result['dataset']}")
        if "abstain" in result:
            a = result["abstain"]
            answered = "-" if a["selective_accuracy"] is None else f"{a['selective_accuracy']:.4f}"
            click.echo(f"confident (top probability >= {a['threshold']:.4f}) on {a['coverage']:.2%} of them, "
                       f"selective accuracy {answered}")


@cli.command(help=f"""Top-k labels for IMAGES: the file types training reads ({' '.join(IMAGE_EXTENSIONS)}),
    regular files only, any colour mode. EXIF orientation is ignored, as in training and in the export. A file that
    cannot be read is named on stderr and the others are still predicted; the exit code is then 2.""")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Use a run's fine-tuned model and classes.")
@click.option("--backbone", help="Use a backbone's ImageNet head and the ImageNet class names.")
@click.option("--saved-model", type=click.Path(exists=True, file_okay=False),
              help="Use an export from `tfl export` the way TF Serving would: each file's bytes go to its "
                   "serving_default signature. A version directory, or the model directory (its highest version). "
                   "--top-k is capped by the export's own --top-k.")
@click.option("--trust-saved-model", is_flag=True,
              help="With --saved-model: run it even if its graph has ops that touch files, processes, Python or the "
                   "network (refused by default, naming them; the docs list the rule).")
@click.option("--weights", default="default", show_default=True, help="With --backbone: 'default' or a weights file.")
@click.option("--top-k", default=5, show_default=True, callback=positive,
              help="How many of the most probable classes to print for each image.")
@click.option("--json", "as_json", is_flag=True,
              help='Print [{"image", "top": [{"index", "label", "prob"}]}], and "confident" (true, or false where the '
                   'text says "unsure") for a run or export with an abstain threshold (`tfl calibrate --abstain`); a '
                   'file that cannot be read as an image gets {"image", "error"} instead of "top".')
def predict(images, run_dir, backbone, saved_model, trust_saved_model, weights, top_k, as_json):
    results = call(api.predict, list(images), run_dir, backbone=backbone, saved_model=saved_model, weights=weights,
                   top_k=top_k, trust_saved_model=trust_saved_model)
    failed = [f"{printable(r['image'])}: {r['error']}" for r in results if "error" in r]
    if len(results) == 1 and failed:
        raise UsageFailure(failed[0])
    for line in failed:
        echo_err(line)
    if as_json:
        echo_json(results)
    else:
        for r in results:
            if "top" in r:
                click.echo(printable(r["image"]) + ("  unsure" if r.get("confident") is False else ""))
                for t in r["top"]:
                    click.echo(f"  {t['prob']:7.2%}  {t['label']}  ({t['index']})")
    if failed:
        done = len(results) - len(failed)
        raise UsageFailure(f"{len(failed)} of {len(results)} images could not be predicted (named above)"
                           + (f"; the other {done} were" if done else ""))


def printable(name: str) -> str:
    """A file name for one line of output: bytes that are not UTF-8 (os.fsdecode's stand-ins) as \\xNN, control
    characters as Python escapes them (\\n, \\t)."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help=RUN_HELP)
@click.option("--dataset", help="Report on another dataset with the same classes (default: the run's).")
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@click.option("--split", type=click.Choice(SPLITS),
              help="Which split (default: test, or val when there is no test split).")
@eval_batch_size
@click.option("--output-dir", type=click.Path(file_okay=False), help="Where the report goes (default: <run>/report/).")
@click.option("--max-images", default=32, show_default=True, callback=non_negative,
              help="Misclassified images in the grid, the most confident mistakes first.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
def report(run_dir, dataset, data_dir, split, batch_size, output_dir, max_images, as_json):
    """Where a run's model errs: confusion matrix, per-class precision / recall / F1, the most confused pairs.

    Writes report.json, confusion_matrix.json/.png, per_class.csv and misclassified.png (true and predicted
    labels) into the output directory. Its accuracy is the one metrics.json and `tfl evaluate` report.
    """
    from tfl.reporting.report import format_report, report_run

    quiet = (lambda *_: None) if as_json else echo_err
    result = call(report_run, run_dir, dataset, data_dir, split, batch_size, output_dir, max_images, log=quiet)
    if as_json:
        echo_json(result)
    else:
        click.echo(format_report(result))


@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help=RUN_HELP)
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@eval_batch_size
@click.option("--abstain", metavar="coverage:C|precision:P",
              help="Also choose, on the val split, a threshold on the calibrated top probability below which the "
                   "answer is 'unsure': coverage:0.95 answers at least 95 % of val, precision:0.99 is right on at "
                   "least 99 % of the val images it answers. predict marks answers below it, exports add a "
                   "`confident` output. Without it, an earlier threshold is dropped.")
@click.option("--tta", type=click.Choice(TTA_MODES), default=TTA_NONE, show_default=True,
              help="First decide on val whether test-time augmentation replaces the model's logits by their mean "
                   "over a few views (flip: the image and its mirror; flip+crops: those and five 87.5 % crops). "
                   "Kept only if val accuracy rises, or stays equal with a lower val NLL; T is then fitted on the "
                   "chosen logits, and predict, evaluate, report and exports use them. Without it, an earlier TTA "
                   "is dropped.")
@click.option("--json", "as_json", is_flag=True,
              help='Print calibration.json: {"temperature", "kept", "reason", "val": {"examples", "before", '
                   '"after"}, "test": {...}, "bins", ...}; before and after hold "ece", "nll", "brier", "accuracy"; '
                   'with --abstain, "abstain": {"target", "threshold", "val", "test"} (coverage, selective accuracy); '
                   'with --tta, "tta": {"mode", "kept", "reason", "val": {"plain", "tta"}, "test": {...}} (accuracy '
                   'and NLL of each).')
def calibrate(run_dir, data_dir, batch_size, abstain, tta, as_json):
    """Fit a temperature T on the run's val split so its probabilities, softmax(logits / T), can be trusted.

    T minimises the val NLL (it stays 1, and the output says why, when that does not lower the val NLL). Prints ECE
    (15 equal-width confidence bins), NLL and Brier score before and after T on val and test, and writes
    calibration.json into the run directory. From then on `tfl predict`, `evaluate`, `report` (which draws a
    reliability diagram) and every `tfl export` of the run use T. Calibrating again fits T afresh from the model.
    """
    result = call(api.calibrate, run_dir, batch_size, data_dir, log=(lambda *_: None) if as_json else echo_err,
                  abstain=abstain, tta=tta)
    if as_json:
        echo_json(result)
    else:
        from tfl.calibration import describe

        click.echo(describe(result, run_dir))


@cli.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help=RUN_HELP)
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default=EXPORT_FORMATS[0], show_default=True,
              help="saved_model: for TF Serving (image bytes in; probabilities, top-k classes and labels out). "
                   "tflite: model.tflite (an image at the model's input size in, probabilities out). "
                   "onnx: model.onnx (images at the model's input size in; logits and probabilities out); needs "
                   "the extra: pip install 'tfl[onnx]'.")
@click.option("--output", type=click.Path(file_okay=False), metavar="DIR",
              help="The model's base directory; the export goes to DIR/<version>/. Default: saved_models/<run name> "
                   "(saved_model), saved_models/<run name>-tflite-<mode> (tflite) or saved_models/<run name>-onnx "
                   "(onnx).")
@click.option("--version", type=int, callback=positive,
              help="Integer version, the subdirectory TF Serving loads (the highest). Default: highest existing + 1. "
                   "An existing version is never overwritten.")
@click.option("--top-k", type=int, callback=positive,
              help="saved_model: how many top classes the `classes` and `labels` outputs hold (at most the class "
                   "count).  [default: 5]")
@click.option("--tflite-mode", type=click.Choice(TFLITE_MODES),
              help="tflite: float32 as trained; float16 weights (half the size); int8 dynamic-range quantization "
                   "(int8 weights, a quarter of the size, no calibration data).  [default: float32]")
@click.option("--json", "as_json", is_flag=True, help='Print {"path", "format"} instead of the path.')
def export(run_dir, fmt, output, version, top_k, tflite_mode, as_json):
    """Export a run's best model for serving into a new integer-versioned directory, written atomically.

    The SavedModel has two signatures: serving_default (image_bytes: encoded JPEG/PNG/GIF/BMP files) and
    predict_images (images: float32 [N, H, W, 3], 0-255 RGB, any size), both decoded and resized inside as
    evaluation does; class names are its asset labels.txt. The TFLite export writes model.tflite and labels.txt,
    the ONNX export model.onnx and labels.txt. Every format computes in float32, also for a run trained in
    bfloat16 or float16, and applies a calibrated run's temperature (and abstain threshold: a `confident` output).
    """
    path = call(api.export, run_dir, fmt, output, version, top_k, tflite_mode, log=echo_err)
    if as_json:
        echo_json({"path": path, "format": fmt})
    else:
        click.echo(path)
