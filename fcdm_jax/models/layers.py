"""Building blocks of FCDM, NHWC, named after the published PyTorch modules.

Each module keeps the parameter names of its PyTorch counterpart so that weight
conversion (`fcdm_jax.convert`) is a mechanical walk plus layout transposes.
Every parameter carries logical axis names (see `fcdm_jax.sharding`) so that
the training system can shard it from rules in the config.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
Initializer = Callable[..., jax.Array]

FREQUENCY_EMBEDDING_SIZE = 256
NORM_EPS = 1e-6
GRN_EPS = 1e-6

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
normal_002 = nn.initializers.normal(stddev=0.02)

DWCONV_IMPLS = ("xla", "shift", "shift_vjp", "auto")
TEXT_EMBEDDERS = ("linear", "mlp")


def logical(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
  """Attaches logical axis names to an initializer (read by the sharding rules)."""
  return nn.with_logical_partitioning(init, names)


def flattened_linear_xavier(key, shape, dtype=jnp.float32):
  """Xavier-uniform of a conv kernel seen as a linear layer on its flattened window.

  The published code initialises `x_embedder` this way: fan_in = kh*kw*in,
  fan_out = out (a conv initialiser would use kh*kw*out).
  """
  kh, kw, cin, cout = shape
  fan_in, fan_out = kh * kw * cin, cout
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def modulate(x, shift, scale):
  """adaLN modulation, condition broadcast over the spatial axes (NHWC)."""
  return x * (1 + scale[:, None, None, :]) + shift[:, None, None, :]


def layer_norm(x, eps: float = NORM_EPS):
  """LayerNorm over channels without affine, statistics in float32 (two-pass variance)."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def pixel_unshuffle(x, r: int = 2):
  """PyTorch `pixel_unshuffle` in NHWC: output channel c*r*r + i*r + j holds offset (i, j).

  TF's `space_to_depth` orders channels (i, j, c) instead; that would silently
  break weight conversion.
  """
  n, h, w, c = x.shape
  x = x.reshape(n, h // r, r, w // r, r, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(n, h // r, w // r, c * r * r)


def pixel_shuffle(x, r: int = 2):
  """PyTorch `pixel_shuffle` in NHWC, the inverse of `pixel_unshuffle`."""
  n, h, w, crr = x.shape
  c = crr // (r * r)
  x = x.reshape(n, h, w, c, r, r)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * r, w * r, c)


def timestep_features(t, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
  """Sinusoidal features `[cos, sin]` of t as given (DDPM indices or flow times)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def depthwise_conv_xla(x, kernel):
  """Depthwise conv as XLA's grouped convolution; kernel (kh, kw, 1, C), SAME padding."""
  kh, kw = kernel.shape[:2]
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


def _shifted_sum(xp, kernel, h: int, w: int):
  """sum_ij xp[:, i:i+h, j:j+w] * kernel[i, j, 0], accumulated in float32 (or wider)."""
  kh, kw = kernel.shape[:2]
  acc = jnp.promote_types(xp.dtype, jnp.float32)
  k = kernel.astype(acc)
  out = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + h, j:j + w, :].astype(acc) * k[i, j, 0]
      out = term if out is None else out + term
  return out


def depthwise_conv_shift(x, kernel):
  """Depthwise conv as kh*kw shifted multiply-adds of a padded input.

  Same numbers as the grouped conv (up to summation order); on CPUs (and for the
  backward pass on GPUs) XLA runs it much faster than `feature_group_count=C`.
  Low-precision inputs accumulate in float32, as a convolution would.
  """
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return _shifted_sum(xp, kernel, h, w).astype(x.dtype)


def depthwise_conv_shift_blocked(x, kernel, blocks: int = 2):
  """`depthwise_conv_shift` computed in `blocks` bands of rows by a loop.

  Why the loop: XLA's CPU fusion otherwise merges the kh*kw multiply-adds into every
  consumer (LayerNorm's two statistics and its normalisation) and recomputes them there
  in slow code; a loop boundary makes the result materialise once (3x faster per block
  measured, docs/performance.md). Bands of rows keep the batch axis whole, so data
  parallel sharding is untouched.
  """
  kh, kw = kernel.shape[:2]
  n, h, w, c = x.shape
  if blocks < 2 or h % blocks:
    return depthwise_conv_shift(x, kernel)
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  rows = h // blocks

  def band(b, out):
    part = jax.lax.dynamic_slice_in_dim(xp, b * rows, rows + kh - 1, axis=1)
    value = _shifted_sum(part, kernel, rows, w).astype(x.dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, value, b * rows, axis=1)

  return jax.lax.fori_loop(0, blocks, band, jnp.zeros_like(x))


def depthwise_kernel_grad(x, g, kh: int, kw: int):
  """Kernel gradient of a SAME depthwise conv: dk[i, j, c] = sum_nhw xp[n, h+i, w+j, c] g[n, h, w, c].

  Autodiff of the shifted form makes kh*kw separate full-size reductions, which XLA's
  CPU backend runs slowly. Here each kernel row i is one matmul batched over channels
  that contracts batch and rows: r[c, w, v] = sum_nh g[n, h, w, c] xp[n, h+i, v, c];
  its diagonals v = w + j, summed over w, are dk[i, j, c]. (It does (W+kw-1)/kw times
  the multiply-adds, but as matmuls.) Accumulates in float32.
  """
  n, h, w, c = x.shape
  ph, pw = kh // 2, kw // 2
  wp = w + 2 * pw
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))).transpose(3, 0, 1, 2)  # C,N,H+,W+
  gt = g.transpose(3, 0, 1, 2)                                                     # C,N,H,W
  r = jnp.stack([jnp.einsum("cnhw,cnhv->cwv", gt, xp[:, :, i:i + h],
                            preferred_element_type=jnp.float32) for i in range(kh)])
  # r[i, c, w, v] sits at w*wp + v of its (w, v) block, so the diagonal v = w + j is at
  # w*(wp+1) + j: padding the block to w*(wp+1) elements and viewing it as (w, wp+1)
  # puts diagonal j in column j.
  r = r.reshape(kh, c, w * wp)
  r = jnp.pad(r, ((0, 0), (0, 0), (0, w))).reshape(kh, c, w, wp + 1)[..., :kw]
  return r.sum(2).transpose(0, 2, 1)[:, :, None, :]                            # kh,kw,1,C


@jax.custom_vjp
def depthwise_conv_shift_vjp(x, kernel):
  """Shifted multiply-adds in row bands (`depthwise_conv_shift_blocked`) with a
  hand-written backward pass: the fastest formulation measured on CPUs.

  Input gradient: the same banded shifted form on the cotangent with the flipped kernel.
  Kernel gradient: `depthwise_kernel_grad` (matmuls instead of kh*kw reductions).
  """
  return depthwise_conv_shift_blocked(x, kernel)


def _dw_shift_vjp_fwd(x, kernel):
  return depthwise_conv_shift_blocked(x, kernel), (x, kernel)


def _dw_shift_vjp_bwd(res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  dx = depthwise_conv_shift_blocked(g.astype(x.dtype), kernel[::-1, ::-1])
  dk = depthwise_kernel_grad(x, g.astype(x.dtype), kh, kw)
  return dx, dk.astype(kernel.dtype)


depthwise_conv_shift_vjp.defvjp(_dw_shift_vjp_fwd, _dw_shift_vjp_bwd)

DWCONV_FNS = {"xla": depthwise_conv_xla, "shift": depthwise_conv_shift,
              "shift_vjp": depthwise_conv_shift_vjp}


def resolve_dwconv_impl(impl: str, backend: str | None = None) -> str:
  """'auto' picks the fastest measured formulation for `backend` (default: JAX's default
  backend; the TPU preflight compiles for 'tpu' from a CPU process).

  CPU: shifted multiply-adds with the hand-written backward (docs/performance.md).
  GPU: the same. With autodiff's backward ('shift') XLA's GPU compiler can take hours:
  FCDM-S/256 with remat 'dots' for four RTX 4090s sat over 50 min in priority fusion's
  Triton tiling search, against 55 s with 'shift_vjp' and 50 s with 'xla'; on an H200 the
  conv alone at XL's shapes cost about 17% less with 'shift_vjp' than with 'shift', and
  XLA's grouped-conv backward up to 3x more (docs/performance.md, "Accelerators").
  TPU: XLA's grouped convolution (the TPU preflight table: least HBM and lowest step bound
  of the three on XL/256).
  """
  if impl not in DWCONV_IMPLS:
    raise ValueError(f"unknown dwconv_impl {impl!r}; expected one of {DWCONV_IMPLS}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return "shift_vjp"
  return "shift_vjp" if backend in ("gpu", "cuda", "rocm") else "xla"


class DepthwiseConv(nn.Module):
  """7x7 depthwise conv with bias (PyTorch `Conv2d(D, D, 7, padding=3, groups=D)`)."""
  features: int
  kernel_size: int = 7
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", logical(xavier_uniform, (None, None, None, "embed")),
                        (k, k, 1, self.features))
    bias = self.param("bias", logical(zeros, ("embed",)), (self.features,))
    kernel = kernel.astype(self.dtype)
    fn = DWCONV_FNS[resolve_dwconv_impl(self.impl)]
    return fn(x.astype(self.dtype), kernel) + bias.astype(self.dtype)


def dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, name: str,
          kernel_init: Initializer = xavier_uniform, use_bias: bool = True) -> nn.Dense:
  """A Linear / 1x1 conv with logical axis names on kernel and bias."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=logical(kernel_init, names),
                  bias_init=logical(zeros, (names[1],)))


def conv3x3(features: int, names: tuple[str | None, str | None], dtype: Dtype, name: str,
            use_bias: bool = True, kernel_init: Initializer = xavier_uniform) -> nn.Conv:
  """A 3x3 conv with padding 1 (PyTorch `Conv2d(a, b, 3, padding=1)`)."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=use_bias, dtype=dtype,
                 name=name, kernel_init=logical(kernel_init, (None, None) + names),
                 bias_init=logical(zeros, (names[1],)))


class GRN(nn.Module):
  """Global Response Normalisation (ConvNeXt-V2), per-channel gamma and beta."""
  features: int

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", logical(zeros, ("mlp",)), (self.features,))
    beta = self.param("beta", logical(zeros, ("mlp",)), (self.features,))
    xf = x.astype(jnp.float32)
    g = jnp.sqrt(jnp.sum(jnp.square(xf), axis=(1, 2), keepdims=True))
    n = g / (jnp.mean(g, axis=-1, keepdims=True) + GRN_EPS)
    return (gamma * (xf * n) + beta + xf).astype(x.dtype)


class TimestepEmbedder(nn.Module):
  """Sinusoidal features -> Linear -> SiLU -> Linear (PyTorch `mlp.0`, `mlp.2`)."""
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    h = timestep_features(t).astype(self.dtype)
    h = dense(self.hidden_size, ("time_freq", "cond_embed"), self.dtype, "mlp_0",
              kernel_init=normal_002)(h)
    h = nn.silu(h)
    return dense(self.hidden_size, ("cond_embed", "cond_embed_out"), self.dtype, "mlp_2",
                 kernel_init=normal_002)(h)


class LabelEmbedder(nn.Module):
  """Class table with an extra null row (for CFG) when label dropout is enabled.

  In training, the label at batch position p is dropped by its own draw from
  fold_in(this level's 'label_dropout' key, p), with p the example's position in the
  global batch (`positions`; default 0..N-1): the same drop whatever micro-batch holds it.
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float

  @nn.compact
  def __call__(self, labels, train: bool, force_drop_ids=None, positions=None):
    rows = self.num_classes + int(self.dropout_prob > 0)
    table = self.param("embedding_table", logical(normal_002, ("vocab", "cond_embed")),
                       (rows, self.hidden_size))
    if force_drop_ids is not None:
      labels = jnp.where(force_drop_ids == 1, self.num_classes, labels)
    elif train and self.dropout_prob > 0:
      rng = self.make_rng("label_dropout")
      if positions is None:
        positions = jnp.arange(labels.shape[0], dtype=jnp.uint32)
      u = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(rng, p)))(positions)
      labels = jnp.where(u < self.dropout_prob, self.num_classes, labels)
    return jnp.take(table, labels, axis=0)


class TextEmbedder(nn.Module):
  """A pooled text embedding (N, text_dim) -> the level's width, in place of the label table.

  'linear': one Linear (`proj`); 'mlp': Linear -> SiLU -> Linear (`mlp_0`, `mlp_2`, named
  as in the timestep embedder). Kernels start at N(0, 0.02) as the timestep and label
  embedders' do, biases at zero. The embedding is taken as given: caption dropout (the
  empty caption's embedding in place of the caption's) is the caller's.
  """
  hidden_size: int
  kind: str = "linear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, embedding):
    if self.kind not in TEXT_EMBEDDERS:
      raise ValueError(f"unknown text_embedder {self.kind!r}; expected one of {TEXT_EMBEDDERS}")
    h = embedding.astype(self.dtype)
    if self.kind == "linear":
      return dense(self.hidden_size, ("text_embed", "cond_embed"), self.dtype, "proj",
                   kernel_init=normal_002)(h)
    h = dense(self.hidden_size, ("text_embed", "cond_embed"), self.dtype, "mlp_0",
              kernel_init=normal_002)(h)
    return dense(self.hidden_size, ("cond_embed", "cond_embed_out"), self.dtype, "mlp_2",
                 kernel_init=normal_002)(nn.silu(h))
