"""Native Keras ConvNeXt V2 (atto..base), layer for layer timm's `convnextv2_*`, so timm/HF checkpoints load.

Layers are named after timm's modules with "." -> "_" (`stem_0`, `stages_2_downsample_1`, `stages_2_blocks_4_mlp_grn`),
which is all the "timm_convnext" mapping in tfl/checkpoints/mappings.py needs; the weightless layers are named
after what they do (`..._mlp_act`, `..._add`). A block: 7x7 depthwise conv (symmetric pad 3 == Keras "same" at
stride 1), LayerNorm (eps 1e-6), Linear 4x, exact GELU, GlobalResponseNorm, Linear, residual. timm builds atto..nano
with 1x1 convs instead of Linear layers (`conv_mlp`); the arithmetic is the same and the mapping takes either layout.

Stages: stem = the 4x4/4 patch conv + LayerNorm; block1..block4 = timm's stages.0..3, each with the downsampling
(LayerNorm + 2x2/2 conv) that opens it; head = pool + LayerNorm + fc (only with include_top: the headless backbone
ends on stage 4's feature map, as Keras' ConvNeXt does, and tfl's classifier pools it).
"""

from __future__ import annotations

import dataclasses

from tfl.backbones import timm_files
from tfl.backbones.catalog import register
from tfl.backbones.spec import BackboneSpec, Preprocessing, Stage
from tfl.checkpoints.restore import restore
from tfl.errors import UsageError

LN_EPSILON = 1e-6
GRN_EPSILON = 1e-6
CHECKPOINT_MAPPING = "timm_convnext"
CLASSIFIER = ("head_norm", "head_fc")  # the ImageNet head; a headless model skips both in the file
MLP_RATIO = 4


@dataclasses.dataclass(frozen=True)
class Variant:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    # scripts/freeze_defaults.py; the comment gives the trainable share (block2 would leave 95-98%, block4 none)
    default_freeze_up_to: str


VARIANTS = {
    "convnextv2_atto": Variant((2, 2, 6, 2), (40, 80, 160, 320), "block3"),  # 56%
    "convnextv2_femto": Variant((2, 2, 6, 2), (48, 96, 192, 384), "block3"),  # 56%
    "convnextv2_pico": Variant((2, 2, 6, 2), (64, 128, 256, 512), "block3"),  # 56%
    "convnextv2_nano": Variant((2, 2, 8, 2), (80, 160, 320, 640), "block3"),  # 50%
    "convnextv2_tiny": Variant((3, 3, 9, 3), (96, 192, 384, 768), "block3"),  # 56%
    "convnextv2_base": Variant((3, 3, 27, 3), (128, 256, 512, 1024), "block3"),  # 31%
}
# model_args of a timm config.json tfl reads: depths/dims shape the network; the others must keep ConvNeXt V2's values
# (conv_mlp only changes the MLP's weight layout, which the mapping reads either way).
_CONFIG_ARGS = ("depths", "dims", "use_grn", "ls_init_value", "conv_mlp")


def build_convnext_v2(
    name: str,
    input_shape=None,
    weights=None,
    include_top: bool = False,
    depths: tuple[int, ...] | None = None,
    dims: tuple[int, ...] | None = None,
    num_classes: int | None = None,
):
    """Build timm's `name` in Keras.

    weights: None (random init) or the path of a timm/HF model.safetensors or pytorch_model.bin; a config.json
    beside it sets depths/dims (its `model_args`) and the class count of the top. include_top=False ends on
    stage 4's feature map; include_top=True adds pool, LayerNorm and `head_fc` (logits).
    """
    import keras
    from keras import layers

    from tfl.backbones.keras_layers import GlobalResponseNorm

    variant = VARIANTS[name]
    path, config = timm_files.checkpoint(name, weights, _CONFIG_ARGS)
    args = config["model_args"]
    if args.get("use_grn", True) is not True or args.get("ls_init_value") is not None:
        raise UsageError(f"--weights {path!r}: its config.json describes a ConvNeXt without GRN or with layer scale "
                         f"(use_grn={args.get('use_grn')!r}, ls_init_value={args.get('ls_init_value')!r}), not "
                         f"{name}")
    depths = tuple(depths or args.get("depths") or variant.depths)
    dims = tuple(dims or args.get("dims") or variant.dims)
    if len(depths) != 4 or len(dims) != 4:
        raise UsageError(f"{name}: depths={depths!r} and dims={dims!r} must have 4 entries, one per stage")
    num_classes = num_classes or config["num_classes"] or 1000

    shape = (224, 224, 3) if input_shape is None else tuple(input_shape)
    if len(shape) != 3:
        raise UsageError(f"input_shape={input_shape!r} for backbone {name!r}: expected (height, width, channels)")

    # timm's init: truncated normal (std .02) for convs and linears, zero biases.
    init = keras.initializers.TruncatedNormal(stddev=0.02)

    def layer_norm(layer_name):
        return layers.LayerNormalization(epsilon=LN_EPSILON, name=layer_name)

    inputs = keras.Input(shape=shape, name="input_layer")
    x = layers.Conv2D(dims[0], 4, strides=4, kernel_initializer=init, name="stem_0")(inputs)
    x = layer_norm("stem_1")(x)
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        s = f"stages_{stage}_"
        if stage > 0:
            x = layer_norm(s + "downsample_0")(x)
            x = layers.Conv2D(dim, 2, strides=2, kernel_initializer=init, name=s + "downsample_1")(x)
        for block in range(depth):
            p = f"{s}blocks_{block}_"
            shortcut = x
            x = layers.DepthwiseConv2D(7, padding="same", depthwise_initializer=init, name=p + "conv_dw")(x)
            x = layer_norm(p + "norm")(x)
            x = layers.Dense(MLP_RATIO * dim, kernel_initializer=init, name=p + "mlp_fc1")(x)
            x = layers.Activation("gelu", name=p + "mlp_act")(x)  # exact (erf) GELU, as torch's nn.GELU
            x = GlobalResponseNorm(epsilon=GRN_EPSILON, name=p + "mlp_grn")(x)
            x = layers.Dense(dim, kernel_initializer=init, name=p + "mlp_fc2")(x)
            x = layers.Add(name=p + "add")([x, shortcut])
    if include_top:
        x = layers.GlobalAveragePooling2D(name="head_global_pool")(x)
        x = layer_norm(CLASSIFIER[0])(x)
        x = layers.Dense(num_classes, kernel_initializer=init, name=CLASSIFIER[1])(x)
    model = keras.Model(inputs, x, name=name)
    if path is not None:
        restore(model, timm_files.read_torch_style(path, name), mapping=CHECKPOINT_MAPPING, classifier=CLASSIFIER)
    return model


def _stages(variant: Variant) -> list[Stage]:
    stages = [Stage("stem", r"input_layer|stem_\d", "stem: 4x4/4 patch conv + LayerNorm (1/4)")]
    for k, (depth, dim) in enumerate(zip(variant.depths, variant.dims), start=1):
        opening = "" if k == 1 else "downsample + "
        stages.append(Stage(f"block{k}", rf"stages_{k - 1}_.*",
                            f"stages.{k - 1}: {opening}{depth} blocks of width {dim} (1/{2 ** (k + 1)})"))
    stages.append(Stage("head", r"head_.*", "pool + LayerNorm + fc (only with include_top)"))
    return stages


def _register() -> None:
    for name, variant in VARIANTS.items():

        def build(input_shape=None, weights=None, include_top=False, _name=name):
            return build_convnext_v2(_name, input_shape, weights, include_top)

        register(
            BackboneSpec(
                name=name,
                family="timm_convnext_v2",
                build=build,
                input_size=224,
                preprocessing=Preprocessing.torch(),  # timm's convnextv2 pretrained configs: ImageNet mean/std
                stages=_stages(variant),
                default_freeze_up_to=variant.default_freeze_up_to,
                weight_sources={"PATH": timm_files.SOURCE},
                default_weights=None,
                top_activation="linear",
                description=(
                    f"native timm ConvNeXt V2 (depths {'-'.join(map(str, variant.depths))}, widths "
                    f"{'-'.join(map(str, variant.dims))}, GRN), 224x224; weights: --weights PATH to a timm/HF "
                    "model.safetensors or pytorch_model.bin, or hf://ORG/NAME"
                ),
                checkpoint_mapping=CHECKPOINT_MAPPING,
                classifier=CLASSIFIER,
            )
        )


_register()
