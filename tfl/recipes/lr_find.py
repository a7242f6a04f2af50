"""`tfl lr-find`: a learning-rate range test (Smith 2017; fastai's `lr_find`) over the stage about to train.

The stage is one of `tfl finetune`'s two (tfl.recipes.stages.head_then_finetune): `head` (the new head on the
frozen backbone, whose rate is --lr) or `finetune` (the layers above --freeze-up-to, whose backbone rate is
--backbone-lr). For --steps steps the swept group's rate grows exponentially from --start-lr to --end-lr (the other
group, if any, at the ratio --lr and --backbone-lr give); after every step the loss is smoothed (an exponential
moving average, beta 0.98, bias-corrected) and the test stops once the smoothed loss exceeds 4x its lowest or the
loss is not finite. It trains through the one stage loop (tfl.job.train_stages, Trainer.run_stage under the
strategy) with a growth factor in place of the schedule (StagePolicy.lr_growth), on the cached boundary activations
when the stage's boundary is cacheable, so a head test takes seconds. Every variable of the model is put back
afterwards: the run that follows starts from the original weights.

The suggestion is fastai's "valley" rule: the longest strictly descending subsequence of the smoothed loss
(leaving out the first tenth of the steps and the last five), and the point about halfway down it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import ClassVar

import numpy as np

from tfl import job as jobs
from tfl.errors import UsageError
from tfl.job import JobOptions
from tfl.options import BACKBONE_LR_FACTOR, LR_FIND, option
from tfl.reporting import table
from tfl.reporting.table import Column
from tfl.training.rundir import CHECKPOINTS, CONFIG, RunDir

STEM = "lr_find"  # the command's files: lr_find.json, .csv, .png (finetune --lr find: lr_find_<stage>.*)
# stage -> (the group whose rate is swept and suggested, the finetune flag it is for)
STAGES = {"head": ("head", "--lr"), "finetune": ("backbone", "--backbone-lr")}
SMOOTHING = 0.98  # fastai's Recorder: beta of the loss's moving average
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its lowest (fastai's stop_div)
MIN_STEPS = 10
SKIP_END = 5  # the valley leaves out the last steps (the loss exploding) and the first tenth (still noisy)


@dataclasses.dataclass
class LrFindOptions(JobOptions):
    unused: ClassVar = ("head_epochs", "epochs", "schedule", "warmup_epochs", "step_size", "gamma", "early_stopping",
                        "resume", "export", "tensorboard")
    option_help: ClassVar = {
        "lr": ("With --stage finetune: the head's rate is --lr / --backbone-lr times the swept backbone rate (only "
               "the ratio matters here)."),
        "backbone_lr": f"With --stage finetune: see --lr (default {BACKBONE_LR_FACTOR} x --lr).",
        "output_dir": ("Where lr_find.json, lr_find.csv and lr_find.png go (default: "
                       "runs/<time>-lr-find-<dataset>)."),
    }

    stage: str = option("head", choices=tuple(STAGES), help=(
        "The stage of `tfl finetune` to test: head (suggests --lr) or finetune (suggests --backbone-lr; start from a "
        "trained head with --init-from <run>/model.keras)."))
    start_lr: float = option(1e-7, check="positive", help="The swept rate at the first step.")
    end_lr: float = option(10.0, check="positive", help="The swept rate at the last step.")
    steps: int = option(100, check="positive", help=(
        "Steps from --start-lr to --end-lr (the train split is cycled through as often as needed); the test stops "
        "earlier when the loss diverges."))


def lr_find(opts: LrFindOptions, log=print) -> dict:
    """The command: a range test on a copy of the weights; writes lr_find.json, .csv, .png; returns the json."""
    check_range(opts.start_lr, opts.end_lr)
    check_steps(opts.steps)

    def recipe(job: jobs.Job) -> dict:
        result = range_test(job, opts.stage, opts.start_lr, opts.end_lr, opts.steps)
        run = RunDir(job.scratch or opts.output_dir)
        run.write_json(CONFIG, {**dataclasses.asdict(job.opts), "image_size": job.image_size,
                                "num_classes": len(job.class_names), "versions": jobs.versions()})
        write_result(run, result, title=f"{opts.backbone} on {job.splits.name}, stage {opts.stage}")
        log(f"lr-find: suggested {result['flag']} {result['suggestion']:.3g} (stage {opts.stage}, "
            f"{result['steps_run']} steps, {result['stopped']}, {result['seconds']:.1f}s); "
            f"wrote {run.file(STEM + '.png')}")
        return {**result, "run_dir": run.path}

    return jobs.run(opts, recipe, log)


def check_range(start: float, end: float) -> None:
    if not end > start:
        raise UsageError(f"--start-lr {start:g} and --end-lr {end:g}: the range must grow; give --end-lr > --start-lr")


def check_steps(steps: int) -> None:
    if steps < MIN_STEPS:
        raise UsageError(f"--steps {steps}: give at least {MIN_STEPS} (the valley rule leaves out the first tenth and "
                         f"the last {SKIP_END} steps); fastai's default is 100")


def write_result(run: RunDir, result: dict, stem: str = STEM, title: str | None = None) -> None:
    """<stem>.json (the result), <stem>.csv (one row per step) and <stem>.png (the curve) into `run`."""
    from tfl.reporting.figures import write_lr_find

    run.write_json(f"{stem}.json", result)
    run.write_csv(f"{stem}.csv", ["step", "lr", "loss", "smoothed_loss"], result["curve"])
    write_lr_find(result["curve"], result["suggestion_step"], run.file(f"{stem}.png"), result["flag"], title)


# -- the rule ----------------------------------------------------------------------------------------------------------
def smooth(losses, beta: float = SMOOTHING) -> np.ndarray:
    """The bias-corrected exponential moving average of `losses` (fastai's smoothed loss)."""
    out, average = [], 0.0
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * float(loss)
        out.append(average / (1 - beta**i))
    return np.array(out)


def valley(losses) -> int:
    """fastai's valley rule on a (smoothed) loss curve: the index about halfway down its longest strictly
    descending subsequence. fastai measures that subsequence from one point before its first (end - length) and
    steps a third plus a sixth of its length into it; so does this, for the same suggestions."""
    losses = np.asarray(losses, float)
    if losses.size == 0:
        raise ValueError("valley needs at least one loss")
    longest = np.ones(losses.size, int)  # longest[i]: the longest descending subsequence ending at i
    for i in range(1, losses.size):
        above = longest[:i][losses[:i] > losses[i]]
        if above.size:
            longest[i] = above.max() + 1
    end = int(np.argmax(longest))  # the first of the longest
    start = end - int(longest[end])
    third = (end - start) / 3
    return max(0, start + int(third) + int(third / 2))


def suggest(losses, planned_steps: int) -> int:
    """The step index (into `losses`, the smoothed curve) the valley rule picks, leaving out the first tenth of the
    planned steps and the last SKIP_END steps run when enough remain."""
    first, last = planned_steps // 10, len(losses) - SKIP_END
    if last - first < 3:
        first, last = 0, len(losses)
    return first + valley(losses[first:last])


# -- the test ----------------------------------------------------------------------------------------------------------
def range_test(job: jobs.Job, stage: str, start_lr: float, end_lr: float, steps: int) -> dict:
    """Train `stage` of job's two-stage recipe for up to `steps` steps, the swept group's rate from start_lr to
    end_lr, and put every variable of job.model back afterwards. Returns the curve and the suggestion."""
    from tfl.freezing import CLASSIFIER_STAGE
    from tfl.recipes.stages import head_then_finetune
    from tfl.training import boundary
    from tfl.training.trainer import Callback, StagePolicy, TrainConfig, Trainer, TrainingDiverged

    if stage not in STAGES:
        raise UsageError(f"--stage {stage!r} is not one of {', '.join(STAGES)}")
    check_range(start_lr, end_lr)
    check_steps(steps)
    group, flag = STAGES[stage]
    base = next(s for s in head_then_finetune(job) if s.name == stage)
    trains_backbone = any(not layer.frozen and layer.params and layer.stage != CLASSIFIER_STAGE
                          for layer in base.plan.layers)
    if group == "backbone" and not trains_backbone:
        raise UsageError(f"--stage finetune: --freeze-up-to {job.opts.freeze_up_to} freezes the whole backbone, so "
                         "the finetune stage trains no backbone layer to find --backbone-lr for; freeze less")
    growth = (end_lr / start_lr) ** (1.0 / (steps - 1))
    lrs = {name: start_lr * lr / base.lrs[group] for name, lr in base.lrs.items()}
    policy = StagePolicy(select="train_loss", warmup=False, lr_growth=growth)
    probe = dataclasses.replace(base, epochs=1, lrs=lrs, policy=policy)

    class Recorder(Callback):
        def __init__(self):
            self.lrs, self.losses, self.best, self.stopped = [], [], math.inf, "reached --end-lr"

        def on_train_step(self, stage_name, step, logs):
            self.lrs.append(logs[f"lr/{group}"])
            self.losses.append(logs["loss"])
            smoothed = smooth(self.losses)[-1]
            if smoothed > DIVERGED * self.best:
                self.stopped = f"diverged (smoothed loss > {DIVERGED:g}x its lowest)"
                raise _Done()
            self.best = min(self.best, smoothed)
            if len(self.losses) >= steps:
                raise _Done()

    recorder = Recorder()
    saved = [np.array(v.numpy()) for v in job.model.variables]
    started = time.time()
    inputs = boundary.for_job(job, [probe])
    cfg = TrainConfig.from_options(job.opts, loss_scale=job.precision.precision == "float16")
    trainer = Trainer(job.strategy, job.model, len(job.class_names), cfg, job.log, callbacks=[recorder],
                      select="train_loss")
    per_epoch = job.steps_per_epoch

    def adapt(stage_, feed, groups):
        epochs = -(-steps // per_epoch)

        def train(_epoch):  # the range test's one "epoch": as many passes over the train split as its steps need
            batches = feed.train(1)
            for epoch in range(2, epochs + 1):
                batches = batches.concatenate(feed.train(epoch))
            return batches

        return {"train": train, "val": feed.val.take(0), "steps": steps, "val_steps": 0}

    try:
        jobs.train_stages(trainer, job.model, inputs, [probe], job.opts.freeze_mode, job.opts.train_bn, per_epoch,
                          job.batch, 0, job.log, adapt)
    except _Done:
        pass
    except TrainingDiverged:
        recorder.stopped = "diverged (the loss became NaN or infinite)"
    finally:
        for variable, value in zip(job.model.variables, saved):
            variable.assign(value)
    seconds = time.time() - started
    if len(recorder.losses) < 2:
        raise UsageError(f"lr-find: the loss diverged within {len(recorder.losses)} step(s) of --start-lr "
                         f"{start_lr:g}; lower --start-lr")
    smoothed = smooth(recorder.losses)
    index = suggest(smoothed, steps)
    suggestion = float(recorder.lrs[index])
    return {
        "stage": stage, "group": group, "flag": flag, "suggestion": suggestion,
        "suggested_lrs": {name: suggestion * lr / lrs[group] for name, lr in lrs.items()},
        "suggestion_step": index + 1, "start_lr": start_lr, "end_lr": end_lr, "steps": steps,
        "steps_run": len(recorder.losses), "stopped": recorder.stopped, "min_loss_lr": float(
            recorder.lrs[int(np.argmin(smoothed))]),
        "cached": inputs.stage_boundary.get(stage), "seconds": round(seconds, 1), "rule": "valley",
        "curve": [{"step": i + 1, "lr": float(lr), "loss": float(loss), "smoothed_loss": float(s)}
                  for i, (lr, loss, s) in enumerate(zip(recorder.lrs, recorder.losses, smoothed))],
    }


class _Done(Exception):
    """Ends the range test from its step callback: the steps are done or the loss diverged."""


# -- finetune --lr find ------------------------------------------------------------------------------------------------
def finding(recipe, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100):
    """`recipe` after --lr find / --backbone-lr find: the range test over the head stage gives --lr, over the finetune
    stage --backbone-lr (the head moving at 1 / BACKBONE_LR_FACTOR times the backbone, or --lr / --backbone-lr).
    The job's options then hold the rates found; config.json records them and "lr_find" (per option: what was
    found, from which stage, at which step); lr_find_<stage>.json/.csv/.png go beside. A resumed run takes the rates
    its config.json recorded instead of testing again."""
    def run(job: jobs.Job) -> dict:
        opts = job.opts
        wanted = [(stage, name) for stage, name in (("head", "lr"), ("finetune", "backbone_lr"))
                  if getattr(opts, name) == LR_FIND]
        scale = job.replicas if opts.scale_lr else 1  # the options hold rates before --scale-lr
        # While testing, a rate still to be found is a placeholder: only ratios between groups matter.
        job.opts = dataclasses.replace(opts, lr=1.0 if opts.lr == LR_FIND else opts.lr,
                                       backbone_lr=None if opts.backbone_lr == LR_FIND else opts.backbone_lr)
        earlier = _recorded(opts.output_dir)
        records = {}
        for stage, name in wanted:
            flag = "--" + name.replace("_", "-")
            if name in earlier:
                records[name] = earlier[name]
                job.log(f"{flag} find: {earlier[name]['found']:.3g}, as the run being resumed found it")
            else:
                job.log(f"{flag} find: a learning-rate range test over the {stage} stage ({steps} steps at most)")
                result = range_test(job, stage, start_lr, end_lr, steps)
                records[name] = {"requested": LR_FIND, "found": result["suggestion"] / scale, "stage": stage,
                                 "step": result["suggestion_step"], "steps_run": result["steps_run"],
                                 "stopped": result["stopped"]}
                job.log(f"{flag} find: {records[name]['found']:.3g} (the valley of the smoothed loss at step "
                        f"{result['suggestion_step']} of {result['steps_run']}, {result['seconds']:.1f}s)")
                if not job.scratch:
                    write_result(RunDir(opts.output_dir), result, f"lr_find_{stage}",
                                 title=f"{opts.backbone} on {job.splits.name}, stage {stage}")
            job.opts = dataclasses.replace(job.opts, **{name: records[name]["found"]})
        record = job.record if job.record is not None else dataclasses.asdict(job.opts)
        job.record = {**record, **{name: r["found"] for name, r in records.items()}, "lr_find": records}
        return recipe(job)
    return run


def _recorded(output_dir: str | None) -> dict:
    """The "lr_find" record of the run in `output_dir` when it has a checkpoint to resume from, else {}."""
    import os

    from tfl.training import checkpoint

    if not output_dir or not checkpoint.has_checkpoint(os.path.join(output_dir, CHECKPOINTS)):
        return {}
    try:
        return dict(RunDir(output_dir, create=False).read_json(CONFIG).get("lr_find") or {})
    except UsageError:
        return {}  # no readable config: the resume check says so


TABLE = (Column("stage", "stage"), Column("flag", "flag"), Column("suggestion", "suggestion", ".3g"),
         Column("min-loss lr", "min_loss_lr", ".3g"), Column("steps", "steps_run"),
         Column("stopped", "stopped"), Column("cached", lambda r: r.get("cached") or "no"),
         Column("seconds", "seconds", ".1f"))


def format_table(result: dict) -> str:
    return table.format_table(TABLE, [result], notes=[
        f"use: tfl finetune {result['flag']} {result['suggestion']:.3g}   (curve: {result['run_dir']}/{STEM}.png)"])
