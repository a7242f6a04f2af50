"""Convert a checkpoint of a known family into a standalone Keras model file (`tfl convert`)."""

from __future__ import annotations

from typing import Callable

from tfl.checkpoints.restore import RestoreReport, mapping_for, restore


def source_classes(spec, checkpoint, mapping: str | None) -> int | None:
    """The class count of the file's own classifier (the last dimension of its weights), if it has one."""
    tensors = checkpoint.tensors
    if mapping is not None:
        from tfl.checkpoints.mappings import to_keras

        tensors = to_keras(tensors, mapping)
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
    from tfl import models
    from tfl.backbones import registry
    from tfl.checkpoints.read import read_checkpoint
    from tfl.training import rundir

    if not output.endswith(".keras"):
        raise ValueError(f"--output {output!r} must end in .keras (Keras' native format)")
    spec = registry.get(backbone)
    checkpoint = read_checkpoint(path, unsafe=unsafe)
    mapping = mapping_for(spec, checkpoint)
    file_classes = source_classes(spec, checkpoint, mapping)
    classes = num_classes or file_classes
    if classes is None:
        raise ValueError(f"{path} has no weights for the classifier of {backbone} ({', '.join(spec.classifier)}); "
                         "pass --num-classes N for a new, randomly initialised classifier")
    model = models.build_backbone_model(backbone, classes, image_size, with_preprocessing)
    report = restore(model, checkpoint, mapping=mapping, classifier=spec.classifier, strict=True)
    rundir.save_keras(model, output)
    if log is not None:
        log(report.summary())
    return report
