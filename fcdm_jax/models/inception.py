"""InceptionV3 in its FID configuration (Flax, NHWC), for ADM's evaluation metrics.

The network is the one of TensorFlow's `inception-2015-12-05` graph that ADM's evaluator
runs, in the layout of pytorch-fid's port (`FIDInceptionA/C/E`: average pools that do not
count padding, max pool in the last block, 1008 classes, BatchNorm eps 1e-3). Weights
come from pytorch-fid's `pt_inception-2015-12-05-*.pth` given by path
(`load_inception`); module names mirror its state_dict keys.

Outputs for images of any size (`InceptionV3.__call__`, input NHWC, values 0..255):
- `pool`: pool3, 2048 features (FID, precision/recall).
- `spatial`: the first 7 channels of the 1x1 branch of `Mixed_6d` (TF `mixed_6/conv`,
  after its ReLU), 17x17x7 flattened in (h, w, c) order = 2023 features (sFID). The
  branch is the first in the block's concatenation, so these are channels 0..6 of the
  block output, as ADM slices `mixed_6/conv:0[..., :7]`.
- `logits`: `fc(pool)`, 1008 classes with the bias (pytorch-fid's `fc`).
- `logits_unbiased`: `pool @ fc.kernel` without the bias: ADM's Inception Score takes
  the softmax of these (it reads only the `softmax/logits/MatMul` weight).

Preprocessing (`preprocess`):
- "adm" (default, what ADM's TF graph does): bilinear resize to 299 with TF1's legacy
  `ResizeBilinear` (align_corners=False, no half-pixel centres: source = dst * in/out),
  then `(x - 128) / 128`.
- "pytorch_fid": x / 255, `F.interpolate(bilinear, align_corners=False)` (half-pixel
  centres, no antialias), then `2x - 1`.
The "adm" resize equals TF's `resize_bilinear(align_corners=False, half_pixel_centers=False)`
bit for bit (tested). What remains between us and ADM's TF graph in "adm" mode is float32
rounding in the convolutions (XLA vs TF kernels; against PyTorch we measure ~1e-6
relative on pool3 and logits) and pytorch-fid's port of the graph's weights, which its
authors report to reproduce TF's FID closely; we could not check that port, nor measure
the effect on FID of the other convention ("pytorch_fid": the sampling grid shifts by up
to half a source pixel at 256 -> 299), because no real weights can be downloaded here.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from fcdm_jax import fileio
from fcdm_jax.models import torch_weights

INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
PREPROCESSING = ("adm", "pytorch_fid")
Dtype = Any


# ----------------------------------------------------------------------------- resize


def _axis_taps(n_in: int, n_out: int, legacy: bool):
  """Per output index: the two source indices and the weight of the second."""
  scale = np.float32(n_in) / np.float32(n_out)
  dst = np.arange(n_out, dtype=np.float32)
  if legacy:
    src = dst * scale
  else:
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x, size: int, legacy: bool):
  """Bilinear resize of NHWC `x` to size x size, without antialiasing.

  `legacy=True` is TF1's `ResizeBilinear` (the op in ADM's Inception graph);
  `legacy=False` is PyTorch's `interpolate(mode="bilinear", align_corners=False)`.
  Width is interpolated first, then height, as TF does.
  """
  for axis in (2, 1):
    n_in = x.shape[axis]
    if n_in == size:
      continue
    i0, i1, w = _axis_taps(n_in, size, legacy)
    shape = [1] * x.ndim
    shape[axis] = size
    a = jnp.take(x, i0, axis=axis)
    b = jnp.take(x, i1, axis=axis)
    x = a + (b - a) * jnp.asarray(w).reshape(shape)
  return x


def preprocess(images, mode: str = "adm"):
  """Images (N, H, W, 3) with values 0..255 -> the network's 299x299 input in [-1, 1]."""
  x = jnp.asarray(images).astype(jnp.float32)
  if mode == "adm":
    return (resize_bilinear(x, INPUT_SIZE, legacy=True) - 128.0) * (1.0 / 128.0)
  if mode == "pytorch_fid":
    return 2.0 * resize_bilinear(x / 255.0, INPUT_SIZE, legacy=False) - 1.0
  raise ValueError(f"preprocess must be one of {PREPROCESSING}, got {mode!r}")


# ----------------------------------------------------------------------------- network


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

  Convolutions run at full float32 precision: XLA's default on GPU/TPU (TF32/bf16
  passes) would move the features by ~1e-3, more than the metrics should see.
  """
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                precision=jax.lax.Precision.HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x):
  """3x3 stride-1 average that ignores the padding, as TF's pool (and FIDInception) does."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv2d(f, k, 1, p, self.dtype, name=name)
    b1 = c(64, name="branch1x1")(x)
    b5 = c(48, name="branch5x5_1")(x)
    b5 = c(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
    b3 = c(64, name="branch3x3dbl_1")(x)
    b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
    b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
    bp = c(self.pool_features, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), 2, dtype=self.dtype, name="branch3x3")(x)
    bd = BasicConv2d(64, dtype=self.dtype, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), 1, (1, 1), self.dtype, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), 2, dtype=self.dtype, name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    c = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv2d(f, k, 1, p, self.dtype, name=name)
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = c(192, name="branch1x1")(x)
    b7 = c(c7, name="branch7x7_1")(x)
    b7 = c(c7, *row, name="branch7x7_2")(b7)
    b7 = c(192, *col, name="branch7x7_3")(b7)
    bd = c(c7, name="branch7x7dbl_1")(x)
    bd = c(c7, *col, name="branch7x7dbl_2")(bd)
    bd = c(c7, *row, name="branch7x7dbl_3")(bd)
    bd = c(c7, *col, name="branch7x7dbl_4")(bd)
    bd = c(192, *row, name="branch7x7dbl_5")(bd)
    bp = c(192, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda f, k=(1, 1), s=1, p=(0, 0), name=None: BasicConv2d(f, k, s, p, self.dtype,
                                                                    name=name)
    b3 = c(192, name="branch3x3_1")(x)
    b3 = c(320, (3, 3), 2, name="branch3x3_2")(b3)
    b7 = c(192, name="branch7x7x3_1")(x)
    b7 = c(192, (1, 7), 1, (0, 3), name="branch7x7x3_2")(b7)
    b7 = c(192, (7, 1), 1, (3, 0), name="branch7x7x3_3")(b7)
    b7 = c(192, (3, 3), 2, name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """`pool="avg"` is FIDInceptionE_1, `pool="max"` FIDInceptionE_2 (the TF graph's quirk)."""
  pool: str = "avg"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv2d(f, k, 1, p, self.dtype, name=name)
    row, col = ((1, 3), (0, 1)), ((3, 1), (1, 0))
    b1 = c(320, name="branch1x1")(x)
    b3 = c(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([c(384, *row, name="branch3x3_2a")(b3),
                          c(384, *col, name="branch3x3_2b")(b3)], axis=-1)
    bd = c(448, name="branch3x3dbl_1")(x)
    bd = c(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([c(384, *row, name="branch3x3dbl_3a")(bd),
                          c(384, *col, name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_same(x)
    else:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = c(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID InceptionV3: images (N, H, W, 3) in 0..255 -> dict of features (module docstring)."""
  preprocess: str = "adm"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"InceptionV3 takes NHWC RGB images, got shape {images.shape}")
    x = preprocess(images, self.preprocess).astype(self.dtype)
    d = self.dtype
    x = BasicConv2d(32, (3, 3), 2, dtype=d, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), dtype=d, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), 1, (1, 1), d, name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = BasicConv2d(80, dtype=d, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), dtype=d, name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = InceptionA(32, d, name="Mixed_5b")(x)
    x = InceptionA(64, d, name="Mixed_5c")(x)
    x = InceptionA(64, d, name="Mixed_5d")(x)
    x = InceptionB(d, name="Mixed_6a")(x)
    x = InceptionC(128, d, name="Mixed_6b")(x)
    x = InceptionC(160, d, name="Mixed_6c")(x)
    x = InceptionC(160, d, name="Mixed_6d")(x)
    spatial = x[..., :SPATIAL_CHANNELS].astype(jnp.float32)
    x = InceptionC(192, d, name="Mixed_6e")(x)
    x = InceptionD(d, name="Mixed_7a")(x)
    x = InceptionE("avg", d, name="Mixed_7b")(x)
    x = InceptionE("max", d, name="Mixed_7c")(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    fc = nn.Dense(NUM_CLASSES, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                  name="fc")
    logits = fc(pool)
    kernel = fc.variables["params"]["kernel"]
    return {
        "pool": pool,
        "spatial": spatial.reshape(spatial.shape[0], -1),
        "logits": logits,
        "logits_unbiased": jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST),
    }


# ----------------------------------------------------------------------------- weights

_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def _variable_shapes(model: InceptionV3) -> dict:
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def torch_layout(model: InceptionV3 | None = None) -> dict[str, tuple[tuple[str, ...], tuple]]:
  """pytorch-fid state_dict key -> (Flax variable path, PyTorch shape), for every weight."""
  shapes = _variable_shapes(model or InceptionV3())
  layout = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(p.key for p in path)
    collection, modules, last = names[0], names[1:-1], names[-1]
    key = ".".join(modules + (_TORCH_LEAF[(collection, last)],))
    shape = tuple(leaf.shape)
    if len(shape) == 4:      # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:    # (in, out) -> (out, in)
      shape = shape[::-1]
    layout[key] = (names, shape)
  return layout


def variables_from_torch(state_dict: Mapping[str, Any], model: InceptionV3 | None = None,
                         source: str = "state_dict") -> dict:
  """pytorch-fid FID Inception state_dict -> Flax variables {params, batch_stats}.

  Raises ValueError naming the missing, unexpected and misshapen keys when the weights
  are not those of the FID Inception (e.g. torchvision's 1000-class InceptionV3 or
  another model entirely).
  """
  layout = torch_layout(model)
  given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  torch_weights.check_state_dict(
      given, {k: shape for k, (_, shape) in layout.items()},
      f"{source} does not hold pytorch-fid's FID InceptionV3 weights "
      "(pt_inception-2015-12-05-*.pth)")
  variables = torch_weights.nest_from_torch(layout, given)
  return variables


def load_inception(path: str, preprocess: str = "adm",
                   dtype: Dtype = jnp.float32) -> tuple[InceptionV3, dict]:
  """(model, variables) from pytorch-fid's `pt_inception-2015-12-05-*.pth` (or the same
  state_dict as `.safetensors`); `.pth` files are read with `weights_only=True`."""
  if not fileio.isfile(path):
    raise FileNotFoundError(
        f"Inception weights not found: {path}. Pass pytorch-fid's FID Inception file "
        "(pt_inception-2015-12-05-6726825d.pth from the pytorch-fid releases); it cannot be "
        "downloaded at run time.")
  model = InceptionV3(preprocess=preprocess, dtype=dtype)
  state_dict = torch_weights.load_torch_state_dict(path, which="model")
  return model, variables_from_torch(state_dict, model, source=path)
