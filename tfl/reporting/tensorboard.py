"""TensorBoard events of a run, written by a trainer callback, and read back for tests.

    logdir/         hparams (session start at construction, experiment config at the end), the freeze plan,
                    stage starts, final metrics
    logdir/train    step/<metric>, step/lr/<group> every step (every k-th when an epoch has more than
                    STEP_POINTS steps); epoch/<metric>, epoch/lr/<group> every epoch
    logdir/val      epoch/<metric> every epoch

Train and val are separate runs under one session, so TensorBoard overlays `epoch/accuracy` of both and the
hparams plugin finds the metrics of both groups next to the session's hparams.
"""

from __future__ import annotations

import json
import math
import os

from tfl.errors import UsageError

PLAN_TAG = "freeze_plan"
STAGE_TAG = "stage"
# Step scalars an epoch at most: each costs a summary op (~0.2 ms here), as much as a whole cached head step, so
# an 843-step epoch logs every 9th step, the way Keras' TensorBoard(update_freq=N) does.
STEP_POINTS = 100


class TensorBoardCallback:
    def __init__(self, logdir: str, hparams: dict | None = None, plan_text: str | None = None):
        import tensorflow as tf

        self.logdir = logdir
        self._tf = tf
        self._root = tf.summary.create_file_writer(logdir)
        self._train = tf.summary.create_file_writer(os.path.join(logdir, "train"))
        self._val = tf.summary.create_file_writer(os.path.join(logdir, "val"))
        self._hparams = {str(k): _hparam_value(v) for k, v in (hparams or {}).items()}
        self._step = 0
        self._every = 1  # log every k-th step (set per stage)
        self._closed = False
        self._metrics: set[tuple[str, str]] = set()  # (group, tag) of every epoch metric, for the hparams config
        # Written now, not at the end, so a crashed run still shows what it was.
        with self._root.as_default():
            if self._hparams:
                from tensorboard.plugins.hparams import api as hp

                hp.hparams(self._hparams, trial_id=os.path.basename(os.path.normpath(logdir)))
            if plan_text:
                tf.summary.text(PLAN_TAG, plan_text, step=0)
        self._root.flush()

    def on_stage_begin(self, stage: str, info: dict) -> None:
        groups = ", ".join(f"{name} {float(lr):g}" for name, lr in info.get("groups", {}).items()) or "none"
        text = (f"**stage {stage}**: {info.get('epochs', '?')} epoch(s) × {info.get('steps_per_epoch', '?')} steps; "
                f"trainable: {', '.join(info.get('trainable', [])) or 'nothing'}; learning rates: {groups}")
        self._step = max(self._step, int(info.get("step", self._step)))  # a resumed run starts past step 0
        self._every = max(1, math.ceil(int(info.get("steps_per_epoch", 1)) / STEP_POINTS))
        if info.get("first_epoch", 1) > 1:  # a resume continuing the stage: its marker is already there
            return
        with self._root.as_default():
            self._tf.summary.text(STAGE_TAG, text, step=self._step + 1)
        self._root.flush()

    def on_train_step(self, stage: str, step: int, logs: dict) -> None:
        self._step = max(self._step, int(step))
        if int(step) % self._every:
            return
        with self._train.as_default():
            for key, value in logs.items():
                if _is_number(value):
                    self._tf.summary.scalar(f"step/{key}", float(value), step=int(step))

    def on_epoch_end(self, result) -> None:
        epoch = int(result.epoch)
        for writer, group, metrics in ((self._train, "train", result.train), (self._val, "val", result.val)):
            with writer.as_default():
                for name, value in (metrics or {}).items():
                    if _is_number(value):
                        self._tf.summary.scalar(f"epoch/{name}", float(value), step=epoch)
                        self._metrics.add((group, f"epoch/{name}"))
        with self._train.as_default():
            for group, lr in (result.lr or {}).items():
                if _is_number(lr):
                    self._tf.summary.scalar(f"epoch/lr/{group}", float(lr), step=epoch)
            if _is_number(getattr(result, "seconds", None)):
                self._tf.summary.scalar("epoch/seconds", float(result.seconds), step=epoch)
        self._train.flush()
        self._val.flush()

    def on_run_end(self, history) -> None:
        history = list(history or [])
        with self._root.as_default():
            if self._hparams:
                from tensorboard.plugins.hparams import api as hp

                metrics = [hp.Metric(tag, group=group) for group, tag in sorted(self._metrics)]
                hp.hparams_config(hparams=[hp.HParam(name) for name in self._hparams], metrics=metrics)
            final = _final_metrics(history)
            for name, value in final.items():
                self._tf.summary.scalar(f"final/{name}", value, step=int(history[-1].epoch) if history else 0)
            if final:
                self._tf.summary.text("final", "```\n" + json.dumps(final, indent=2) + "\n```", step=self._step)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for writer in (self._root, self._train, self._val):
            writer.flush()
            writer.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] in step order, from the event files directly in `logdir` (e.g. logdir/val)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = _accumulator(logdir)
    scalars = {tag: [(e.step, float(e.value)) for e in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()[ea.SCALARS]}
    for tag in accumulator.Tags()[ea.TENSORS]:  # tf.summary v2 writes scalars as tensors of the scalars plugin
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars":
            scalars[tag] = [(e.step, float(_tensor(e.tensor_proto))) for e in accumulator.Tensors(tag)]
    return {tag: sorted(values) for tag, values in scalars.items()}


def read_text(logdir: str) -> dict[str, list[tuple[int, str]]]:
    """tag -> [(step, text)] of the text summaries directly in `logdir`."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = _accumulator(logdir)
    return {tag: sorted((e.step, _tensor(e.tensor_proto).item().decode("utf-8")) for e in accumulator.Tensors(tag))
            for tag in accumulator.Tags()[ea.TENSORS]
            if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "text"}


def read_plugin_tags(logdir: str) -> dict[str, list[str]]:
    """plugin name -> its tags directly in `logdir` ("hparams" -> ["_hparams_/session_start_info", ...])."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = _accumulator(logdir)
    tags: dict[str, list[str]] = {}
    for tag in accumulator.Tags()[ea.TENSORS]:
        tags.setdefault(accumulator.SummaryMetadata(tag).plugin_data.plugin_name, []).append(tag)
    return {plugin: sorted(names) for plugin, names in tags.items()}


def _accumulator(logdir: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    if not os.path.isdir(logdir) or not any(".tfevents." in name for name in os.listdir(logdir)):
        found = sorted(os.path.relpath(folder, logdir) for folder, _, files in os.walk(logdir)
                       if any(".tfevents." in name for name in files)) if os.path.isdir(logdir) else []
        raise UsageError(f"{logdir}: no TensorBoard event files in this folder"
                         + (f"; these subfolders have some: {', '.join(found)}" if found else ""))
    accumulator = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})  # 0 keeps every event
    accumulator.Reload()
    return accumulator


def _tensor(proto):
    import tensorflow as tf

    return tf.make_ndarray(proto)


def _final_metrics(history: list) -> dict[str, float]:
    if not history:
        return {}
    last = history[-1]
    final = {f"{split}_{name}": float(value) for split, metrics in (("train", last.train), ("val", last.val))
             for name, value in (metrics or {}).items() if _is_number(value)}
    accuracies = [(float(r.val["accuracy"]), int(r.epoch)) for r in history
                  if _is_number((r.val or {}).get("accuracy")) and math.isfinite(float(r.val["accuracy"]))]
    if accuracies:
        best, epoch = max(accuracies, key=lambda a: (a[0], -a[1]))  # the earliest epoch of the best accuracy
        final.update(best_val_accuracy=best, best_epoch=float(epoch))
    final["epochs"] = float(len(history))
    return final


def _hparam_value(value):
    """What the hparams plugin takes: bool, int, float or str."""
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy scalar
        return value.item()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, sort_keys=isinstance(value, dict))
    return str(value)


def _is_number(value) -> bool:
    """Numbers, NaN included (a diverged loss must show); None, "" and text are not."""
    if value is None or isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
