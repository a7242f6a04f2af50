"""Weight averaging of runs that share an architecture: WiSE-FT and greedy model soups.

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): the backbone's weights become
(1 - alpha) * pretrained + alpha * fine-tuned; the fine-tuned head is kept as it is, since a new head has no
pretrained weights to go back to (mlfoundations/wise-ft#8). alpha = 0 is the pretrained backbone under the new
head, alpha = 1 the fine-tuned run itself. The pretrained backbone is rebuilt from the run's config.json the way
training built it (tfl.job.Job.setup: the backbone's weights, --init-from, the seed); for a run with --weights
none that is the seeded random initialisation.

Model soups (Wortsman et al., "Model soups", ICML 2022, Recipe 1, the greedy soup): the runs ranked by val
accuracy; starting from the best, each next run joins when the uniform average of the soup with it scores at least
the soup's val accuracy so far. So the soup never scores below its best ingredient on val.

Every weight of the backbone counts, BatchNorm's moving mean and variance included (they are interpolated or
averaged like the kernels); weights that are not floating point (counters, seed-generator states) are copied from
the fine-tuned run (WiSE-FT) or the best ingredient (soup). Both write a normal run directory (config.json,
classes.json, model.keras, metrics.json) that evaluate, predict, report, calibrate and export accept.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable, Sequence

import numpy as np

from tfl.calibration import accuracy_nll
from tfl.errors import UsageError, check_batch_size
from tfl.reporting import figures
from tfl.reporting.table import Column, format_table
from tfl.training import rundir

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))  # 0, 0.1, ..., 1 (--alphas)
WISE_CSV, WISE_PNG = "wise_ft.csv", "wise_ft.png"
SOUP_CSV = "soup.csv"
WISE_SUFFIX, SOUP_SUFFIX = "-wiseft", "-soup"
# What makes two runs' weights averageable: the same network (config.json's fields), classes and initialisation.
SAME_NETWORK = ("backbone", "weights_resolved", "init_from", "head_hidden", "image_size", "num_classes")
# The seed is the initialisation too when the backbone starts from random weights (--weights none).
SAME_RANDOM_INIT = ("seed",)
# Which run's data the soup is scored on; runs that differ here held out other images (a warning, not a refusal).
DATA_FIELDS = ("dataset", "data_dir", "val_split", "seed")


# -- the arithmetic ---------------------------------------------------------------------------------------------------
def interpolate(pretrained: Sequence[np.ndarray], finetuned: Sequence[np.ndarray], alpha: float) -> list[np.ndarray]:
    """(1 - alpha) * pretrained + alpha * finetuned per array, in float64, cast back: exact at alpha 0 and 1.
    Arrays that are not floating point are copied from `finetuned`."""
    out = []
    for p, f in zip(pretrained, finetuned, strict=True):
        if not np.issubdtype(f.dtype, np.floating):
            out.append(f.copy())
        else:
            mixed = (1.0 - alpha) * p.astype(np.float64) + alpha * f.astype(np.float64)
            out.append(mixed.astype(f.dtype))
    return out


def average(ingredients: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The uniform average of each array over the ingredients, in float64, cast back (one ingredient: itself,
    exactly). Arrays that are not floating point are copied from the first ingredient."""
    out = []
    for arrays in zip(*ingredients, strict=True):
        first = arrays[0]
        if not np.issubdtype(first.dtype, np.floating):
            out.append(first.copy())
        else:
            out.append((sum(a.astype(np.float64) for a in arrays) / len(arrays)).astype(first.dtype))
    return out


def parse_alphas(alphas, option: str = "--alphas") -> tuple[float, ...]:
    """--alphas "0,0.25,1" (or a list of numbers) -> sorted distinct values in [0, 1], with 1 always among them."""
    if alphas is None:
        values = list(DEFAULT_ALPHAS)
    else:
        items = alphas.split(",") if isinstance(alphas, str) else list(alphas)
        values = []
        for item in items:
            try:
                value = float(item)
            except (TypeError, ValueError):
                raise UsageError(f"{option} {alphas!r}: {item!r} is not a number; give numbers in [0, 1] separated "
                                 "by commas, e.g. 0,0.5,1") from None
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{option} {alphas!r}: {value:g} is outside [0, 1] (0: the pretrained backbone, 1: "
                                 "the fine-tuned one)")
            values.append(value)
    return tuple(sorted(set(values) | {1.0}))


def weight_list(model) -> list:
    """The model's variables in a fixed order (Keras' own, which the same architecture repeats)."""
    return list(model.weights)


def backbone_weights(model) -> list:
    """The variables of the backbone sub-model (tfl.models.backbone_of); everything else is the head's."""
    from tfl.models import backbone_of

    return list(backbone_of(model).weights)


def check_same_shapes(a: list, b: list, what: str) -> None:
    if len(a) != len(b) or any(tuple(x.shape) != tuple(y.shape) for x, y in zip(a, b)):
        shapes = next(((x.path, tuple(x.shape), tuple(y.shape)) for x, y in zip(a, b)
                       if tuple(x.shape) != tuple(y.shape)), None)
        detail = (f"{shapes[0]} is {shapes[1]} in one and {shapes[2]} in the other" if shapes
                  else f"{len(a)} variables against {len(b)}")
        raise UsageError(f"{what}: the two models do not have the same architecture ({detail})")


def assign(variables: list, arrays: list[np.ndarray]) -> None:
    for v, a in zip(variables, arrays, strict=True):
        v.assign(a)


# -- scoring on a split ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Scorer:
    """Val and test pipelines of a run's data, and (accuracy, NLL) of a model on them."""

    splits: object
    image_size: int
    batch_size: int

    def pipeline(self, split: str):
        from tfl import data

        source = getattr(self.splits, split)
        if source is None:
            return None
        return data.make_pipeline(source, self.image_size, self.batch_size, training=False, seed=0)

    def __post_init__(self):
        self.val = self.pipeline("val")
        self.test = self.pipeline("test")
        if self.val is None or not self.splits.num_examples.get("val"):
            raise UsageError(f"{self.splits.name}: the val split is empty, and choosing by val accuracy needs it; "
                             "give the dataset a val/ folder, or train with a larger --val-split")

    def score(self, model, split: str) -> dict | None:
        from tfl.inference import logits_of

        pipeline = self.val if split == "val" else self.test
        if pipeline is None:
            return None
        labels, logits = logits_of(model, pipeline)
        return accuracy_nll(logits, labels)


def run_metrics(val: dict, test: dict | None, extra: dict) -> dict:
    """metrics.json as a trained run's: test scores (val's without a test split), val accuracy, eval_split."""
    held_out = ({"test_accuracy": test["accuracy"], "test_loss": test["nll"]} if test is not None
                else {"val_loss": val["nll"]})
    return {**held_out, "val_accuracy": val["accuracy"], "val_loss": val["nll"],
            "eval_split": "test" if test is not None else "val", **extra}


# -- the pretrained model of a run -----------------------------------------------------------------------------------
def job_options(config: dict):
    """The JobOptions a run was trained with, from its config.json (list values back to tuples); computing in
    float32 and writing nothing."""
    from tfl.options import JobOptions

    def as_tuple(value):
        return tuple(as_tuple(v) for v in value) if isinstance(value, list) else value

    values = {}
    for field in dataclasses.fields(JobOptions):
        if field.name in config:
            values[field.name] = as_tuple(config[field.name])
    return JobOptions(**{**values, "output_dir": None, "resume": False, "overwrite": False, "export": False,
                         "tensorboard": False, "mixed_precision": "off", "strategy": "auto", "devices": None,
                         "worker_hosts": (), "task_index": None})


def pretrained_job(run_path: str, log=print):
    """A Job set up from the run's config.json as training set it up (tfl.job.Job.setup: seed, data, the classifier
    with its pretrained backbone, --init-from): job.model is the model before any training, job.splits the run's
    data. For --weights none the backbone is the seeded random initialisation."""
    import tensorflow as tf

    from tfl.job import Job

    config = rundir.RunDir(run_path, create=False).read_json(rundir.CONFIG)
    if not isinstance(config, dict) or "backbone" not in config:
        raise UsageError(f"--run {run_path}: its config.json names no backbone; is it a tfl run directory?")
    init_from = config.get("init_from")
    if init_from and not os.path.exists(init_from):
        raise UsageError(f"--run {run_path} started from --init-from {init_from}, which is gone; the pretrained "
                         "weights are that file's, so put it back (run from the directory the run was started in)")
    return Job.setup(job_options(config), log, tf.distribute.get_strategy())


# -- the output run directory ----------------------------------------------------------------------------------------
def check_output(path: str, option: str = "--output") -> None:
    if rundir.run_files(path):
        raise UsageError(f"{option} {path} is not empty; choose another {option}, or remove that directory first")


def write_run(out: str, model, config: dict, classes: list[str], metrics: dict, source: str) -> rundir.RunDir:
    """A run directory holding `model`: config.json, classes.json, model.keras, metrics.json, and the source
    run's freeze_plan.json (what its layers were)."""
    run = rundir.RunDir(out)
    run.write_json(rundir.CONFIG, config)
    run.write_json(rundir.CLASSES, classes)
    plan = os.path.join(source, rundir.PLAN)
    if os.path.isfile(plan):
        shutil.copyfile(plan, run.file(rundir.PLAN))
    model.trainable = True
    run.save_model(model)
    run.write_json(rundir.METRICS, metrics)
    return run


def default_output(run_path: str, suffix: str) -> str:
    return os.path.normpath(run_path) + suffix


# -- WiSE-FT -----------------------------------------------------------------------------------------------------------
WISE_TABLE = (Column("alpha", "alpha", "g"), Column("val acc", "val_accuracy", ".4f"),
              Column("val NLL", "val_nll", ".4f"), Column("test acc", "test_accuracy", ".4f"),
              Column("test NLL", "test_nll", ".4f"), Column("", lambda r: "chosen" if r.get("chosen") else ""))


def wise_ft(run_path: str, alphas=None, output: str | None = None, batch_size: int = 64,
            log: Callable = print, alpha: float | None = None) -> dict:
    """`tfl wise-ft --run DIR`: sweep alpha on val, keep the best (ties: the larger alpha), write the run. With
    `alpha`, that alpha is kept whatever val says (1 is still scored, for the record)."""
    check_batch_size(batch_size)
    if alpha is not None and alphas is not None:
        raise UsageError("--alpha fixes alpha and --alphas sweeps it; give one of them")
    fixed = None if alpha is None else min(parse_alphas([alpha], "--alpha"))  # checked to be in [0, 1]
    alphas = parse_alphas(alphas if fixed is None else [fixed])
    run_path = os.fspath(run_path)
    source = rundir.RunDir(run_path, create=False)
    out = os.fspath(output) if output else default_output(run_path, WISE_SUFFIX)
    check_output(out)
    finetuned, classes = source.load()
    config = source.read_json(rundir.CONFIG)
    log(f"wise-ft: rebuilding the pretrained model of {run_path} ...")
    job = pretrained_job(run_path, log)
    if list(job.class_names) != list(classes):
        raise UsageError(f"--run {run_path}: its classes.json differs from its dataset's classes now "
                         f"({len(classes)} against {len(job.class_names)}); restore the run's data")
    where = f"--run {run_path}"
    pre_vars, ft_vars = backbone_weights(job.model), backbone_weights(finetuned)
    check_same_shapes(pre_vars, ft_vars, where)
    check_same_shapes(weight_list(job.model), weight_list(finetuned), where)
    pretrained = [v.numpy() for v in pre_vars]
    tuned = [v.numpy() for v in ft_vars]
    scorer = Scorer(job.splits, job.image_size, batch_size)
    rows = []
    for alpha in alphas:
        assign(ft_vars, interpolate(pretrained, tuned, alpha))
        val, test = scorer.score(finetuned, "val"), scorer.score(finetuned, "test")
        rows.append({"alpha": alpha, "val_accuracy": val["accuracy"], "val_nll": val["nll"],
                     "test_accuracy": test["accuracy"] if test else None, "test_nll": test["nll"] if test else None})
        log(f"wise-ft: alpha {alpha:g}: val accuracy {val['accuracy']:.4f}, NLL {val['nll']:.4f}"
            + (f"; test accuracy {test['accuracy']:.4f}" if test else ""))
    if fixed is None:
        best = max(rows, key=lambda r: (r["val_accuracy"], r["alpha"]))  # ties: the larger alpha, nearer the run
    else:
        best = next(r for r in rows if r["alpha"] == fixed)
    best["chosen"] = True
    alpha = best["alpha"]
    assign(ft_vars, interpolate(pretrained, tuned, alpha))
    chosen_by = "best val accuracy" if fixed is None else "fixed by --alpha"
    record = {"source_run": os.path.abspath(run_path), "alpha": alpha, "alphas": list(alphas), "chosen_by": chosen_by,
              "pretrained": "the seeded random initialisation (--weights none)"
              if config.get("weights_resolved") is None and not config.get("init_from")
              else "the backbone's initial weights as the run loaded them"}
    test = {"accuracy": best["test_accuracy"], "nll": best["test_nll"]} if best["test_accuracy"] is not None else None
    metrics = run_metrics({"accuracy": best["val_accuracy"], "nll": best["val_nll"]}, test,
                          {"alpha": alpha, "source_run": record["source_run"],
                           "source_val_accuracy": rows[-1]["val_accuracy"]})
    run = write_run(out, finetuned, {**config, "recipe": "wise-ft", "wise_ft": record}, list(classes), metrics,
                    run_path)
    run.write_csv(WISE_CSV, ["alpha", "val_accuracy", "val_nll", "test_accuracy", "test_nll"], rows,
                  extrasaction="ignore")
    figures.write_wise_ft(rows, alpha, run.file(WISE_PNG),
                      title=f"WiSE-FT of {os.path.basename(os.path.normpath(run_path))}")
    log(f"wise-ft: alpha {alpha:g} chosen; wrote {out}")
    return {"run_dir": out, "source_run": run_path, "alpha": alpha, "rows": rows, "metrics": metrics,
            "chosen_by": chosen_by}


def format_wise(result: dict) -> str:
    m = result["metrics"]
    held = (f"test accuracy {m['test_accuracy']:.4f}" if "test_accuracy" in m
            else f"val accuracy {m['val_accuracy']:.4f}")
    return format_table(WISE_TABLE, result["rows"], notes=[
        f"alpha {result['alpha']:g} ({result.get('chosen_by', 'best val accuracy')}; 1 is the fine-tuned run): "
        f"{held}; run directory "
        f"{result['run_dir']}"])


# -- greedy soup -----------------------------------------------------------------------------------------------------
SOUP_TABLE = (Column("ingredient", "ingredient"), Column("val acc", "val_accuracy", ".4f"),
              Column("soup val acc", "soup_val_accuracy", ".4f"),
              Column("kept", lambda r: "yes" if r["kept"] else "no"))


def check_compatible(configs: dict[str, dict], classes: dict[str, list]) -> None:
    """Refuse runs whose weights cannot be averaged: another network, other classes or another initialisation."""
    first, *rest = configs
    for path in rest:
        fields = SAME_NETWORK + (SAME_RANDOM_INIT if configs[first].get("weights_resolved") is None else ())
        for field in fields:
            a, b = configs[first].get(field), configs[path].get(field)
            if a != b:
                why = " (with --weights none the seed is the initialisation)" if field == "seed" else ""
                raise UsageError(f"soup: {path} has {field} {b!r} but {first} has {a!r}{why}; a soup needs runs of "
                                 "one architecture and one initialisation (e.g. one command's seeds or learning "
                                 "rates); leave that run out")
        if classes[path] != classes[first]:
            raise UsageError(f"soup: {path} has other classes than {first} ({len(classes[path])} against "
                             f"{len(classes[first])}, or another order); leave that run out")


def soup(run_paths: Sequence[str], output: str | None = None, batch_size: int = 64, log: Callable = print) -> dict:
    """`tfl soup RUN RUN ...`: the greedy soup of the runs, scored on the first run's val split."""
    from tfl import data

    check_batch_size(batch_size)
    paths = [os.fspath(p) for p in run_paths]
    if not paths:
        raise UsageError("soup: give at least one run directory (two or more to average)")
    if len(set(map(os.path.realpath, paths))) != len(paths):
        raise UsageError("soup: a run is named twice; name each run once")
    dirs = {p: rundir.RunDir(p, create=False) for p in paths}
    configs = {p: d.read_json(rundir.CONFIG) for p, d in dirs.items()}
    classes = {p: d.read_classes() for p, d in dirs.items()}
    check_compatible(configs, classes)
    out = os.fspath(output) if output else default_output(paths[0], SOUP_SUFFIX)
    check_output(out)
    first = configs[paths[0]]
    differing = [f for f in DATA_FIELDS if any(c.get(f) != first.get(f) for c in configs.values())]
    warnings = []
    if differing:
        warnings.append(f"the runs differ in {', '.join(differing)}: all are scored on {paths[0]}'s val split, which "
                        "other runs may have trained on when the dataset has no val/ folder (--val-split carves it "
                        "from train by seed); their val accuracies are then optimistic")
        log(f"soup: warning: {warnings[-1]}")
    splits = data.load_dataset(first["dataset"], data_dir=first.get("data_dir"), val_split=first.get("val_split", 0.1),
                               seed=first.get("seed", 0), skip_bad_images=bool(first.get("skip_bad_images", False)),
                               log=log)
    if list(splits.class_names) != list(classes[paths[0]]):
        raise UsageError(f"soup: {paths[0]}'s dataset has other classes now than its classes.json; restore its data")
    models = {p: dirs[p].load_model() for p in paths}
    image_size = int(models[paths[0]].inputs[0].shape[1])
    scorer = Scorer(splits, image_size, batch_size)
    weights = {}
    for p in paths:
        variables = weight_list(models[p])
        if p != paths[0]:
            check_same_shapes(weight_list(models[paths[0]]), variables, f"soup: {p} and {paths[0]}")
        weights[p] = [v.numpy() for v in variables]
    val = {}
    for p in paths:
        val[p] = scorer.score(models[p], "val")
        log(f"soup: {p}: val accuracy {val[p]['accuracy']:.4f}")
    ranked = sorted(paths, key=lambda p: -val[p]["accuracy"])  # stable: equals keep the order given
    best = ranked[0]
    container = models[best]
    models.clear()  # the arrays above are all the other runs are needed for
    variables = weight_list(container)
    kept, current = [best], val[best]
    rows = [{"ingredient": best, "val_accuracy": val[best]["accuracy"], "soup_val_accuracy": current["accuracy"],
             "kept": True}]
    for p in ranked[1:]:
        assign(variables, average([weights[k] for k in kept + [p]]))
        trial = scorer.score(container, "val")
        joins = trial["accuracy"] >= current["accuracy"]
        rows.append({"ingredient": p, "val_accuracy": val[p]["accuracy"], "soup_val_accuracy": trial["accuracy"],
                     "kept": joins})
        log(f"soup: with {p}: val accuracy {trial['accuracy']:.4f} ({'kept' if joins else 'left out'})")
        if joins:
            kept.append(p)
            current = trial
    assign(variables, average([weights[k] for k in kept]))
    test = scorer.score(container, "test")
    metrics = run_metrics(current, test, {"ingredients": len(kept), "best_ingredient": best,
                                          "best_ingredient_val_accuracy": val[best]["accuracy"]})
    record = {"ingredients": [os.path.abspath(p) for p in ranked], "kept": [os.path.abspath(p) for p in kept],
              "scored_on": os.path.abspath(paths[0]), "warnings": warnings}
    run = write_run(out, container, {**configs[best], "recipe": "soup", "soup": record}, classes[best], metrics, best)
    run.write_csv(SOUP_CSV, ["ingredient", "val_accuracy", "soup_val_accuracy", "kept"], rows)
    log(f"soup: {len(kept)} of {len(paths)} runs kept; wrote {out}")
    return {"run_dir": out, "ingredients": rows, "kept": kept, "warnings": warnings, "metrics": metrics}


def format_soup(result: dict) -> str:
    m = result["metrics"]
    held = (f"test accuracy {m['test_accuracy']:.4f}" if "test_accuracy" in m else "no test split")
    notes = [f"soup of {len(result['kept'])}: val accuracy {m['val_accuracy']:.4f} (best single run "
             f"{m['best_ingredient_val_accuracy']:.4f}), {held}; run directory {result['run_dir']}"]
    return format_table(SOUP_TABLE, result["ingredients"], notes=notes + [f"warning: {w}" for w in result["warnings"]])
