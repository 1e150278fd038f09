"""FCDM as a PyTorch module with the published structure and state_dict keys (NCHW).

Written from the published architecture and initialisation so that a checkpoint exported by
`fcdm_jax.convert.save_torch_checkpoint` can be checked the way the published code
would use it (plain `torch.load`, `load_state_dict(strict=True)`), and so that the
benchmark (`fcdm_jax.bench --vs-torch`) has the PyTorch side of the comparison.
torch is an optional dependency: only import this module when torch is installed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

FREQUENCY_EMBEDDING_SIZE = 256
NORM_EPS = 1e-6
GRN_EPS = 1e-6
PUBLISHED_GUIDED_CHANNELS = 3
LEVEL_NAMES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2",
               "decoder_level_1")


def timestep_embedding(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE,
                       max_period: float = 10000.0) -> torch.Tensor:
  """Sinusoidal `[cos, sin]` features of t as given (DDPM indices or flow times)."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period)
                    * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = t[:, None].float() * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def layer_norm_channels_first(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
  """LayerNorm over the channel axis of NCHW, no affine (ConvNeXt's channels_first form)."""
  mean = x.mean(1, keepdim=True)
  var = (x - mean).pow(2).mean(1, keepdim=True)
  return (x - mean) * torch.rsqrt(var + eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  """adaLN modulation, condition broadcast over H and W."""
  return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class TimestepEmbedder(nn.Module):
  """Sinusoidal features -> Linear -> SiLU -> Linear (`mlp.0`, `mlp.2`)."""

  def __init__(self, hidden_size: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(),
                             nn.Linear(hidden_size, hidden_size))

  def forward(self, t):
    return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
  """Class table with a null row (CFG) when label dropout is on; drops labels in training."""

  def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob

  def forward(self, labels, train: bool, force_drop_ids=None):
    if force_drop_ids is not None:
      labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
    elif train and self.dropout_prob > 0:
      drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
      labels = torch.where(drop, self.num_classes, labels)
    return self.embedding_table(labels)


class GRN(nn.Module):
  """Global Response Normalisation (ConvNeXt-V2), NCHW, gamma/beta shaped (1, C, 1, 1)."""

  def __init__(self, dim: int):
    super().__init__()
    self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
    self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

  def forward(self, x):
    g = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True)
    n = g / (g.mean(dim=1, keepdim=True) + GRN_EPS)
    return self.gamma * (x * n) + self.beta + x


class ConvNeXtBlock(nn.Module):
  """dwconv7 -> LN + adaLN(shift, scale) -> pwconv1 -> GELU -> GRN -> pwconv2 -> gated residual."""

  def __init__(self, dim: int, mlp_ratio: float):
    super().__init__()
    hidden = int(dim * mlp_ratio)
    self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.pwconv1 = nn.Conv2d(dim, hidden, 1)
    self.grn = GRN(hidden)
    self.pwconv2 = nn.Conv2d(hidden, dim, 1)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

  def forward(self, x, c):
    shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
    h = modulate(layer_norm_channels_first(self.dwconv(x)), shift, scale)
    h = self.grn(F.gelu(self.pwconv1(h)))
    return x + gate[:, :, None, None] * self.pwconv2(h)


class _ConvShuffle(nn.Module):
  """3x3 conv (no bias) then a pixel (un)shuffle, as `conv.0`, `conv.1` (published keys)."""

  def __init__(self, dim_in: int, conv_out: int, shuffle: nn.Module):
    super().__init__()
    self.conv = nn.Sequential(nn.Conv2d(dim_in, conv_out, 3, padding=1, bias=False), shuffle)

  def forward(self, x):
    return self.conv(x)


class Downsample(_ConvShuffle):
  """3x3 conv a -> b/4, pixel-unshuffle x2."""

  def __init__(self, dim_in: int, dim_out: int):
    super().__init__(dim_in, dim_out // 4, nn.PixelUnshuffle(2))


class Upsample(_ConvShuffle):
  """3x3 conv a -> 4b, pixel-shuffle x2."""

  def __init__(self, dim_in: int, dim_out: int):
    super().__init__(dim_in, dim_out * 4, nn.PixelShuffle(2))


class FinalLayer(nn.Module):
  """LN (no affine) + adaLN(shift, scale) + 3x3 conv to the output channels."""

  def __init__(self, dim: int, out_channels: int):
    super().__init__()
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
    self.conv = nn.Conv2d(dim, out_channels, 3, padding=1)

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.conv(modulate(layer_norm_channels_first(x), shift, scale))


class FCDM(nn.Module):
  """The FCDM U-net with the published constructor, key names and NCHW layout.

  `checkpoint_blocks=True` recomputes every ConvNeXt block in the backward pass
  (the published training code does this); it does not change the numbers.
  """

  def __init__(self, in_channels: int = 4, hidden_size: int = 128,
               depth: Sequence[int] = (2, 4, 8, 4, 2), mlp_ratio: float = 3.0,
               class_dropout_prob: float = 0.1, num_classes: int = 1000,
               learn_sigma: bool = True, checkpoint_blocks: bool = False):
    super().__init__()
    if len(depth) != 5:
      raise ValueError(f"depth must list 5 stage depths [e1, e2, mid, d2, d1], got {depth}")
    self.in_channels = in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.num_classes = num_classes
    self.class_dropout_prob = class_dropout_prob
    self.checkpoint_blocks = checkpoint_blocks
    c1, c2, c3 = hidden_size, 2 * hidden_size, 4 * hidden_size
    # Registration order fixes the state_dict order (the published one).
    for k, width in enumerate((c1, c2, c3), start=1):
      setattr(self, f"t_embedder_{k}", TimestepEmbedder(width))
      setattr(self, f"y_embedder_{k}", LabelEmbedder(num_classes, width, class_dropout_prob))
    self.x_embedder = nn.Conv2d(in_channels, c1, 3, padding=1)
    blocks = lambda n, dim: nn.ModuleList(ConvNeXtBlock(dim, mlp_ratio) for _ in range(n))
    self.encoder_level_1 = blocks(depth[0], c1)
    self.down1_2 = Downsample(c1, c2)
    self.encoder_level_2 = blocks(depth[1], c2)
    self.down2_3 = Downsample(c2, c3)
    self.latent = blocks(depth[2], c3)
    self.up3_2 = Upsample(c3, c2)
    self.reduce_chans_2 = nn.Conv2d(2 * c2, c2, 1)
    self.decoder_level_2 = blocks(depth[3], c2)
    self.up2_1 = Upsample(c2, c1)
    self.reduce_chans_1 = nn.Conv2d(2 * c1, c1, 1)
    self.decoder_level_1 = blocks(depth[4], c1)
    self.output_layer = nn.Conv2d(c1, c1, 3, padding=1)
    self.final_layer = FinalLayer(c1, self.out_channels)
    self.initialize_weights()

  def initialize_weights(self):
    """The published initialisation."""
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
    w = self.x_embedder.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for k in (1, 2, 3):
      nn.init.normal_(getattr(self, f"y_embedder_{k}").embedding_table.weight, std=0.02)
      mlp = getattr(self, f"t_embedder_{k}").mlp
      nn.init.normal_(mlp[0].weight, std=0.02)
      nn.init.normal_(mlp[2].weight, std=0.02)
    for m in self.modules():
      if isinstance(m, ConvNeXtBlock):
        nn.init.zeros_(m.adaLN_modulation[1].weight)
        nn.init.zeros_(m.adaLN_modulation[1].bias)
    for p in (self.final_layer.adaLN_modulation[1].weight, self.final_layer.adaLN_modulation[1].bias,
              self.final_layer.conv.weight, self.final_layer.conv.bias):
      nn.init.zeros_(p)

  def _stage(self, blocks: nn.ModuleList, x, c):
    for block in blocks:
      if self.checkpoint_blocks and torch.is_grad_enabled():
        x = checkpoint(block, x, c, use_reentrant=False)
      else:
        x = block(x, c)
    return x

  def forward(self, x, t, y, force_drop_ids=None):
    """x (N, in_channels, H, W), t (N,) float timesteps, y (N,) labels -> (N, out_channels, H, W)."""
    conds = [getattr(self, f"t_embedder_{k}")(t)
             + getattr(self, f"y_embedder_{k}")(y, self.training, force_drop_ids)
             for k in (1, 2, 3)]
    h = self.x_embedder(x)
    skip1 = self._stage(self.encoder_level_1, h, conds[0])
    skip2 = self._stage(self.encoder_level_2, self.down1_2(skip1), conds[1])
    h = self._stage(self.latent, self.down2_3(skip2), conds[2])
    h = self.reduce_chans_2(torch.cat([self.up3_2(h), skip2], dim=1))
    h = self._stage(self.decoder_level_2, h, conds[1])
    h = self.reduce_chans_1(torch.cat([self.up2_1(h), skip1], dim=1))
    h = self._stage(self.decoder_level_1, h, conds[0])
    return self.final_layer(self.output_layer(h), conds[0])

  def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_eps: bool = False):
    """Published guided forward: batch [cond; null], both halves run on the first half's x;
    `u + s (c - u)` on the first 3 output channels (or every eps channel), given to both halves."""
    half = x[: len(x) // 2]
    out = self.forward(torch.cat([half, half], dim=0), t, y)
    n = self.in_channels if guide_all_eps else PUBLISHED_GUIDED_CHANNELS
    eps, rest = out[:, :n], out[:, n:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    mixed = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([mixed, mixed], dim=0), rest], dim=1)


def from_config(model_config, checkpoint_blocks: bool = False, device=None) -> FCDM:
  """The PyTorch FCDM for a config's `model` section (its published fields only)."""
  fields = ("in_channels", "hidden_size", "depth", "mlp_ratio", "class_dropout_prob",
            "num_classes", "learn_sigma")
  kwargs = {k: model_config[k] for k in fields}
  kwargs["depth"] = tuple(kwargs["depth"])
  if device is None:
    return FCDM(**kwargs, checkpoint_blocks=checkpoint_blocks)
  with torch.device(device):
    return FCDM(**kwargs, checkpoint_blocks=checkpoint_blocks)
