"""The CLIP text encoder (OpenAI CLIP's text tower) in Flax, loaded from a local Hugging Face
folder, for conditioning FCDM on captions.

Why our own: transformers no longer ships Flax models, and the encoder is small and fixed.
It computes what transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` compute:
token + position embeddings, pre-LayerNorm residual blocks with causal self-attention and a
QuickGELU (or GELU) MLP, a final LayerNorm, the pooled state at the end-of-text token, and
the optional bias-free `text_projection`. Parameter names mirror the PyTorch state_dict
(`encoder.layers.3.mlp.fc1.weight` is `encoder/layers_3/mlp/fc1/kernel`), so loading is a
walk plus transposes. Nothing is downloaded:

    model, params = load_clip_text("/path/to/clip-vit-large-patch14")
    ids = load_clip_tokenizer("/path/to/clip-vit-large-patch14")(["a photo of a cat"])
    out = model.apply(params, ids)   # out.pooled (N, 768); out.text_embeds (N, 768) projected

The folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`) of a `CLIPTextModel`, a `CLIPTextModelWithProjection` or a whole
`CLIPModel` (its `text_model.*` and `text_projection` are taken), or is a diffusers pipeline
whose `text_encoder/` holds them. Matmuls use XLA's default precision (see `vae.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from safetensors.numpy import save as safetensors_bytes

from fcdm_jax import fileio
from fcdm_jax.models import torch_weights

Dtype = Any

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
PIPELINE_SUBFOLDER = "text_encoder"
PREFIX = "text_model."
PROJECTION_KEY = "text_projection.weight"
# A buffer that older transformers versions saved with the weights; not a parameter.
POSITION_IDS_KEY = "embeddings.position_ids"
# Configs written before transformers PR #24773 say eos_token_id=2; transformers then pools
# at the largest id of each row (OpenAI's rule: end-of-text is the last id of the vocab).
LEGACY_EOS_TOKEN_ID = 2

HIDDEN_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
}

# transformers' CLIPTextConfig defaults: what it builds when config.json leaves a field out.
HF_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                   num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                   hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
HF_DEFAULT_PROJECTION_DIM = 512


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields that shape the network; the defaults are CLIP ViT-L/14's text tower.
  `projection_dim=None` builds no `text_projection` (a `CLIPTextModel`)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int | None = 768

  def __post_init__(self):
    check_tower_config(self, "CLIP text config", ("vocab_size", "hidden_size",
                       "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "max_position_embeddings"))
    if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
      raise ValueError(f"CLIP text config: pooling needs one integer eos_token_id, got "
                       f"{self.eos_token_id!r}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], with_projection: bool = True) -> "CLIPTextConfig":
    """From a transformers config.json: a `CLIPTextConfig` one, or a `CLIPModel` one (its
    `text_config`, with the top-level `projection_dim`). Missing fields take transformers'
    defaults, as transformers would."""
    kw, projection = tower_fields(d, "text", HF_DEFAULTS)
    eos = kw["eos_token_id"]
    if isinstance(eos, list) and len(eos) == 1:
      kw["eos_token_id"] = eos[0]
    return cls(**kw, projection_dim=projection if with_projection else None)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_tower_config(config, what: str, sizes: tuple[str, ...], hint: str = "") -> None:
  """The checks both towers' configs make: `sizes` (and a projection_dim) positive
  integers, heads that divide the width, a supported activation."""
  bad = {k: getattr(config, k) for k in sizes if not positive_int(getattr(config, k))}
  if config.projection_dim is not None and not positive_int(config.projection_dim):
    bad["projection_dim"] = config.projection_dim
  if bad:
    raise ValueError(f"{what}: {bad} must be positive integers{hint}")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"{what}: hidden_size {config.hidden_size} is not divisible by "
                     f"num_attention_heads {config.num_attention_heads}")
  if config.hidden_act not in HIDDEN_ACTS:
    raise ValueError(f"{what}: hidden_act {config.hidden_act!r} is not supported; expected "
                     f"one of {sorted(HIDDEN_ACTS)}")


def tower_fields(d: Mapping[str, Any], tower: str, defaults: Mapping[str, Any]
                 ) -> tuple[dict, int]:
  """(the fields of `defaults`, projection_dim) of tower 'text' or 'vision' from a
  transformers config.json: a plain tower's (model_type 'clip_<tower>_model') or a
  CLIPModel's (its `<tower>_config`, with the top-level projection_dim, which is what
  CLIPModel builds). Missing fields take transformers' defaults, as transformers would."""
  section, model_type = f"{tower}_config", f"clip_{tower}_model"
  if section in d:
    fields = d[section] or {}
  else:
    found = d.get("model_type", model_type)
    if found != model_type:
      raise ValueError(f"config is for a {found!r} model, not a CLIP {tower} model "
                       f"({model_type!r}) or a CLIPModel ('clip' with a {section})")
    fields = d
  return ({k: fields.get(k, default) for k, default in defaults.items()},
          d.get("projection_dim", HF_DEFAULT_PROJECTION_DIM))


class CLIPTextOutput(NamedTuple):
  """`last_hidden_state` (N, L, width) after the final LayerNorm; `pooled` (N, width), its
  row at the end-of-text token; `text_embeds` (N, projection_dim), `pooled` projected, or
  None for a model without `text_projection`."""
  last_hidden_state: jax.Array
  pooled: jax.Array
  text_embeds: jax.Array | None


def pool_positions(input_ids, eos_token_id: int):
  """Where transformers pools each row: the largest id (legacy configs, eos_token_id == 2),
  else the first position holding eos_token_id (0 when a row has none)."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


def layer_norm(config, dtype: Dtype, name: str) -> nn.LayerNorm:
  """transformers' LayerNorm of either tower (its epsilon; the exact two-pass variance)."""
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False,
                      name=name)


class TowerModule(nn.Module):
  """A module of a CLIP tower: the tower's config and the compute dtype."""
  config: Any
  dtype: Dtype = jnp.float32


class Embeddings(TowerModule):
  """Token plus position embeddings."""

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.config
    tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                      name="token_embedding")(input_ids)
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class SelfAttention(TowerModule):
  """Multi-head attention over the keys that `keep` (N or 1, 1, L, L) allows.

  Masked scores are set to float32's lowest value rather than having it added, so that a
  row with no visible key gets uniform weights instead of NaN."""

  @nn.compact
  def __call__(self, x, keep):
    cfg = self.config
    n, length, width = x.shape
    proj = lambda name: nn.Dense(width, dtype=self.dtype, name=name)
    heads = lambda h: h.reshape(n, length, cfg.num_attention_heads, cfg.head_dim)
    q, k, v = heads(proj("q_proj")(x)), heads(proj("k_proj")(x)), heads(proj("v_proj")(x))
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) * cfg.head_dim ** -0.5
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, width)
    return proj("out_proj")(out)


class MLP(TowerModule):
  """fc1, the activation, fc2."""

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = HIDDEN_ACTS[cfg.hidden_act](h)
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class EncoderLayer(TowerModule):
  """x + attn(LN1(x)), then + mlp(LN2(.)): the pre-LN residual block."""

  @nn.compact
  def __call__(self, x, keep):
    cfg, d = self.config, self.dtype
    x = x + SelfAttention(cfg, d, name="self_attn")(layer_norm(cfg, d, "layer_norm1")(x), keep)
    return x + MLP(cfg, d, name="mlp")(layer_norm(cfg, d, "layer_norm2")(x))


class Encoder(TowerModule):
  """The residual blocks, in order."""

  @nn.compact
  def __call__(self, x, keep):
    for i in range(self.config.num_hidden_layers):
      x = EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, keep)
    return x


class CLIPTextModel(nn.Module):
  """`apply(params, input_ids, attention_mask=None)` -> CLIPTextOutput.

  input_ids (N, L) integers with L <= max_position_embeddings (the tokenizer pads to 77);
  attention_mask (N, L), 1 for tokens and 0 for padding, masks keys on top of the causal
  mask, as transformers does (the usual call, Stable Diffusion's included, passes none).
  """
  config: CLIPTextConfig = CLIPTextConfig()
  dtype: Dtype = jnp.float32

  def check_inputs(self, input_ids, attention_mask):
    cfg = self.config
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be (batch, length) integers, got {input_ids.dtype} "
                       f"of shape {input_ids.shape}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"input_ids have {input_ids.shape[1]} positions but the model has "
                       f"{cfg.max_position_embeddings} (max_position_embeddings)")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids "
                       f"{input_ids.shape}; they must match")
    if not isinstance(input_ids, jax.core.Tracer):
      ids = np.asarray(input_ids).ravel()
      bad = ids[(ids < 0) | (ids >= cfg.vocab_size)].tolist()
      if bad:
        raise ValueError(f"token ids {bad[:8]} out of range [0, {cfg.vocab_size - 1}] "
                         f"(vocab_size={cfg.vocab_size}): ids from another tokenizer?")

  @nn.compact
  def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
    input_ids = jnp.asarray(input_ids)
    self.check_inputs(input_ids, attention_mask)
    cfg, d = self.config, self.dtype
    length = input_ids.shape[1]
    keep = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      keep = keep & (jnp.asarray(attention_mask) != 0)[:, None, None, :]

    h = Embeddings(cfg, d, name="embeddings")(input_ids)
    h = Encoder(cfg, d, name="encoder")(h, keep)
    h = layer_norm(cfg, d, "final_layer_norm")(h)
    rows = jnp.arange(h.shape[0])
    pooled = h[rows, pool_positions(input_ids, cfg.eos_token_id)]
    embeds = None
    if cfg.projection_dim is not None:
      embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=d,
                        name="text_projection")(pooled).astype(jnp.float32)
    return CLIPTextOutput(h.astype(jnp.float32), pooled.astype(jnp.float32), embeds)


# ----------------------------------------------------------------------------- weights


Layout = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


def add_linear(layout: Layout, key: str, path: tuple[str, ...], out_features: int,
               in_features: int, bias: bool = True) -> None:
  layout[f"{key}.weight"] = (path + ("kernel",), (out_features, in_features))
  if bias:
    layout[f"{key}.bias"] = (path + ("bias",), (out_features,))


def add_norm(layout: Layout, key: str, path: tuple[str, ...], width: int) -> None:
  layout[f"{key}.weight"] = (path + ("scale",), (width,))
  layout[f"{key}.bias"] = (path + ("bias",), (width,))


def add_encoder_layers(layout: Layout, config) -> None:
  """The residual blocks, the same in both CLIP towers (`encoder.layers.{i}.*`)."""
  w, f = config.hidden_size, config.intermediate_size
  for i in range(config.num_hidden_layers):
    key, path = f"encoder.layers.{i}", ("encoder", f"layers_{i}")
    add_norm(layout, f"{key}.layer_norm1", path + ("layer_norm1",), w)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      add_linear(layout, f"{key}.self_attn.{proj}", path + ("self_attn", proj), w, w)
    add_norm(layout, f"{key}.layer_norm2", path + ("layer_norm2",), w)
    add_linear(layout, f"{key}.mlp.fc1", path + ("mlp", "fc1"), f, w)
    add_linear(layout, f"{key}.mlp.fc2", path + ("mlp", "fc2"), w, f)


def torch_layout(config: CLIPTextConfig) -> Layout:
  """PyTorch key (without the `text_model.` prefix) -> (Flax param path, PyTorch shape)."""
  w = config.hidden_size
  layout: Layout = {}
  for table, rows in (("token_embedding", config.vocab_size),
                      ("position_embedding", config.max_position_embeddings)):
    layout[f"embeddings.{table}.weight"] = (("embeddings", table, "embedding"), (rows, w))
  add_encoder_layers(layout, config)
  add_norm(layout, "final_layer_norm", ("final_layer_norm",), w)
  if config.projection_dim is not None:
    add_linear(layout, "text_projection", ("text_projection",), config.projection_dim, w,
               bias=False)
  return layout


@dataclasses.dataclass(frozen=True)
class Tower:
  """One CLIP tower as transformers saves it: what `load_tower` needs to find and read it."""
  name: str                      # 'text' / 'vision': config.json's `<name>_config` section
  config_class: type             # with from_dict(raw, with_projection)
  model_class: type              # Flax module built as model_class(config, dtype=...)
  layout: Callable[[Any], Layout]
  prefix: str                    # the state_dict's key prefix ('text_model.')
  projection_key: str            # the projection's weight ('text_projection.weight')
  pipeline_subfolder: str        # where a diffusers pipeline keeps it ('text_encoder')
  shape_fields: tuple[str, ...]  # the config fields a weight mismatch message names


def tower_state_dict(state_dict: Mapping[str, Any], tower: Tower,
                     whole_clip: bool = False) -> dict[str, Any]:
  """One tower's weights under its `torch_layout` keys: the prefix dropped (the transformers
  v4 and CLIPModel layout; v5 saves a plain tower without it), the saved `position_ids`
  buffer dropped, and of a whole CLIPModel only this tower's keys and projection."""
  out = {}
  for key, value in state_dict.items():
    if whole_clip and not (key.startswith(tower.prefix) or key == tower.projection_key):
      continue
    key = key[len(tower.prefix):] if key.startswith(tower.prefix) else key
    if key != POSITION_IDS_KEY:
      out[key] = value
  return out


def tower_params(tower: Tower, state_dict: Mapping[str, Any], config,
                 source: str = "state_dict") -> dict:
  """`tower_state_dict` output -> Flax {'params': ...}; one ValueError naming every missing,
  unexpected and misshapen key when the weights do not fit `config`."""
  shape = ", ".join(f"{k}={getattr(config, k)}" for k in tower.shape_fields)
  return torch_weights.params_from_layout(
      state_dict, tower.layout(config),
      f"{source} does not hold CLIP {tower.name} encoder weights for this config ({shape})")


def find_tower_files(tower: Tower, path: str) -> tuple[str, str]:
  """(config.json, weights file) of a transformers CLIP folder (or a diffusers pipeline's
  subfolder of the tower)."""
  return torch_weights.find_model_files(path, f"CLIP {tower.name} encoder", CONFIG_NAME,
                                        WEIGHT_NAMES, tower.pipeline_subfolder)


def load_tower(tower: Tower, path: str, dtype: Dtype = jnp.float32) -> tuple[nn.Module, dict]:
  """(model, params) of a tower from a local transformers CLIP folder (no download). The
  model has its projection when the weights hold one or config.json names a model with it
  (a plain tower's config.json may carry a projection_dim it does not use)."""
  config_path, weights_path = find_tower_files(tower, path)
  raw = torch_weights.read_config(config_path)
  whole_clip = f"{tower.name}_config" in raw
  weights = tower_state_dict(torch_weights.read_torch_file(weights_path), tower, whole_clip)
  with_projection = (whole_clip or tower.projection_key in weights
                     or any(a.endswith("WithProjection") for a in raw.get("architectures") or []))
  try:
    config = tower.config_class.from_dict(raw, with_projection)
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from e
  return (tower.model_class(config, dtype=dtype),
          tower_params(tower, weights, config, source=weights_path))


TEXT = Tower("text", CLIPTextConfig, CLIPTextModel, torch_layout, PREFIX, PROJECTION_KEY,
             PIPELINE_SUBFOLDER, ("hidden_size", "num_hidden_layers", "vocab_size",
                                  "projection_dim"))


def find_clip_text_files(path: str) -> tuple[str, str]:
  """(config.json, weights file) of a transformers CLIP folder (or a pipeline's `text_encoder/`)."""
  return find_tower_files(TEXT, path)


def load_clip_text(path: str, dtype: Dtype = jnp.float32) -> tuple[CLIPTextModel, dict]:
  """(model, params) from a local transformers CLIP folder (no download). The model has a
  `text_projection` when the weights hold one or config.json names a model with it."""
  return load_tower(TEXT, path, dtype)


def save_clip_text(path: str, config: CLIPTextConfig, params, *, pad_token_id: int,
                   bos_token_id: int) -> None:
  """Writes `params` as a transformers folder (`config.json` + `model.safetensors`) that
  `load_clip_text` and transformers' `CLIPTextModel(WithProjection)` both read: how a text
  encoder trained here (the colour-digit demo) is shared like a published one."""
  layout = torch_layout(config)
  tree = params["params"] if "params" in params else params
  weights = {}
  for key, (names, _) in layout.items():
    node = tree
    for n in names:
      node = node[n]
    a = np.asarray(node, np.float32)
    weights[key] = np.ascontiguousarray(a.T if names[-1] == "kernel" else a)
  with_projection = config.projection_dim is not None
  fields = {k: getattr(config, k) for k in HF_DEFAULTS}
  hf = dict(fields, model_type="clip_text_model", pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            architectures=["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"])
  if with_projection:
    hf["projection_dim"] = config.projection_dim
  fileio.makedirs(path)
  fileio.atomic_write_bytes(fileio.join(path, WEIGHT_NAMES[0]), safetensors_bytes(weights))
  fileio.atomic_write_bytes(fileio.join(path, CONFIG_NAME), json.dumps(hf, indent=1).encode())
