"""FCDM: the fully convolutional ConvNeXt U-net diffusion model, in Flax (NHWC).

Mirrors the published PyTorch module operation for operation:
per-level timestep and label embedders, adaLN-modulated ConvNeXt blocks with GRN,
pixel-(un)shuffle resampling in PyTorch channel order, and skip concatenation
[up, skip]. The repeated blocks of a level are one `nn.scan` so that compile time
does not grow with depth; their parameters are stacked on a leading 'layers' axis.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from fcdm_jax import conditions
from fcdm_jax.diffusion import guidance
from fcdm_jax.models import layers
from fcdm_jax.models.layers import conv3x3, dense

Dtype = Any

REMAT_POLICIES = {
    "none": None,
    # Recompute everything inside a block (what the published code does).
    "block": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap memory-bound ops.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

LEVEL_NAMES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2",
               "decoder_level_1")
LEVEL_OF_STAGE = (1, 2, 3, 2, 1)  # width multiplier exponent + 1 of each stage


def activation_constraint(x):
  """Shards NHWC activations by logical names (a no-op without a mesh and rules)."""
  return nn.with_logical_constraint(
      x, ("activation_batch", "activation_height", "activation_width", "activation_embed"))


class ConvNeXtBlock(nn.Module):
  """dwconv7 -> LN + adaLN(shift, scale) -> pwconv1 -> GELU -> GRN -> pwconv2 -> gated residual.

  Called as a scan body: returns (new carry, None); the condition is broadcast.
  """
  dim: int
  mlp_ratio: float
  dwconv_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    hidden = int(self.dim * self.mlp_ratio)
    h = layers.DepthwiseConv(self.dim, impl=self.dwconv_impl, dtype=self.dtype,
                             name="dwconv")(x)
    mod = dense(3 * self.dim, ("cond_embed", "cond"), self.dtype, "adaLN_modulation_1",
                kernel_init=layers.zeros)(nn.silu(c))
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    h = layers.modulate(layers.layer_norm(h), shift, scale)
    h = dense(hidden, ("embed", "mlp"), self.dtype, "pwconv1")(h)
    h = nn.gelu(h, approximate=False)
    h = layers.GRN(hidden, name="grn")(h)
    h = dense(self.dim, ("mlp", "embed"), self.dtype, "pwconv2")(h)
    out = x + gate[:, None, None, :] * h
    return activation_constraint(out.astype(x.dtype)), None


def block_stack(depth: int, remat: str, unroll: bool, name: str, **block_kwargs) -> nn.Module:
  """`depth` ConvNeXt blocks as one scanned module with stacked ('layers') parameters."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
  block_cls = ConvNeXtBlock
  if remat != "none":
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=False)
  scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast,), length=depth, unroll=depth if unroll else 1,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(name=name, **block_kwargs)


class Downsample(nn.Module):
  """3x3 conv a -> b/4 (no bias), then pixel-unshuffle x2 (PyTorch `conv.0`, `conv.1`)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv3x3(self.features // 4, ("embed_in", "embed_out"), self.dtype, "conv_0",
                use_bias=False)(x)
    return layers.pixel_unshuffle(x)


class Upsample(nn.Module):
  """3x3 conv a -> 4b (no bias), then pixel-shuffle x2."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv3x3(self.features * 4, ("embed_in", "embed_out"), self.dtype, "conv_0",
                use_bias=False)(x)
    return layers.pixel_shuffle(x)


class FinalLayer(nn.Module):
  """LN (no affine) + adaLN(shift, scale) + 3x3 conv to the output channels."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    dim = x.shape[-1]
    mod = dense(2 * dim, ("cond_embed", "cond"), self.dtype, "adaLN_modulation_1",
                kernel_init=layers.zeros)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = layers.modulate(layers.layer_norm(x), shift, scale)
    return conv3x3(self.out_channels, ("embed_in", "out_channels"), self.dtype, "conv",
                   kernel_init=layers.zeros)(x)


class FCDM(nn.Module):
  """The FCDM U-net. Fields 1-7 are the published constructor's, 8-10 choose the condition,
  the rest how it runs.

  Call: `apply({'params': p}, x, t, y, train=False, force_drop_ids=None, positions=None)`
  with x NHWC (N, H, W, in_channels), t (N,) float timesteps, and y:
  - condition='class' (published): (N,) int labels (num_classes = null), dropped to the
    null label at train time with probability class_dropout_prob;
  - condition='text': (N, text_dim) float pooled text embeddings (CLIP's, say), projected
    per level by `text_embedder` ('linear' or 'mlp') where the class rows would be added.
    The module takes them as given: caption dropout is the caller's (the empty caption's
    embedding in place of the caption's), so num_classes and class_dropout_prob are unused.
  `positions` (N,): the examples' positions in the global training batch, which key their
  label dropout (`layers.LabelEmbedder`; default 0..N-1).
  """
  in_channels: int = 4
  hidden_size: int = 128
  depth: Sequence[int] = (2, 4, 8, 4, 2)
  mlp_ratio: float = 3.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  # What conditions it (defaults: the published class-conditional model).
  condition: str = "class"
  text_dim: int = 768
  text_embedder: str = "linear"
  # How it runs (no effect on the numbers beyond floating-point rounding).
  dtype: Dtype = jnp.float32
  remat: str = "none"
  dwconv_impl: str = "auto"
  scan_unroll: bool = False

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def has_null_class(self) -> bool:
    return self.class_dropout_prob > 0

  @property
  def condition_kind(self):
    """The kind of y this model takes (`fcdm_jax.conditions`); ValueError if unknown."""
    return conditions.get(self.condition)

  def example_y(self, batch: int):
    """Zeros of the y this model takes, for init and shape-only tracing."""
    return conditions.example_y(self, batch)

  def check_inputs(self, x, t, y):
    """Clear errors for inputs the network cannot take (labels checked when concrete)."""
    kind = self.condition_kind
    if len(self.depth) != 5:
      raise ValueError(f"depth must list 5 stage depths [e1, e2, mid, d2, d1], got {self.depth}")
    if x.ndim != 4:
      raise ValueError(f"x must be NHWC (batch, height, width, channels), got shape {x.shape}")
    n, h, w, ch = x.shape
    if ch != self.in_channels:
      raise ValueError(f"x has {ch} channels but the model takes in_channels="
                       f"{self.in_channels} (x is NHWC, shape {x.shape})")
    if h % 4 or w % 4:
      raise ValueError(f"spatial size {h}x{w} must be divisible by 4 (two 2x downsamplings)")
    if t.shape != (n,):
      raise ValueError(f"t must have shape ({n},), got {t.shape}")
    kind.check_y(self, y, n)

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, force_drop_ids=None, positions=None):
    self.check_inputs(x, t, y)
    captions = self.condition_kind.uses_captions
    if captions and force_drop_ids is not None:
      raise ValueError("force_drop_ids applies to class labels; a text-conditioned model "
                       "drops captions by being given the empty caption's embedding")
    dtype = jnp.dtype(self.dtype)
    widths = [self.hidden_size * 2 ** k for k in range(3)]
    conds = []
    for k, width in enumerate(widths, start=1):
      t_emb = layers.TimestepEmbedder(width, dtype=dtype, name=f"t_embedder_{k}")(t)
      if captions:   # a pooled caption embedding, projected; else the class table
        y_emb = layers.TextEmbedder(width, self.text_embedder, dtype=dtype,
                                    name=f"text_embedder_{k}")(y)
      else:
        y_emb = layers.LabelEmbedder(self.num_classes, width, self.class_dropout_prob,
                                     name=f"y_embedder_{k}")(y, train, force_drop_ids, positions)
      conds.append((t_emb + y_emb.astype(t_emb.dtype)).astype(dtype))

    def stage(index, h):
      level = LEVEL_OF_STAGE[index]
      stack = block_stack(self.depth[index], self.remat, self.scan_unroll, LEVEL_NAMES[index],
                          dim=widths[level - 1], mlp_ratio=self.mlp_ratio,
                          dwconv_impl=self.dwconv_impl, dtype=dtype)
      return stack(h, conds[level - 1])[0]

    h = x.astype(dtype)
    h = conv3x3(widths[0], ("in_channels", "embed_out"), dtype, "x_embedder",
                kernel_init=layers.flattened_linear_xavier)(h)
    h = activation_constraint(h)
    skip1 = stage(0, h)
    h = Downsample(widths[1], dtype=dtype, name="down1_2")(skip1)
    skip2 = stage(1, h)
    h = Downsample(widths[2], dtype=dtype, name="down2_3")(skip2)
    h = stage(2, h)
    h = Upsample(widths[1], dtype=dtype, name="up3_2")(h)
    h = jnp.concatenate([h, skip2], axis=-1)
    h = dense(widths[1], ("embed_in", "embed_out"), dtype, "reduce_chans_2")(h)
    h = stage(3, h)
    h = Upsample(widths[0], dtype=dtype, name="up2_1")(h)
    h = jnp.concatenate([h, skip1], axis=-1)
    h = dense(widths[0], ("embed_in", "embed_out"), dtype, "reduce_chans_1")(h)
    h = stage(4, h)
    h = conv3x3(widths[0], ("embed_in", "embed_out"), dtype, "output_layer")(h)
    out = FinalLayer(self.out_channels, dtype=dtype, name="final_layer")(h, conds[0])
    return out.astype(jnp.float32)

  def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_eps: bool = False):
    """The published guided forward.

    The batch is [conditional half; null-label half]; both halves are run on the
    first half's x, and `u + s * (c - u)` is applied to the first 3 output channels
    (published behaviour) or, with `guide_all_eps`, to all in_channels epsilon
    channels. Both halves receive the guided value; other channels pass through.
    For condition='text' the second half of y carries the empty caption's embedding.
    """
    if not self.condition_kind.has_null(self):
      raise ValueError("classifier-free guidance needs a null class: this model was built "
                       "with class_dropout_prob=0")
    if x.shape[0] % 2:
      raise ValueError(f"forward_with_cfg takes [cond; uncond] halves, got odd batch {x.shape[0]}")
    half = x[: x.shape[0] // 2]
    out = self(jnp.concatenate([half, half], axis=0), t, y)
    return guidance.combine_cfg(out, cfg_scale,
                                guidance.guided_channels(self.in_channels, guide_all_eps))
