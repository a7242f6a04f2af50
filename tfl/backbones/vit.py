"""Native Keras 3 Vision Transformers (timm's `VisionTransformer`): ViT (augreg), DeiT and DINOv2 (with registers).

Layers are named after timm's modules with "." -> "_" (`patch_embed_proj`, `blocks_3_attn_qkv`, `blocks_3_mlp_fc1`,
`norm`, `head`), so the "timm_vit" mapping in tfl/checkpoints/mappings.py is a list of renames and freeze regexes like
`blocks_1[01]_.*` read as they do in timm. timm's top-level parameters (cls_token, reg_token, pos_embed) live in one
layer, `tokens`. The weightless steps timm has no module for are named after what they do (`patch_embed_flatten`,
`blocks_3_attn`, `blocks_3_add1`, `pool`, `pool_map`).

Stages: stem = patch embedding + class/register tokens + position embedding; block1..block4 = four equal groups of
the transformer blocks (12 blocks -> 3 per stage); head = the final norm and the pooling (the class token, or the mean
of the patch tokens and `fc_norm`, as the checkpoint's timm model does). Without the ImageNet top the backbone ends
on the pooled feature as a 1x1 map, so tfl's head (global pool, dense) sits on it like on a CNN; a boundary inside
the backbone (`--freeze-up-to block2`) is the token sequence [batch, tokens, width], which the cache stores as is.

Position embeddings keep the checkpoint's grid (its `img_size / patch`) as weights; for another input size the
model resamples them in the graph with a constant matrix equal to torch's bicubic `F.interpolate` with
`antialias=True`, which is what timm's `resample_abs_pos_embed` calls (`dynamic_img_size`). TF's bicubic resize
differs from torch's (kernel a=-0.5 vs -0.75, antialias), so the matrix is computed here with numpy.

Weights: None, a source name ("imagenet"/"lvd142m": timm's checkpoint on the Hugging Face Hub), `hf://ORG/NAME`, or
a path to a timm state dict (`model.safetensors`, `pytorch_model.bin`); a `config.json` beside the file (timm's
`save_config` layout: `architecture`, `num_classes`, `global_pool`, `model_args`) sets the width, heads and the
native image size, so a reduced checkpoint loads into the same backbone name.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfl.backbones import timm_files
from tfl.backbones.catalog import register
from tfl.backbones.spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, Preprocessing, Stage
from tfl.errors import UsageError

CHECKPOINT_MAPPING = "timm_vit"
CLASSIFIER = ("head",)
LN_EPSILON = 1e-6  # timm's ViT norm_layer: LayerNorm(eps=1e-6)
STAGE_BLOCKS = 4  # block1..block4: the transformer blocks in four equal groups


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """timm VisionTransformer arguments tfl reproduces (names as timm's `model_args`)."""

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    img_size: int = 224  # the checkpoint's native size: its position-embedding grid is img_size // patch_size
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # position embeddings for the patches only (DINOv2 with registers)
    init_values: float | None = None  # LayerScale (DINOv2)
    global_pool: str = "token"  # "token" (the class token) or "avg" (mean of the patch tokens, then fc_norm)
    num_classes: int = 1000

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


@dataclasses.dataclass(frozen=True)
class Variant:
    config: ViTConfig
    preprocessing: Preprocessing
    source: str  # the weight-source name
    hub_id: str  # timm's checkpoint on the Hugging Face Hub
    description: str


_INCEPTION = Preprocessing.tf()  # timm's IMAGENET_INCEPTION_MEAN/STD (0.5, 0.5): the augreg ViTs
_IMAGENET = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD)  # IMAGENET_DEFAULT_MEAN/STD: DeiT, DINOv2
_DINOV2 = dict(patch_size=14, img_size=518, init_values=1e-5, num_classes=0)
_REG4 = dict(reg_tokens=4, no_embed_class=True)
_WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _variants() -> dict[str, Variant]:
    variants = {}
    for size, (dim, heads) in _WIDTHS.items():
        tag = "augreg2_in21k_ft_in1k" if size == "base" else "augreg_in21k_ft_in1k"
        name = f"vit_{size}_patch16_224"
        variants[name] = Variant(ViTConfig(embed_dim=dim, num_heads=heads), _INCEPTION, "imagenet",
                                 f"timm/{name}.{tag}", f"timm ViT-{size[0].upper()}/16 (AugReg, in21k -> in1k)")
        name = f"deit_{size}_patch16_224"
        variants[name] = Variant(ViTConfig(embed_dim=dim, num_heads=heads), _IMAGENET, "imagenet",
                                 f"timm/{name}.fb_in1k", f"timm DeiT-{size[0].upper()}/16 (in1k)")
    for size in ("small", "base"):
        dim, heads = _WIDTHS[size]
        for reg, extra in (("", {}), ("reg4_", _REG4)):
            name = f"vit_{size}_patch14_{reg}dinov2"
            what = " with 4 register tokens" if reg else ""
            variants[name] = Variant(ViTConfig(embed_dim=dim, num_heads=heads, **_DINOV2, **extra), _IMAGENET,
                                     "lvd142m", f"timm/{name}.lvd142m",
                                     f"timm DINOv2 ViT-{size[0].upper()}/14{what} (self-supervised, LVD-142M)")
    return variants


VARIANTS = _variants()


# --- the model ----------------------------------------------------------------------------------------------------

def build_vit(name: str, input_shape=None, weights=None, include_top: bool = False, config: ViTConfig | None = None):
    """Build timm's `name` in Keras. weights: None, the variant's source name, `hf://ORG/NAME` or a file path (a
    `config.json` beside it may change width, heads and native size). `config` overrides the variant (tests)."""
    import keras
    from keras import layers

    from tfl.backbones.vit_layers import LayerScale, PositionalTokens, TokenPool, ViTAttention

    variant = VARIANTS[name]
    path = weights_file(name, weights) if weights is not None else None
    cfg = config or (config_for(name, path) if path else variant.config)
    shape = (cfg.img_size, cfg.img_size, 3) if input_shape is None else tuple(input_shape)
    if len(shape) != 3 or None in shape[:2]:
        raise UsageError(f"input_shape={input_shape!r} for backbone {name!r}: a ViT needs a fixed (height, width, "
                         "channels), since its position embeddings are resampled for that size when the model is "
                         f"built; pass --image-size (its native size is {cfg.img_size})")
    grid = (shape[0] // cfg.patch_size, shape[1] // cfg.patch_size)
    if min(grid) < 1:
        raise UsageError(f"input_shape={shape!r} for backbone {name!r} is smaller than one {cfg.patch_size}px patch")
    native = cfg.img_size // cfg.patch_size
    dim = cfg.embed_dim
    init = keras.initializers.TruncatedNormal(stddev=0.02)

    def dense(x, units, layer_name):
        return layers.Dense(units, kernel_initializer=init, name=layer_name)(x)

    def norm(x, layer_name):
        return layers.LayerNormalization(epsilon=LN_EPSILON, name=layer_name)(x)

    inputs = keras.Input(shape=shape, name="input_layer")
    x = layers.Conv2D(dim, cfg.patch_size, strides=cfg.patch_size, padding="valid", name="patch_embed_proj")(inputs)
    x = layers.Reshape((grid[0] * grid[1], dim), name="patch_embed_flatten")(x)
    x = PositionalTokens(grid, (native, native), cfg.class_token, cfg.reg_tokens, cfg.no_embed_class,
                         name="tokens")(x)
    for i in range(cfg.depth):
        p = f"blocks_{i}_"
        y = norm(x, p + "norm1")
        y = dense(y, 3 * dim, p + "attn_qkv")
        y = ViTAttention(cfg.num_heads, name=p + "attn")(y)
        y = dense(y, dim, p + "attn_proj")
        if cfg.init_values is not None:
            y = LayerScale(cfg.init_values, name=p + "ls1")(y)
        x = layers.Add(name=p + "add1")([x, y])
        y = norm(x, p + "norm2")
        y = dense(y, int(dim * cfg.mlp_ratio), p + "mlp_fc1")
        y = layers.Activation("gelu", name=p + "mlp_act")(y)  # exact (erf) GELU, as torch's nn.GELU
        y = dense(y, dim, p + "mlp_fc2")
        if cfg.init_values is not None:
            y = LayerScale(cfg.init_values, name=p + "ls2")(y)
        x = layers.Add(name=p + "add2")([x, y])
    if cfg.global_pool == "token":
        x = TokenPool("token", cfg.num_prefix_tokens, name="pool")(norm(x, "norm"))
    else:
        x = norm(TokenPool("avg", cfg.num_prefix_tokens, name="pool")(x), "fc_norm")
    if include_top:
        x = dense(x, cfg.num_classes or 1000, CLASSIFIER[0])
    else:
        x = layers.Reshape((1, 1, dim), name="pool_map")(x)  # a 1x1 feature map: tfl's head pools it
    model = keras.Model(inputs, x, name=name)
    if path is not None:
        load_timm_weights(model, path)
    return model


def load_timm_weights(model, path: str) -> None:
    """Strict: every tensor of the file fills a weight (the classifier may differ or be absent), every weight filled."""
    from tfl.checkpoints.read import read_checkpoint
    from tfl.checkpoints.restore import TORCH_STYLE_FORMATS, restore

    checkpoint = read_checkpoint(path)
    if checkpoint.format not in TORCH_STYLE_FORMATS:
        raise UsageError(f"weights={path!r} is a {checkpoint.format} file, but ViT weights are read as a timm state "
                         "dict (model.safetensors or pytorch_model.bin); to copy weights by Keras name from this "
                         "file use `tfl finetune --weights none --init-from FILE`")
    restore(model, checkpoint, mapping=CHECKPOINT_MAPPING, classifier=CLASSIFIER)


# --- where weights come from --------------------------------------------------------------------------------------

def weights_file(name: str, weights) -> str:
    """The state dict file behind `weights` (the variant's source name, hf://ORG/NAME or a path), or an error saying
    the fix."""
    variant = VARIANTS[name]
    return timm_files.weights_file(name, weights, source=variant.source, hub_id=variant.hub_id)


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(ViTConfig)}
_IGNORED_ARGS = ("dynamic_img_size", "pretrained", "pretrained_cfg_overlay")


def config_for(name: str, path: str) -> ViTConfig:
    """The variant's config, with what a timm `config.json` beside `path` says (architecture, model_args, ...)."""
    variant = VARIANTS[name]
    config_path, data = timm_files.read_config(name, path)
    if data is None:
        return variant.config
    args = dict(data.get("model_args") or {})
    for key in ("num_classes", "global_pool"):
        if key in data:
            args.setdefault(key, data[key])
    if args.pop("in_chans", 3) != 3:
        raise UsageError(f"{config_path}: in_chans is not 3; tfl's backbones take RGB images")
    for key in _IGNORED_ARGS:  # tfl always resamples position embeddings for the input size it builds
        args.pop(key, None)
    unknown = sorted(set(args) - _CONFIG_FIELDS)
    if unknown:
        raise UsageError(f"{config_path}: model_args {', '.join(unknown)} are not supported by tfl's ViT (it knows "
                         f"{', '.join(sorted(_CONFIG_FIELDS))})")
    if "img_size" in args and not isinstance(args["img_size"], int):
        sizes = list(args["img_size"])
        if len(set(sizes)) != 1:
            raise UsageError(f"{config_path}: img_size {sizes} is not square; tfl's ViTs have a square native grid")
        args["img_size"] = sizes[0]
    _check_normalisation(name, config_path, data.get("pretrained_cfg") or {}, variant.preprocessing)
    cfg = dataclasses.replace(variant.config, **args)
    if cfg.depth != variant.config.depth:
        raise UsageError(f"{config_path}: depth {cfg.depth}, but {name!r} has {variant.config.depth} blocks and its "
                         "stages are groups of them; use a checkpoint of that depth")
    if cfg.global_pool not in ("token", "avg"):
        raise UsageError(f"{config_path}: global_pool {cfg.global_pool!r} is not supported; tfl's ViTs pool "
                         "'token' or 'avg'")
    if cfg.embed_dim % cfg.num_heads:
        raise UsageError(f"{config_path}: embed_dim {cfg.embed_dim} is not a multiple of num_heads {cfg.num_heads}")
    return cfg


def _check_normalisation(name: str, config_path: str, pretrained_cfg: dict, preprocessing: Preprocessing) -> None:
    """The checkpoint's mean/std (0-1 scale) must be what the backbone normalises with inside the model."""
    for key, ours in (("mean", preprocessing.mean), ("std", preprocessing.std)):
        theirs = pretrained_cfg.get(key)
        if theirs is not None and not np.allclose(np.asarray(theirs, dtype=float) * 255.0, ours, atol=0.5):
            others = [n for n, v in VARIANTS.items() if v.config.patch_size == VARIANTS[name].config.patch_size
                      and np.allclose(np.asarray(theirs, dtype=float) * 255.0, getattr(v.preprocessing, key),
                                      atol=0.5)]
            raise UsageError(f"{config_path}: the checkpoint was trained with {key} {list(theirs)}, but {name!r} "
                             f"normalises with {[round(v / 255, 3) for v in ours]}; pick a backbone that matches"
                             + (f" (e.g. {others[0]})" if others else ""))


# --- registration -------------------------------------------------------------------------------------------------

def stage_groups(depth: int, stages: int = STAGE_BLOCKS) -> list[list[int]]:
    """Block indices of block1..blockN: `stages` equal groups (12 blocks -> 4 stages of 3)."""
    per = depth // stages
    return [list(range(k * per, (k + 1) * per)) for k in range(stages)]


def _stages(depth: int) -> list[Stage]:
    stages = [Stage("stem", r"input_layer|patch_embed_.*|tokens", "patch embedding, class/register tokens, "
                    "position embedding")]
    for k, blocks in enumerate(stage_groups(depth), start=1):
        alternatives = "|".join(map(str, blocks))
        stages.append(Stage(f"block{k}", rf"blocks_(?:{alternatives})_.*",
                            f"transformer blocks {blocks[0]}-{blocks[-1]} ({len(blocks)} blocks)"))
    stages.append(Stage("head", r"norm|fc_norm|pool|pool_map|head", "final norm and pooling (+ head with the top)"))
    return stages


def _register() -> None:
    import functools

    for name, variant in VARIANTS.items():
        cfg = variant.config
        register(
            BackboneSpec(
                name=name,
                family="timm_vit",
                build=functools.partial(build_vit, name),
                input_size=224,
                preprocessing=variant.preprocessing,
                stages=_stages(cfg.depth),
                # block4 trains: ~25% of the parameters (scripts/freeze_defaults.py).
                default_freeze_up_to="block3",
                weight_sources={variant.source: f"timm checkpoint hf://{variant.hub_id} (Hugging Face Hub; "
                                                "needs internet or the hub cache)"},
                default_weights=variant.source,
                top_activation="linear",
                description=(f"native {variant.description}, width {cfg.embed_dim}, {cfg.depth} blocks in 4 stages "
                             f"of {cfg.depth // STAGE_BLOCKS}, {cfg.global_pool} pooling, patch {cfg.patch_size}, "
                             f"native grid {cfg.img_size // cfg.patch_size}"),
                checkpoint_mapping=CHECKPOINT_MAPPING,
                classifier=CLASSIFIER,
                min_input_size=cfg.patch_size,
            )
        )


_register()
