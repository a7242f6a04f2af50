"""The stage lists recipes share: the new head then fine-tuning (`tfl finetune`'s default, `two_stage`), every
layer trained, and training from random weights. tfl advise's proxy runs `two_stage` too, so this module imports
no command (finetune imports advise for --freeze-up-to auto, and both import this)."""

from __future__ import annotations

from tfl.backbones import registry
from tfl.job import Job, JobOptions, Stage

# A run from random weights trains every layer, batch norm too (scratch_stage's plan): the options that say so.
RANDOM_START = {"freeze_up_to": None, "rules": (), "train_bn": True}


def starts_random(opts: JobOptions) -> bool:
    """Random initial weights: neither the backbone's own weights (--weights) nor a checkpoint (--init-from)."""
    return registry.get(opts.backbone).resolve_weights(opts.weights) is None and opts.init_from is None


def head_then_finetune(job: Job, plan=None, head: str = "head") -> list[Stage]:
    """--head-epochs on the new head (the backbone frozen), then --epochs of what `plan` (default the job's plan
    from --freeze-up-to) trains: the backbone at backbone_lr, the head at lr."""
    from tfl.freezing import head_only_plan

    plan = plan or job.plan
    return [Stage(head, head_only_plan(plan), job.opts.head_epochs, {"head": job.lr}),
            Stage("finetune", plan, job.opts.epochs, {"backbone": job.backbone_lr, "head": job.lr})]


# Scratch training updates BatchNormalization's moving statistics, and Keras' default momentum (0.99) averages
# over the last ~100 steps: measured on Fashion-MNIST (540 and 5,400 images, 6 epochs), EfficientNet-Lite0 then
# reached 0.96 train accuracy but 0.10 (chance) in inference mode, its statistics lagging the weights. PyTorch's
# default (0.1, i.e. Keras 0.9) follows them, so a model trained from random weights uses it.
SCRATCH_BN_MOMENTUM = 0.9


def everything_plan(job: Job, scratch: bool = False):
    """The plan training every layer; `scratch` (random weights): batch norm at SCRATCH_BN_MOMENTUM too."""
    import keras

    from tfl.freezing import leaf_layers, make_plan

    if scratch:
        for layer in leaf_layers(job.model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM
    return make_plan(job.spec, job.model, None)


def scratch_stage(job: Job, name: str = "scratch", epochs: int | None = None) -> Stage:
    """Random weights: every layer (batch norm too) at lr, for --head-epochs + --epochs unless `epochs` says."""
    epochs = job.opts.head_epochs + job.opts.epochs if epochs is None else epochs
    return Stage(name, everything_plan(job, scratch=True), epochs, {"backbone": job.lr, "head": job.lr})


def two_stage(job: Job) -> dict:
    """`tfl finetune`'s default recipe: head_then_finetune, --balance as the options say."""
    stages = head_then_finetune(job)
    prepare_balanced(job, stages)
    job.train(stages)
    return job.finish()


def prepare_balanced(job: Job, stages: list[Stage], config: dict | None = None) -> None:
    """job.prepare, with --balance's loss weights (an extra column) or sampler (the epoch order) when asked."""
    from tfl.recipes import balance

    how = getattr(job.opts, "balance", "none")  # compare's two_stage arm shares this recipe, without the option
    extra, record = balance.apply(job, how)
    job.prepare(stages, config={**(config or {}), **({"balance_record": record} if record else {})}, extra=extra)
    if how == "sampler":
        balance.install_sampler(job)
