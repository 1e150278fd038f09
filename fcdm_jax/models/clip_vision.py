"""The CLIP image encoder (OpenAI CLIP's vision tower) in Flax, loaded from a local Hugging
Face folder, for scoring text-to-image samples (`fcdm_jax.evaluation.clip_score`).

Why our own: transformers no longer ships Flax models, and the text tower is already ours
(`clip_text`, whose encoder blocks this reuses). It computes what transformers'
`CLIPVisionModel` / `CLIPVisionModelWithProjection` compute: a bias-free patch convolution,
the class embedding in front, position embeddings, `pre_layrnorm` (transformers' spelling),
pre-LayerNorm residual blocks with full (not causal) self-attention, `post_layernorm` on
the class token (the pooled output; the hidden states are left without it, as there), and
the optional bias-free `visual_projection`. Parameter names mirror the PyTorch state_dict
(`embeddings.patch_embedding.weight` is `embeddings/patch_embedding/kernel`). Nothing is
downloaded:

    model, params = load_clip_vision("/path/to/clip-vit-large-patch14")
    pixels = preprocess(images_uint8, model.config.image_size)   # (N, 224, 224, 3) float32
    out = model.apply(params, pixels)   # out.pooled (N, 1024); out.image_embeds (N, 768)

The folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`) of a `CLIPVisionModel`, a `CLIPVisionModelWithProjection` or a whole
`CLIPModel` (its `vision_model.*` and `visual_projection` are taken), or is a diffusers
pipeline whose `image_encoder/` holds them. Images are NHWC; only the configured
`image_size` is accepted (transformers' `interpolate_pos_encoding` is not built). Matmuls
use XLA's default precision (see `vae.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from PIL import Image

from fcdm_jax.models import clip_text, torch_weights

Dtype = Any

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
PIPELINE_SUBFOLDER = "image_encoder"   # diffusers' name for a CLIPVisionModelWithProjection
PREFIX = "vision_model."
PROJECTION_KEY = "visual_projection.weight"

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' CLIPVisionConfig defaults: what it builds when config.json leaves a field out.
HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                   hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields that shape the network; the defaults are CLIP ViT-L/14's vision tower.
  `projection_dim=None` builds no `visual_projection` (a `CLIPVisionModel`). The field
  names are those of `clip_text.CLIPTextConfig`, whose encoder blocks read them."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = 768

  def __post_init__(self):
    clip_text.check_tower_config(
        self, "CLIP vision config", ("hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "image_size", "patch_size",
                                     "num_channels"), " (square images and patches only)")
    if self.patch_size > self.image_size:
      raise ValueError(f"CLIP vision config: patch_size {self.patch_size} is larger than "
                       f"image_size {self.image_size}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], with_projection: bool = True) -> "CLIPVisionConfig":
    """From a transformers config.json: a `CLIPVisionConfig` one, or a `CLIPModel` one (its
    `vision_config`; `clip_text.tower_fields`)."""
    kw, projection = clip_text.tower_fields(d, "vision", HF_DEFAULTS)
    return cls(**kw, projection_dim=projection if with_projection else None)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


class CLIPVisionOutput(NamedTuple):
  """`last_hidden_state` (N, 1 + patches, width), the encoder's output (class token first,
  no final LayerNorm, as transformers returns it); `pooled` (N, width), the class token
  after `post_layernorm`; `image_embeds` (N, projection_dim), `pooled` projected, or None
  for a model without `visual_projection`."""
  last_hidden_state: jax.Array
  pooled: jax.Array
  image_embeds: jax.Array | None


class Embeddings(clip_text.TowerModule):
  """Patches (a stride-p convolution, no bias) in row-major order after the class token,
  plus one learned position embedding each."""

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.config
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, name="patch_embedding")(pixel_values)
    n = patches.shape[0]
    patches = patches.reshape(n, -1, cfg.hidden_size)
    class_token = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,))
    class_token = jnp.broadcast_to(class_token.astype(patches.dtype), (n, 1, cfg.hidden_size))
    tokens = jnp.concatenate([class_token, patches], axis=1)
    positions = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(cfg.num_patches + 1))
    return tokens + positions[None]


class CLIPVisionModel(nn.Module):
  """`apply(params, pixel_values)` -> CLIPVisionOutput.

  pixel_values (N, image_size, image_size, num_channels) float, NHWC, already normalised
  (`preprocess`); every token attends to every token.
  """
  config: CLIPVisionConfig = CLIPVisionConfig()
  dtype: Dtype = jnp.float32

  def check_inputs(self, pixel_values):
    cfg = self.config
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(f"pixel_values must be NHWC (batch, {', '.join(map(str, want))}) for "
                       f"this model, got shape {tuple(pixel_values.shape)} (resize and crop "
                       "with clip_vision.preprocess; NCHW arrays need a transpose)")
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
      raise ValueError(f"pixel_values must be floats normalised as CLIP expects, got "
                       f"{pixel_values.dtype} (uint8 images go through clip_vision.preprocess)")

  @nn.compact
  def __call__(self, pixel_values) -> CLIPVisionOutput:
    pixel_values = jnp.asarray(pixel_values)
    self.check_inputs(pixel_values)
    cfg, d = self.config, self.dtype
    h = Embeddings(cfg, d, name="embeddings")(pixel_values)
    h = clip_text.layer_norm(cfg, d, "pre_layrnorm")(h)
    keep = jnp.ones((1, 1, h.shape[1], h.shape[1]), bool)   # no mask: all tokens see all
    h = clip_text.Encoder(cfg, d, name="encoder")(h, keep)
    pooled = clip_text.layer_norm(cfg, d, "post_layernorm")(h[:, 0])
    embeds = None
    if cfg.projection_dim is not None:
      embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=d,
                        name="visual_projection")(pooled).astype(jnp.float32)
    return CLIPVisionOutput(h.astype(jnp.float32), pooled.astype(jnp.float32), embeds)


# ----------------------------------------------------------------------------- images


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """(height, width) with the shorter side `shortest_edge` and the longer one scaled and
  truncated, as transformers' `get_resize_output_image_size(default_to_square=False)`."""
  if height <= width:
    return shortest_edge, int(shortest_edge * width / height)
  return int(shortest_edge * height / width), shortest_edge


def preprocess(images: np.ndarray | Sequence[np.ndarray], image_size: int,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """uint8 images (N, H, W, 3), or a sequence of (H, W, 3) of any sizes -> float32 (N,
  image_size, image_size, 3) as CLIP expects: the shorter side resized to `image_size` with
  PIL's bicubic filter (as uint8), the centre crop, / 255, then (x - mean) / std.

  This is what transformers' PIL processor (`CLIPImageProcessorPil`) does, to float32
  rounding (1e-6). transformers 5's default `CLIPImageProcessor` resizes with torchvision's
  antialiased bicubic instead (a port of PIL's, also uint8 between its two passes): measured
  on smooth, textured (smooth + noise of std 12) and noise images from 64x64 to 1024x768
  resized to 224, at most 2 uint8 levels apart before normalising (a level is 1/(255 std)
  <= 0.015 after it), 0.002-0.07 levels on average. Pillow picks the order of its passes by
  the shapes, torchvision always resizes the width first; where Pillow starts with the
  height, the clipping between the passes differs where bicubic overshoots: 100x33 -> 96x32
  is 3 levels off on a textured image, 15-20 on noise (a few pixels; 0.3-0.4 on average).
  PIL and not `jax.image.resize`: jax's antialiased bicubic keeps unclipped floats between
  its passes and at the end, so it is about a level off on smooth images and up to 37 on
  noise, and on the CPU it was slower (23 vs 6 ms an image, 512 -> 224).
  """
  if isinstance(images, np.ndarray) and images.ndim != 4:
    raise ValueError(f"images must be uint8 (N, H, W, 3), got shape {images.shape}")
  if not clip_text.positive_int(image_size):
    raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"image {i}: expected uint8 (H, W, 3) RGB, got {image.dtype} of shape "
                       f"{image.shape}")
    height, width = resized_size(image.shape[0], image.shape[1], image_size)
    if (height, width) != image.shape[:2]:
      image = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
    top, left = (height - image_size) // 2, (width - image_size) // 2
    crop = image[top:top + image_size, left:left + image_size]
    out[i] = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (out - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ----------------------------------------------------------------------------- weights


def torch_layout(config: CLIPVisionConfig) -> clip_text.Layout:
  """PyTorch key (without the `vision_model.` prefix) -> (Flax param path, PyTorch shape)."""
  w, p = config.hidden_size, config.patch_size
  layout: clip_text.Layout = {}
  layout["embeddings.class_embedding"] = (("embeddings", "class_embedding"), (w,))
  layout["embeddings.patch_embedding.weight"] = (("embeddings", "patch_embedding", "kernel"),
                                                 (w, config.num_channels, p, p))
  layout["embeddings.position_embedding.weight"] = (
      ("embeddings", "position_embedding", "embedding"), (config.num_patches + 1, w))
  clip_text.add_norm(layout, "pre_layrnorm", ("pre_layrnorm",), w)
  clip_text.add_encoder_layers(layout, config)
  clip_text.add_norm(layout, "post_layernorm", ("post_layernorm",), w)
  if config.projection_dim is not None:
    clip_text.add_linear(layout, "visual_projection", ("visual_projection",),
                         config.projection_dim, w, bias=False)
  return layout


VISION = clip_text.Tower("vision", CLIPVisionConfig, CLIPVisionModel, torch_layout, PREFIX,
                         PROJECTION_KEY, PIPELINE_SUBFOLDER,
                         ("hidden_size", "num_hidden_layers", "image_size", "patch_size",
                          "projection_dim"))
read_config = torch_weights.read_config


def find_clip_vision_files(path: str) -> tuple[str, str]:
  """(config.json, weights file) of a transformers CLIP folder (or a pipeline's `image_encoder/`)."""
  return clip_text.find_tower_files(VISION, path)


def load_clip_vision(path: str, dtype: Dtype = jnp.float32) -> tuple[CLIPVisionModel, dict]:
  """(model, params) from a local transformers CLIP folder (no download). The model has a
  `visual_projection` when the weights hold one or config.json names a model with it (a
  plain CLIPVisionModel's config.json carries a projection_dim it does not use)."""
  return clip_text.load_tower(VISION, path, dtype)
