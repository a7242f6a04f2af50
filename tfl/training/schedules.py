"""Learning-rate schedules: linear warmup from zero, then step (PyTorch StepLR), cosine or constant.

Schedules count optimizer steps, so their position is part of the optimizer state (resumable).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from tfl.errors import UsageError
from tfl.options import SCHEDULES as KINDS


@keras.saving.register_keras_serializable(package="tfl")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, base_lr, total_steps, warmup_steps=0, kind="cosine", step_size=1, gamma=0.1):
        if kind not in KINDS:
            raise UsageError(f"unknown schedule {kind!r}; choose one of {', '.join(KINDS)}")
        self.base_lr = float(base_lr)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.kind = kind
        self.step_size = max(int(step_size), 1)  # in steps
        self.gamma = float(gamma)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.kind == "step":
            lr = self.base_lr * ops.power(self.gamma, ops.floor(step / self.step_size))
        elif self.kind == "cosine":
            progress = ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
            lr = self.base_lr * 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            lr = ops.convert_to_tensor(self.base_lr, "float32")
        if self.warmup_steps:
            lr = lr * ops.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return lr

    def value(self, step: int) -> float:
        return float(ops.convert_to_numpy(self(step)))

    def values(self, first: int, count: int):
        """The rates of steps first .. first + count - 1, as a numpy array, in one evaluation."""
        return ops.convert_to_numpy(self(ops.arange(first, first + count)))

    def get_config(self):
        return dict(base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    kind=self.kind, step_size=self.step_size, gamma=self.gamma)
