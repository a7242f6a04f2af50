"""tfl: transfer learning for TensorFlow/Keras — freeze, reuse, fine-tune, ship.

    import tfl
    r = tfl.finetune(dataset="photos/", backbone="efficientnet_lite0", epochs=2)
    print(r.metrics["test_accuracy"], r.run_dir)
    model = r.load_model()

Every `tfl` command is a function here with the command's options as keyword arguments (tfl.api). Importing tfl
is light: TensorFlow loads when a function first needs it.
"""

from tfl.version import __version__  # noqa: F401

from tfl.api import (Result, advise, calibrate, compare, dann, distill, evaluate, export, fewshot,  # noqa: E402
                     finetune, forgetting, load_model, lr_find, multitask, predict, pretext, restore, self_train,
                     set_progress, soup, wise_ft)
from tfl.errors import Unavailable, UsageError  # noqa: E402

# The options classes, loaded on first use (tfl.FinetuneOptions, ...): they live beside their recipes.
_OPTIONS = {"JobOptions": "tfl.options", "FinetuneOptions": "tfl.recipes.finetune",
            "CompareOptions": "tfl.recipes.compare", "AdviseOptions": "tfl.recipes.advise",
            "DistillOptions": "tfl.recipes.distill", "ForgettingOptions": "tfl.recipes.forgetting",
            "PretextOptions": "tfl.recipes.pretext", "SelfTrainOptions": "tfl.recipes.self_training",
            "FewShotOptions": "tfl.recipes.fewshot", "DannOptions": "tfl.recipes.dann",
            "MultitaskOptions": "tfl.recipes.multitask", "LrFindOptions": "tfl.recipes.lr_find"}

__all__ = ["Result", "Unavailable", "UsageError", "advise", "calibrate", "compare", "dann", "distill", "evaluate",
           "export", "fewshot", "finetune", "forgetting", "load_model", "lr_find", "multitask", "predict", "pretext",
           "restore", "self_train", "set_progress", "soup", "wise_ft", *_OPTIONS]


def __getattr__(name):
    if name in _OPTIONS:
        import importlib

        return getattr(importlib.import_module(_OPTIONS[name]), name)
    raise AttributeError(f"module 'tfl' has no attribute {name!r}")
