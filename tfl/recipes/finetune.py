"""`tfl finetune`: two-stage fine-tuning (the default), or gradual unfreezing.

two_stage: stage 1 trains the new head on the frozen backbone at `lr`; stage 2 unfreezes the layers above
`freeze_up_to` (and as the --freeze/--unfreeze rules say), the backbone at `backbone_lr` (default 0.3 x lr), the
head at `lr`, linear warmup, then the chosen schedule. The best weights by validation accuracy are restored.

gradual (ULMFiT, Howard & Ruder 2018: unfreeze the model gradually, layer by layer from the end):
stage 1 as above, then one more canonical stage becomes trainable at each step, from the top down to the one
above `freeze_up_to`. Every canonical stage is its own parameter group; stage k below the top trains at
backbone_lr / F^k (--lr-decay-per-stage F; ULMFiT used 2.6). A step keeps the optimizer state of the groups that
were already training (moments and schedule position, as fastai's freeze_to on one optimizer), and each group's
schedule spans the epochs from the step that unfroze it to the end.
"""

from __future__ import annotations

import dataclasses

from tfl import job as jobs
from tfl.errors import UsageError
from tfl.job import Job, JobOptions, Stage
from tfl.options import (BACKBONE_LR_FACTOR, BALANCE, FREEZE_AUTO, LR_FIND, TTA_MODES, TTA_NONE, UNFREEZE,
                         AdapterOptions, ProxyOptions, option)
from tfl.recipes.advise import resolve_auto
from tfl.recipes.stages import prepare_balanced, two_stage


@dataclasses.dataclass
class FinetuneOptions(JobOptions, AdapterOptions, ProxyOptions):
    # --lr and --backbone-lr as JobOptions declares them, and also "find" (tfl.recipes.lr_find.finding)
    lr: float | str = option(1e-3, group="train", check="positive", words=(LR_FIND,), metavar="FLOAT|find", help=(
        "Learning rate of the head. find: a learning-rate range test over the head stage chooses it (as `tfl "
        "lr-find` does, on the cached features; the run then starts from the original weights); config.json records "
        "the rate found."))
    backbone_lr: float | str | None = option(None, group="train", check="positive", words=(LR_FIND,),
                                             metavar="FLOAT|find", help=(
        f"Learning rate of the backbone once it trains (default: {BACKBONE_LR_FACTOR} x --lr). find: a range test "
        "over the finetune stage chooses it (as `tfl lr-find --stage finetune`)."))
    unfreeze_mode: str = option("two_stage", choices=UNFREEZE, help=(
        "two_stage: the head, then everything above --freeze-up-to at once. gradual (ULMFiT): the head, then one "
        "more canonical stage from the top every --unfreeze-every epochs (or as --unfreeze-schedule says), never "
        "below --freeze-up-to, within --epochs."))
    unfreeze_every: int = option(1, check="positive", metavar="K", help=(
        "Gradual: epochs between unfreezing steps; the last step takes what --epochs has left."))
    unfreeze_schedule: str | None = option(None, metavar="STAGE:EPOCHS,...", help=(
        "Gradual: the steps explicitly, top stage first, e.g. 'head:2,block7:1,block6:1,block5:2' (each makes that "
        "canonical stage trainable too; the epochs replace --epochs)."))
    lr_decay_per_stage: float = option(1.0, check="positive", metavar="F", help=(
        "Gradual: discriminative learning rates, stage k below the top at --backbone-lr / F^k (ULMFiT used 2.6); 1 "
        "keeps one rate."))
    balance: str = option("none", choices=BALANCE, help=(
        "For imbalanced classes. sampler: every epoch draws its batches with replacement, each class equally "
        "likely; loss: each training row's loss weighted by n / (classes x its class's count). Validation and test "
        "stay unweighted; config.json records the counts and weights."))
    calibrate: bool = option(False, group="run", help=(
        "Then fit a temperature on the val split, as `tfl calibrate --run` does (before --export, so the export "
        "holds it): predict, evaluate, report and export return softmax(logits / T); calibration.json has T and "
        "ECE, NLL and Brier before and after."))
    abstain: str | None = option(None, group="run", metavar="coverage:C|precision:P", help=(
        "With --calibrate: also choose a threshold on the calibrated top probability on val, as `tfl calibrate "
        "--abstain` does (coverage:0.95 or precision:0.99); predict marks answers below it 'unsure', exports add a "
        "`confident` output."))
    tta: str = option(TTA_NONE, group="run", choices=TTA_MODES, help=(
        "Then decide on val whether test-time augmentation (the mean logits over flip, or flip+crops, views) "
        "replaces the model's, as `tfl calibrate --tta` does; implies --calibrate (T is fitted on the chosen "
        "logits). Kept only if val accuracy rises, or stays equal with a lower val NLL; calibration.json records "
        "the decision and both numbers."))


def finetune(opts: FinetuneOptions, log=print) -> dict:
    if opts.unfreeze_mode not in UNFREEZE:
        raise UsageError(f"--unfreeze-mode {opts.unfreeze_mode!r} is not one of {', '.join(UNFREEZE)}")
    from tfl.recipes.balance import check_balance

    check_balance(opts.balance)
    recipe = gradual if opts.unfreeze_mode == "gradual" else two_stage
    _check_gradual_options(opts)
    _check_budget(opts)
    if opts.tta not in TTA_MODES:
        raise UsageError(f"--tta {opts.tta!r} is not one of {', '.join(TTA_MODES)}")
    calibrate = opts.calibrate or opts.tta != TTA_NONE  # --tta implies the calibration finisher
    if opts.abstain is not None:
        from tfl.calibration import parse_abstain

        parse_abstain(opts.abstain)
        if not calibrate:
            raise UsageError(f"--abstain {opts.abstain}: the threshold is on calibrated probabilities; add --calibrate")
    if calibrate:
        recipe = calibrating(recipe, opts.abstain, opts.tta)
    if LR_FIND in (opts.lr, opts.backbone_lr):
        from tfl.recipes.lr_find import finding

        if opts.freeze_up_to == FREEZE_AUTO:
            raise UsageError("--freeze-up-to auto with --lr find or --backbone-lr find: the depth is chosen by short "
                             "runs at --lr; give --lr a number, or a stage to --freeze-up-to")
        recipe = finding(recipe)
    return jobs.run(opts, recipe, log, resolve_depth=resolve_auto)


def calibrating(recipe, abstain: str | None = None, tta: str = TTA_NONE):
    """The recipe, with TTA decided (--tta), then the temperature (and --abstain's threshold) fitted, on val once the
    best model is saved."""
    def run(job: Job) -> dict:
        from tfl.inference import calibrate_job

        job.finishers.append(lambda job: calibrate_job(job, abstain, tta))
        return recipe(job)
    return run


def _check_budget(opts: FinetuneOptions) -> None:
    """Refuse a run that would train nothing: it would save the untrained model as if it were the result."""
    if not opts.unfreeze_schedule and opts.head_epochs + opts.epochs < 1:  # a schedule's steps are >= 1 epoch each
        raise UsageError(f"--head-epochs {opts.head_epochs} and --epochs {opts.epochs}: nothing would be trained (the "
                         "run would save the untrained model as its result); give at least one epoch, e.g. "
                         "--head-epochs 1")


def gradual(job: Job) -> dict:
    from tfl.freezing import head_only_plan

    steps = gradual_steps(job.spec, job.plan, job.opts)
    # One name per group throughout: "classifier" for the new head ("head" is a backbone stage here).
    stages = [Stage("head", head_only_plan(job.plan), job.opts.head_epochs, {"classifier": job.lr},
                    group_of=group_per_stage)]
    stages += unfreeze_stages(job.plan, steps, job.lr, job.backbone_lr, job.opts.lr_decay_per_stage)
    job.log("gradual unfreezing: " + ", ".join(f"{s.name} {s.epochs} epoch(s)" for s in stages[1:]))
    prepare_balanced(job, stages, config={"unfreeze_steps": [list(step) for step in steps]})
    job.train(stages)
    return job.finish()


# -- the schedule --------------------------------------------------------------------------------------------------
def trainable_stages(spec, plan) -> list[str]:
    """Canonical stages with weights above the freeze boundary, top first: the order they unfreeze in."""
    from tfl.freezing import CLASSIFIER_STAGE

    open_stages = {layer.stage for layer in plan.layers if not layer.frozen and layer.params}
    return [s for s in reversed(spec.stage_names) if s in open_stages and s != CLASSIFIER_STAGE]


def gradual_steps(spec, plan, opts: FinetuneOptions) -> list[tuple[str, int]]:
    """[(canonical stage unfrozen at this step, epochs)], top first.

    --unfreeze-schedule gives them; else every --unfreeze-every epochs one more stage, within --epochs (the last
    step takes what remains, so the fine-tuning budget is --epochs either way)."""
    available = trainable_stages(spec, plan)
    if not available:
        raise UsageError(f"--unfreeze-mode gradual: nothing lies above --freeze-up-to {opts.freeze_up_to} to unfreeze")
    if opts.unfreeze_schedule:
        steps = parse_schedule(opts.unfreeze_schedule)
        names = [name for name, _ in steps]
        if names != available[: len(names)]:
            raise UsageError(f"--unfreeze-schedule {opts.unfreeze_schedule!r}: steps must name canonical stages from "
                             f"the top down, one each, above --freeze-up-to {opts.freeze_up_to}: "
                             f"{', '.join(available)} (in that order)")
        return steps
    steps, left = [], opts.epochs
    for name in available:
        if left <= 0:
            break
        take = min(opts.unfreeze_every, left) if name != available[-1] else left  # the last step trains on
        steps.append((name, take))
        left -= take
    return steps


def parse_schedule(text: str) -> list[tuple[str, int]]:
    steps = []
    for part in text.split(","):
        name, sep, epochs = part.strip().rpartition(":")
        if not sep or not name or not epochs.strip().isdigit() or int(epochs) < 1:
            raise UsageError(f"--unfreeze-schedule {text!r}: {part.strip()!r} is not STAGE:EPOCHS with EPOCHS >= 1, "
                             "e.g. 'head:2,block7:1,block6:1'")
        steps.append((name.strip(), int(epochs)))
    return steps


def unfreeze_stages(plan, steps, lr: float, backbone_lr: float, decay: float) -> list[Stage]:
    """One Stage per step: its plan freezes every canonical stage not yet unfrozen; groups per canonical stage."""
    from tfl.freezing import CLASSIFIER_STAGE
    from tfl.training.trainer import StagePolicy

    stages, opened = [], []
    remaining = sum(epochs for _, epochs in steps)
    for i, (name, epochs) in enumerate(steps):
        opened.append(name)
        layers = [dataclasses.replace(layer, frozen=layer.frozen or (layer.stage != CLASSIFIER_STAGE
                                                                     and layer.stage not in opened))
                  for layer in plan.layers]
        step_plan = dataclasses.replace(plan, layers=layers)
        lrs = {"classifier": lr, **{s: backbone_lr / decay**k for k, s in enumerate(opened)}}
        policy = StagePolicy(keep_optimizers=i > 0, schedule_epochs=remaining, warmup=i == 0)
        stages.append(Stage(f"+{name}", step_plan, epochs, lrs, policy, group_of=group_per_stage))
        remaining -= epochs
    return stages


def group_per_stage(stage: str) -> str:
    from tfl.freezing import CLASSIFIER_STAGE

    return "classifier" if stage == CLASSIFIER_STAGE else stage


def _check_gradual_options(opts: FinetuneOptions) -> None:
    defaults = FinetuneOptions()
    given = [name for name in ("unfreeze_every", "unfreeze_schedule", "lr_decay_per_stage")
             if getattr(opts, name) != getattr(defaults, name)]
    if opts.unfreeze_mode != "gradual" and given:
        several = len(given) > 1
        raise UsageError(" and ".join("--" + name.replace("_", "-") for name in given)
                         + f": {'these shape' if several else 'this shapes'} gradual unfreezing; add --unfreeze-mode "
                         f"gradual, or drop {'them' if several else 'it'}")
    if opts.unfreeze_schedule:
        parse_schedule(opts.unfreeze_schedule)  # the syntax now; the stage names once the model is built
    if opts.lr_decay_per_stage < 1.0:
        raise UsageError(f"--lr-decay-per-stage {opts.lr_decay_per_stage}: must be >= 1 (1 = the same lr for "
                         "every stage; ULMFiT used 2.6)")
    if opts.unfreeze_every < 1:
        raise UsageError(f"--unfreeze-every {opts.unfreeze_every}: must be >= 1")
