"""Keras layers of tfl's Vision Transformers (tfl/backbones/vit.py) and the bicubic resampling of their position
embeddings. A module of its own because it imports Keras: tfl.trusted_layers lists these classes for loading a
model.keras, while listing backbones (tfl/backbones/vit.py) stays free of Keras."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers, ops

# --- bicubic resampling as torch does it --------------------------------------------------------------------------

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
    """[out_size, in_size] weights W with W @ v == torch's 1-D bicubic `F.interpolate(v, out_size)` (align_corners
    False): with antialias, PIL's separable filter (a=-0.5, support widened when shrinking, weights normalised);
    without, torch's 4-tap kernel (a=-0.75) with indices clamped at the border."""
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        if antialias:
            support = 2.0 * scale if scale >= 1.0 else 2.0
            center = scale * (i + 0.5)
            invscale = 1.0 / scale if scale >= 1.0 else 1.0
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) * invscale, -0.5)
            weights[i, lo:hi] = w / w.sum()
        else:
            source = scale * (i + 0.5) - 0.5
            floor = math.floor(source)
            t = source - floor
            for offset, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
                weights[i, min(max(floor + offset, 0), in_size - 1)] += w
    return weights


def resample_matrix(old_grid: tuple[int, int], new_grid: tuple[int, int]) -> np.ndarray | None:
    """[new tokens, old tokens] matrix resampling a row-major position grid; None when the grid is unchanged."""
    if tuple(old_grid) == tuple(new_grid):
        return None
    rows = bicubic_matrix(old_grid[0], new_grid[0])
    cols = bicubic_matrix(old_grid[1], new_grid[1])
    return np.kron(rows, cols).astype(np.float32)


# --- layers ---------------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="tfl")
class PositionalTokens(layers.Layer):
    """timm's `_pos_embed`: prepend class/register tokens, add position embeddings (resampled to `grid`)."""

    def __init__(self, grid, native_grid, class_token=True, reg_tokens=0, no_embed_class=False, **kwargs):
        super().__init__(**kwargs)
        self.grid, self.native_grid = tuple(grid), tuple(native_grid)
        self.class_token, self.reg_tokens, self.no_embed_class = bool(class_token), int(reg_tokens), no_embed_class
        self.matrix = resample_matrix(self.native_grid, self.grid)

    def build(self, input_shape):
        dim = input_shape[-1]
        tiny = keras.initializers.RandomNormal(stddev=1e-6)  # timm's init for cls/reg tokens
        if self.class_token:
            self.cls_token = self.add_weight((1, 1, dim), initializer=tiny, name="cls_token")
        if self.reg_tokens:
            self.reg_token = self.add_weight((1, self.reg_tokens, dim), initializer=tiny, name="reg_token")
        embedded = 0 if self.no_embed_class else int(self.class_token) + self.reg_tokens
        positions = embedded + self.native_grid[0] * self.native_grid[1]
        self.pos_embed = self.add_weight((1, positions, dim), name="pos_embed",
                                         initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def positions(self):
        pos = self.pos_embed
        if self.matrix is None:
            return pos
        prefix = 0 if self.no_embed_class else int(self.class_token) + self.reg_tokens
        grid = ops.einsum("ij,bjd->bid", ops.convert_to_tensor(self.matrix, dtype=pos.dtype), pos[:, prefix:])
        return ops.concatenate([pos[:, :prefix], grid], axis=1) if prefix else grid

    def call(self, x):
        pos = ops.cast(self.positions(), x.dtype)
        zeros = ops.zeros_like(x[:, :1, :])  # [batch, 1, dim]: broadcasts the tokens to the batch
        tokens = []
        if self.class_token:
            tokens.append(zeros + ops.cast(self.cls_token, x.dtype))
        if self.reg_tokens:
            tokens.append(zeros + ops.cast(self.reg_token, x.dtype))
        if self.no_embed_class:
            return ops.concatenate([*tokens, x + pos], axis=1)
        return ops.concatenate([*tokens, x], axis=1) + pos if tokens else x + pos

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] + int(self.class_token) + self.reg_tokens, input_shape[2])

    def get_config(self):
        return {**super().get_config(), "grid": self.grid, "native_grid": self.native_grid,
                "class_token": self.class_token, "reg_tokens": self.reg_tokens,
                "no_embed_class": self.no_embed_class}

@keras.saving.register_keras_serializable(package="tfl")
class ViTAttention(layers.Layer):
    """Multi-head self-attention on timm's fused qkv projection [batch, tokens, 3*dim] -> [batch, tokens, dim]."""

    def __init__(self, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)

    def call(self, qkv):
        tokens, dim = qkv.shape[1], qkv.shape[-1] // 3
        head_dim = dim // self.num_heads

        def heads(t):  # [batch, tokens, dim] -> [batch, heads, tokens, head_dim]; 4-D only (TFLite)
            return ops.transpose(ops.reshape(t, (-1, tokens, self.num_heads, head_dim)), (0, 2, 1, 3))

        q, k, v = heads(qkv[..., :dim]), heads(qkv[..., dim:2 * dim]), heads(qkv[..., 2 * dim:])
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * ops.cast(head_dim ** -0.5, qkv.dtype)
        out = ops.matmul(ops.softmax(scores, axis=-1), v)
        return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, tokens, dim))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // 3)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}

@keras.saving.register_keras_serializable(package="tfl")
class LayerScale(layers.Layer):
    """x * gamma, per channel (timm's LayerScale, DINOv2's ls1/ls2)."""

    def __init__(self, init_values=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.init_values = float(init_values)

    def build(self, input_shape):
        self.gamma = self.add_weight((input_shape[-1],), name="gamma",
                                     initializer=keras.initializers.Constant(self.init_values))

    def call(self, x):
        return x * ops.cast(self.gamma, x.dtype)

    def get_config(self):
        return {**super().get_config(), "init_values": self.init_values}

@keras.saving.register_keras_serializable(package="tfl")
class TokenPool(layers.Layer):
    """timm's global_pool: "token" takes the class token, "avg" the mean of the tokens after the prefix."""

    def __init__(self, mode="token", num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.num_prefix_tokens = mode, int(num_prefix_tokens)

    def call(self, x):
        if self.mode == "token":
            return x[:, 0]
        return ops.mean(x[:, self.num_prefix_tokens:], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "num_prefix_tokens": self.num_prefix_tokens}


