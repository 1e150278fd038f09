"""The SD-VAE (diffusers `AutoencoderKL`) in Flax, NHWC, configured by a diffusers config.json.

FCDM trains on the latents of `stabilityai/sd-vae-ft-ema` (as DiT does); diffusers
no longer ships Flax models, so this is our own. Module and parameter names mirror the
diffusers state_dict (`encoder.down_blocks.0.resnets.1.norm2.weight` is
`encoder/down_blocks_0/resnets_1/norm2/scale`), so loading is a mechanical walk plus
layout transposes (conv OIHW -> HWIO, linear transposed). `load_vae(DIR)` reads a local
diffusers directory: `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`,
read with `weights_only=True`), with the old (`query/key/value/proj_attn`) or new
(`to_q/to_k/to_v/to_out.0`) attention names.

    model, params = load_vae("/path/to/sd-vae-ft-ema")
    post = model.apply(params, images, method=model.encode)   # images NHWC in [-1, 1]
    z = post.mean * model.config.scaling_factor                # or post.sample(key)
    x = model.apply(params, z / model.config.scaling_factor, method=model.decode)

Convolutions use XLA's default precision (TF32/bf16 passes on GPU/TPU, as PyTorch's cuDNN
convolutions use TF32 by default); wrap the call in
`jax.default_matmul_precision("highest")` for full float32.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from fcdm_jax import fileio
from fcdm_jax.models import torch_weights

Dtype = Any

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
RESNET_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a diffusers `AutoencoderKL` config.json that shape the network."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
  up_block_types: tuple[str, ...] = (UP_BLOCK,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"VAE config: {len(self.down_block_types)} down blocks, "
                       f"{len(self.up_block_types)} up blocks, {n} block_out_channels; "
                       "they must be equal")
    bad = {t for t in self.down_block_types if t != DOWN_BLOCK}
    bad |= {t for t in self.up_block_types if t != UP_BLOCK}
    if bad:
      raise ValueError(f"VAE config: unsupported block types {sorted(bad)}; only "
                       f"{DOWN_BLOCK}/{UP_BLOCK} (the SD-VAE) are implemented")
    if self.act_fn != "silu":
      raise ValueError(f"VAE config: act_fn {self.act_fn!r} is not supported (only 'silu')")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"VAE config: {c} channels are not divisible into "
                         f"{self.norm_num_groups} groups")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """Takes the known fields of a diffusers config dict; bookkeeping keys are ignored."""
    cls_name = d.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
      raise ValueError(f"config is for a {cls_name}, not an AutoencoderKL")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
    if kw.get("use_quant_conv") is None:
      kw.pop("use_quant_conv", None)
    if kw.get("use_post_quant_conv") is None:
      kw.pop("use_post_quant_conv", None)
    return cls(**kw)

  @classmethod
  def from_json(cls, path: str) -> "VAEConfig":
    return cls.from_dict(json.loads(fileio.read_text(path)))

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


class Posterior(NamedTuple):
  """The encoder's diagonal Gaussian; `logvar` clamped to [-30, 20] like diffusers."""
  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


# ----------------------------------------------------------------------------- blocks


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1,
          padding="SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
                 name=name)


def _group_norm(groups: int, name: str, dtype: Dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=RESNET_EPS, dtype=dtype,
                      use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, "norm1", self.dtype)(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(_group_norm(self.groups, "norm2", self.dtype)(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over all positions, GroupNorm first, residual added."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, hgt, wid, c = x.shape
    h = _group_norm(self.groups, "group_norm", self.dtype)(x).reshape(n, hgt * wid, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    scores = jnp.einsum("nqc,nkc->nqk", q, k).astype(jnp.float32) / np.sqrt(c)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = dense("to_out_0")(jnp.einsum("nqk,nkc->nqc", weights, v))
    return x + out.reshape(n, hgt, wid, c)


class MidBlock(nn.Module):
  channels: int
  groups: int
  attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock2D(self.channels, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock2D(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample2D(nn.Module):
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # diffusers pads right and bottom by one, then a valid stride-2 3x3 conv.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample2D(nn.Module):
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)   # nearest, x2
    return _conv(self.channels, 3, "conv", self.dtype)(x)


class DownEncoderBlock2D(nn.Module):
  channels: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.downsample:
      x = Downsample2D(self.channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  channels: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.upsample:
      x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, d = self.config, self.dtype
    chans = cfg.block_out_channels
    x = _conv(chans[0], 3, "conv_in", d)(x)
    for i, c in enumerate(chans):
      x = DownEncoderBlock2D(c, cfg.layers_per_block, cfg.norm_num_groups,
                             i < len(chans) - 1, d, name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, d,
                 name="mid_block")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out", d)(x))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", d)(x)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg, d = self.config, self.dtype
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", d)(z)
    x = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, d,
                 name="mid_block")(x)
    for i, c in enumerate(chans):
      x = UpDecoderBlock2D(c, cfg.layers_per_block + 1, cfg.norm_num_groups,
                           i < len(chans) - 1, d, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out", d)(x))
    return _conv(cfg.out_channels, 3, "conv_out", d)(x)


class AutoencoderKL(nn.Module):
  """encode: images (N, H, W, in_channels) in [-1, 1] -> Posterior over (N, H/f, W/f, latent);
  decode: latents -> images. H and W must be multiples of `config.downsample_factor`."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv", self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv", self.dtype)

  def encode(self, images) -> Posterior:
    cfg = self.config
    f = cfg.downsample_factor
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"VAE.encode takes (N, H, W, {cfg.in_channels}) images, got "
                       f"{images.shape}")
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of {f}")
    moments = self.encoder(images.astype(self.dtype))
    if cfg.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents):
    if latents.ndim != 4 or latents.shape[-1] != self.config.latent_channels:
      raise ValueError(f"VAE.decode takes (N, h, w, {self.config.latent_channels}) latents, "
                       f"got {latents.shape}")
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    """Reconstruction through the posterior mean (also what `init` traces)."""
    return self.decode(self.encode(images).mean)


# ----------------------------------------------------------------------------- weights

_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTENTION_LINEAR_RE = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _torch_module_name(flax_name: str) -> str:
  return re.sub(r"_(\d+)$", r".\1", flax_name)


def torch_layout(model: AutoencoderKL) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """diffusers state_dict key -> (Flax param path, PyTorch shape), for every weight."""
  f = model.config.downsample_factor
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, f, f, model.config.in_channels), jnp.float32))
  layout = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
    names = tuple(p.key for p in path)
    leaf_name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[names[-1]]
    key = ".".join([_torch_module_name(n) for n in names[:-1]] + [leaf_name])
    shape = tuple(leaf.shape)
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:
      shape = shape[::-1]
    layout[key] = (names, shape)
  return layout


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Old attention names -> new ones; 1x1-conv-shaped attention weights -> linear."""
  out = {}
  for key, value in state_dict.items():
    m = _OLD_ATTENTION_RE.match(key)
    if m:
      key = f"{m.group(1)}.{_OLD_ATTENTION[m.group(2)]}.{m.group(3)}"
    value = np.asarray(value)
    if _ATTENTION_LINEAR_RE.search(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    out[key] = value
  return out


def params_from_torch(state_dict: Mapping[str, Any], model: AutoencoderKL,
                      source: str = "state_dict") -> dict:
  """diffusers AutoencoderKL state_dict -> Flax {'params': ...}; ValueError listing the
  missing, unexpected and misshapen keys when it belongs to another model or config."""
  layout = torch_layout(model)
  given = normalize_state_dict(state_dict)
  torch_weights.check_state_dict(given, {k: shape for k, (_, shape) in layout.items()},
                                 f"{source} does not hold AutoencoderKL weights for this config")
  params = torch_weights.nest_from_torch(layout, given)
  return {"params": params}


def find_vae_files(path: str) -> tuple[str, str]:
  """(config.json, weights file) of a diffusers VAE directory (or a pipeline's `vae/`)."""
  return torch_weights.find_model_files(path, "VAE", CONFIG_NAME, WEIGHT_NAMES, "vae")


def load_vae(path: str, dtype: Dtype = jnp.float32) -> tuple[AutoencoderKL, dict]:
  """(model, params) from a local diffusers AutoencoderKL directory (no download)."""
  config_path, weights_path = find_vae_files(path)
  model = AutoencoderKL(VAEConfig.from_json(config_path), dtype=dtype)
  state_dict = torch_weights.load_torch_state_dict(weights_path, which="model")
  return model, params_from_torch(state_dict, model, source=weights_path)
