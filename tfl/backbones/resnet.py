"""Native Keras ResNet18/34, layer for layer torchvision's ResNet (BasicBlock), so torchvision .pth files load.

Layers are named after torchvision's modules with "." -> "_" (`layer2_0_conv1`, `layer2_0_downsample_0`), which
is all the "torchvision_resnet" mapping in tfl/checkpoints/mappings.py needs; the weightless layers torch has
no module for are named after what they do (`conv1_pad`, `conv1_relu`, `layer1_0_add`, `layer1_0_out`).
Stages: stem = conv1/bn1/relu/maxpool, block1..block4 = layer1..layer4, head = avgpool/fc (include_top only).

torchvision pads symmetrically (7x7/2 by 3, the 3x3/2 max pool and 3x3/2 convs by 1); Keras "same" pads
stride-2 layers more at the bottom/right, which shifts every sampled position. So stride-2 layers get an
explicit ZeroPadding2D and "valid"; stride-1 3x3 convs use "same", which is the same symmetric 1-pixel pad.
"""

from __future__ import annotations

import functools
import hashlib
import os

from tfl.backbones.catalog import register
from tfl.backbones.download import weights_download_errors
from tfl.backbones.errors import WeightsUnavailableError
from tfl.backbones.spec import BackboneSpec, Preprocessing, Stage
from tfl.checkpoints.read import read_checkpoint
from tfl.checkpoints.restore import TORCH_STYLE_FORMATS, restore
from tfl.errors import UsageError

DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}  # BasicBlocks per layer1..layer4
WIDTHS = (64, 128, 256, 512)
# torchvision's IMAGENET1K_V1 files; the name carries the first 8 hex digits of the file's sha256.
WEIGHTS_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
}
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Keras weighs the old statistic; torch's momentum=0.1 weighs the new one
CHECKPOINT_MAPPING = "torchvision_resnet"
CLASSIFIER = ("fc",)


def build_resnet(
    name: str,
    input_shape=None,
    weights=None,
    include_top: bool = False,
    widths: tuple[int, int, int, int] = WIDTHS,
    num_classes: int = 1000,
):
    """Build torchvision's `name` ("resnet18" or "resnet34") in Keras.

    weights: None (random init), "imagenet" (torchvision's download) or a path to a torchvision-style state
    dict (.pth or .safetensors). include_top=False ends on layer4's feature map; include_top=True adds avgpool
    and `fc` (logits, `num_classes`). `widths` (channels of layer1..layer4) exist so tests can use a narrow
    network with the exact topology.
    """
    import keras
    from keras import layers

    shape = (224, 224, 3) if input_shape is None else tuple(input_shape)
    if len(shape) != 3:
        raise UsageError(f"input_shape={input_shape!r} for backbone {name!r}: expected (height, width, channels)")
    path = weights_file(name, weights) if weights is not None else None
    # torchvision's init (kaiming normal, fan_out) so that --weights none trains like torchvision does.
    conv_init = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")

    def conv(x, filters, kernel, stride, layer_name):
        if stride == 1 and kernel > 1:
            padding = "same"
        else:
            padding = "valid"
            if kernel > 1:
                x = layers.ZeroPadding2D(kernel // 2, name=f"{layer_name}_pad")(x)
        return layers.Conv2D(
            filters, kernel, strides=stride, padding=padding, use_bias=False, kernel_initializer=conv_init,
            name=layer_name,
        )(x)

    def batch_norm(x, layer_name):
        return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=layer_name)(x)

    inputs = keras.Input(shape=shape, name="input_layer")
    x = conv(inputs, widths[0], 7, 2, "conv1")
    x = batch_norm(x, "bn1")
    x = layers.ReLU(name="conv1_relu")(x)
    # torchvision pads the max pool with -inf; after the ReLU every input is >= 0, so zeros give the same maxima.
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    channels = widths[0]
    for stage, (blocks, width) in enumerate(zip(DEPTHS[name], widths), start=1):
        for block in range(blocks):
            p = f"layer{stage}_{block}_"
            stride = 2 if stage > 1 and block == 0 else 1
            shortcut = x
            x = conv(x, width, 3, stride, p + "conv1")
            x = batch_norm(x, p + "bn1")
            x = layers.ReLU(name=p + "relu")(x)
            x = conv(x, width, 3, 1, p + "conv2")
            x = batch_norm(x, p + "bn2")
            if stride != 1 or channels != width:
                shortcut = conv(shortcut, width, 1, stride, p + "downsample_0")
                shortcut = batch_norm(shortcut, p + "downsample_1")
            x = layers.Add(name=p + "add")([x, shortcut])
            x = layers.ReLU(name=p + "out")(x)
            channels = width
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avgpool")(x)
        x = layers.Dense(num_classes, name=CLASSIFIER[0])(x)
    model = keras.Model(inputs, x, name=name)
    if path is not None:
        load_torchvision_weights(model, path)
    return model


def weights_file(name: str, weights) -> str:
    """The state dict file behind `weights` ("imagenet" or a path), or an error that says how to get one."""
    if weights == "imagenet":
        return download_imagenet_weights(name)
    if not isinstance(weights, (str, os.PathLike)):
        raise UsageError(
            f"weights={weights!r} for backbone {name!r}: expected None, 'imagenet' or a file path, "
            f"got a {type(weights).__name__}"
        )
    path = os.fspath(weights)
    if os.path.isdir(path):
        raise UsageError(
            f"weights={path!r} for backbone {name!r} is a directory; expected a file, a torchvision ResNet state "
            "dict (.pth or .safetensors). To copy weights by name from a TF checkpoint or SavedModel directory use "
            "`tfl finetune --weights none --init-from DIR`"
        )
    if not os.path.isfile(path):
        raise UsageError(
            f"weights={path!r} for backbone {name!r}: no such file. Pass None (random init), 'imagenet' "
            f"(torchvision's download, {WEIGHTS_URLS[name]}) or the path of a torchvision ResNet state dict "
            "(.pth or .safetensors)"
        )
    return path


def download_imagenet_weights(name: str) -> str:
    """torchvision's ImageNet file, through Keras' download cache (~/.keras/models/); checked against its hash."""
    from keras.src.utils import file_utils  # Keras only when weights are fetched: listing backbones stays cheap

    url = WEIGHTS_URLS[name]
    file_name = os.path.basename(url)
    # Offline this fails at once with WeightsUnavailableError naming the URL, the cache path and --weights PATH.
    with weights_download_errors(name):
        path = file_utils.get_file(file_name, url, cache_subdir="models")
    expected = file_name.rsplit("-", 1)[1].split(".")[0]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if not digest.startswith(expected):
        raise WeightsUnavailableError(
            f"backbone {name!r}: {path} has sha256 {digest[:8]}..., but torchvision's {file_name} starts with "
            f"{expected} (a truncated or corrupt download). Fix: delete it and retry, or download {url} "
            "elsewhere and pass --weights PATH.",
            backbone=name,
            file_name=file_name,
            url=url,
            cache_path=path,
        )
    return path


def read_state_dict(path: str):
    """The checkpoint of a .pth/.safetensors file (raw torch keys), recognised by content (tfl.checkpoints.read)."""
    checkpoint = read_checkpoint(path)
    if checkpoint.format not in TORCH_STYLE_FORMATS:
        raise UsageError(
            f"weights={path!r} is a {checkpoint.format} file, but ResNet weights are read as a torchvision-style "
            "state dict (.pth or .safetensors); to copy weights by Keras name from this file use "
            "`tfl finetune --weights none --init-from FILE`"
        )
    return checkpoint


def load_torchvision_weights(model, path: str) -> None:
    """Strict: every key used (or ignored: BN batch counters; fc when the model has no top), every weight filled."""
    restore(model, read_state_dict(path), mapping=CHECKPOINT_MAPPING, classifier=CLASSIFIER)


def _stages(depths: tuple[int, ...]) -> list[Stage]:
    stem = r"input_layer|conv1(?:_pad|_relu)?|bn1|pool1(?:_pad)?"
    stages = [Stage("stem", stem, "conv1 7x7/2, bn1, relu, maxpool (1/4)")]
    for k, blocks in enumerate(depths, start=1):
        stages.append(Stage(f"block{k}", rf"layer{k}_\d+_.*", f"layer{k}: {blocks} BasicBlocks (1/{2 ** (k + 1)})"))
    stages.append(Stage("head", r"avgpool|fc", "avgpool + fc (only with include_top)"))
    return stages


def _register() -> None:
    for name, depths in DEPTHS.items():
        register(
            BackboneSpec(
                name=name,
                family="torchvision_resnet",
                build=functools.partial(build_resnet, name),
                input_size=224,
                preprocessing=Preprocessing.torch(),
                stages=_stages(depths),
                # layer4 trains: 75% (resnet18), 62% (resnet34) of the parameters; block4 would train none.
                default_freeze_up_to="block3",
                weight_sources={"imagenet": f"torchvision download {WEIGHTS_URLS[name]} (needs internet)"},
                default_weights="imagenet",
                top_activation="linear",
                description=(
                    f"native torchvision ResNet-{name[6:]} (BasicBlocks {'-'.join(map(str, depths))}), "
                    "224x224 input; stem=conv1+maxpool, block1-4=layer1..layer4"
                ),
                checkpoint_mapping=CHECKPOINT_MAPPING,
                classifier=CLASSIFIER,
            )
        )


_register()
