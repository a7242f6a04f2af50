"""Checkpoints meet tfl's models: --init-from into a classifier, `tfl convert` into a backbone with its own top.

tfl.checkpoints reads files and restores names into any Keras model, knowing nothing of tfl; this module adds
what only tfl knows: its own Keras classes (tfl.trusted_layers: trusted when a .keras file is rebuilt), the
backbone spec (which mapping, which classifier layers) and the classifier's new `logits`.
"""

from __future__ import annotations

import os
from typing import Callable

from tfl import models
from tfl.backbones import registry
from tfl.checkpoints.errors import CheckpointError
from tfl.checkpoints.mappings import to_keras
from tfl.checkpoints.read import Checkpoint
from tfl.checkpoints.read import read_checkpoint as _read_checkpoint
from tfl.checkpoints.restore import (TORCH_STYLE_FORMATS, RestoreReport, compile_patterns, compile_renames,
                                    restore)
from tfl.durable import save_keras
from tfl.errors import UsageError
from tfl.trusted_layers import custom_objects


def read_checkpoint(path: str | os.PathLike, unsafe: bool = False) -> Checkpoint:
    """tfl.checkpoints.read.read_checkpoint, rebuilding tfl's own layers in a .keras file too."""
    return _read_checkpoint(path, unsafe=unsafe, custom_objects=custom_objects())


def mapping_for(spec, checkpoint: Checkpoint) -> str | None:
    """The backbone family's mapping when the file holds raw PyTorch-style keys; Keras/TF names need none (nor does
    a run's adapters.safetensors, which names Keras weights)."""
    from tfl.adapters import read_manifest

    if checkpoint.format not in TORCH_STYLE_FORMATS or read_manifest(checkpoint.path) is not None:
        return None
    return spec.checkpoint_mapping


def classifier_layers(spec) -> tuple[str, ...]:
    """Layers a restore may find changed or absent: the backbone's own top and tfl's new one."""
    return (*spec.classifier, models.LOGITS)


def open_init_from(path: str | None, reuse=(), exclude=(), rename=(), unsafe: bool = False) -> Checkpoint | None:
    """Check `tfl finetune`'s --reuse/--reuse-exclude/--rename and read --init-from (None: no restore), before
    any data is loaded, so a bad file or pattern fails at once."""
    if path is None:
        given = [flag for flag, value in (("--reuse", reuse), ("--reuse-exclude", exclude), ("--rename", rename),
                                          ("--unsafe", unsafe)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} given without --init-from FILE, which they apply to; add it")
        return None
    compile_patterns(reuse, "--reuse")
    compile_patterns(exclude, "--reuse-exclude")
    compile_renames(rename, "--rename")
    try:
        return read_checkpoint(path, unsafe=unsafe)
    except CheckpointError as err:
        raise CheckpointError(f"--init-from: {err}") from None  # which option named the file


def restore_classifier(model, spec, checkpoint, reuse=(), exclude=(), rename=(), log=None) -> RestoreReport:
    """--init-from into a tfl classifier: strict about what --reuse selects (default: every weight the file
    has); the file's own classifier (spec.classifier) and tfl's new `logits` may differ or be absent."""
    return restore(model, checkpoint, include=tuple(reuse) or None, exclude=exclude, rename=rename, strict=True,
                   mapping=mapping_for(spec, checkpoint), classifier=classifier_layers(spec), log=log)


def source_classes(spec, checkpoint: Checkpoint, mapping: str | None) -> int | None:
    """The class count of the file's own classifier (the last dimension of its weights), if it has one."""
    tensors = checkpoint.tensors if mapping is None else to_keras(checkpoint.tensors, mapping)
    shapes = [value.shape for name, value in tensors.items() if name.split("/", 1)[0] in spec.classifier]
    return int(shapes[0][-1]) if shapes else None


def convert_checkpoint(
    path: str,
    backbone: str,
    output: str,
    num_classes: int | None = None,
    image_size: int | None = None,
    with_preprocessing: bool = False,
    unsafe: bool = False,
    log: Callable[[str], None] | None = None,
) -> RestoreReport:
    """Build `backbone` with its own classifier, restore `path` into it strictly, save it to `output` (.keras).

    num_classes defaults to the file's classifier; another count gets a new, randomly initialised classifier
    (the report says so). The saved model takes NHWC input of any size (or `image_size`), raw pixels only
    `with_preprocessing`, else exactly what the source network took.
    """
    if not output.endswith(".keras"):
        raise UsageError(f"--output {output!r} must end in .keras (Keras' native format)")
    spec = registry.get(backbone)
    checkpoint = read_checkpoint(path, unsafe=unsafe)
    mapping = mapping_for(spec, checkpoint)
    file_classes = source_classes(spec, checkpoint, mapping)
    classes = num_classes or file_classes
    if classes is None:
        raise UsageError(f"{path} has no weights for the classifier of {backbone} ({', '.join(spec.classifier)}); "
                         "pass --num-classes N for a new, randomly initialised classifier")
    model = models.build_backbone_model(backbone, classes, image_size, with_preprocessing)
    report = restore(model, checkpoint, mapping=mapping, classifier=classifier_layers(spec), strict=True)
    save_keras(model, output)
    if log is not None:
        log(report.summary())
    return report
