"""The one generator: trained weights + a sampler config + conditions -> images (or latents).

Every use of a model's weights samples through `Generator`: the sampling CLI
(`fcdm_jax.sample`), training previews (`train/preview.py`) and in-training evaluation
(`fcdm_jax.evaluation`). One place builds the model call, the guidance null condition, the
global arrays, the gather across hosts and the keys, so a change to any of them (an FSDP
model, text prompts) is one edit.

Determinism. Sample i's starting noise and its sampler noise come from
`fold_in(fold_in(PRNGKey(seed), STREAM_NOISE), i)` and nothing else: the same (seed, i)
gives the same sample whatever the batch it is in, the device or host count, or how
often a run was resumed (up to floating-point differences between batch shapes). Each
sample is traced alone (`vmap` over the batch), which is what makes its randomness its own.

Conditions. A condition kind says how one sample's condition is given, what guidance
replaces it with (its null) and how a padded slot is filled. `ClassLabels` is the kind
of the class-conditional FCDM (the null class), `TextEmbeddings` that of a text-conditioned
one (pooled caption embeddings; the empty caption's embedding is the null).

Weights are arguments of every call, already placed in their shardings (replicated, or
FSDP-sharded as `checkpoint.load_ema_params` restores them); the batch is split
over the mesh's data-parallel axes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fcdm_jax import provenance
from fcdm_jax import sharding

# fold_in tags of PRNGKey(seed): independent streams of one sampling seed.
STREAM_NOISE = 0    # the samples' starting and sampler noise
STREAM_LABELS = 1   # random class labels (`fcdm_jax.sample --labels=random`)
LATENT_SOURCES = ("latents", "torch_features", "torch_zarr")


def to_uint8(images):
  """[-1, 1] -> uint8 as DiT's sample_ddp.py converts (clip(127.5 x + 128), truncated)."""
  xp = np if isinstance(images, np.ndarray) else jnp
  return xp.clip(127.5 * images + 128.0, 0, 255).astype(xp.uint8)


def stream_key(seed: int, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(int(seed)), stream)


def random_labels(seed: int, num_samples: int, num_classes: int) -> np.ndarray:
  """Uniform int32 class labels; label i depends on (seed, i) only."""
  base = stream_key(seed, STREAM_LABELS)
  draw = jax.jit(jax.vmap(lambda i: jax.random.randint(
      jax.random.fold_in(base, i), (), 0, num_classes)))
  return np.asarray(draw(jnp.arange(num_samples, dtype=jnp.uint32)), np.int32)


def is_latent(config) -> bool:
  """Whether the model samples SD-VAE latents (decoded by a VAE) rather than pixels."""
  return config.data.source in LATENT_SOURCES


@dataclasses.dataclass(frozen=True)
class ClassLabels:
  """Class conditioning: one int32 label per sample; guidance uses the null class."""
  num_classes: int
  null: int | None    # the extra embedding row of models trained with label dropout

  @classmethod
  def of(cls, model) -> "ClassLabels":
    return cls(int(model.num_classes), int(model.num_classes) if model.has_null_class else None)

  def check(self, values) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"class labels must be a 1-D integer array, got {values.dtype} "
                       f"{values.shape}")
    bad = values[(values < 0) | (values >= self.num_classes)]
    if bad.size:
      raise ValueError(f"labels {sorted(set(bad.tolist()))[:8]} are outside [0, "
                       f"{self.num_classes}) (the model's num_classes)")
    return values.astype(np.int32)

  def pad(self, values: np.ndarray, size: int) -> np.ndarray:
    """`values` filled up to `size` samples (the padding's samples are dropped)."""
    out = np.zeros((size,) + values.shape[1:], values.dtype)
    out[:len(values)] = values
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class TextEmbeddings:
  """Text conditioning: one pooled text embedding (text_dim,) per sample; guidance uses the
  empty caption's embedding `null` (what the model was trained with for dropped captions)."""
  dim: int
  null: np.ndarray

  @classmethod
  def of(cls, model, empty_embedding) -> "TextEmbeddings":
    null = np.asarray(empty_embedding, np.float32)
    if null.shape != (int(model.text_dim),):
      raise ValueError(f"the empty caption's embedding has shape {null.shape}; the model takes "
                       f"text_dim={model.text_dim}")
    return cls(int(model.text_dim), null)

  def check(self, values) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != self.dim or \
       not np.issubdtype(values.dtype, np.floating):
      raise ValueError(f"text conditions must be float embeddings of shape (N, {self.dim}), "
                       f"got {values.dtype} {values.shape}")
    if not np.all(np.isfinite(values)):
      raise ValueError("text embeddings have non-finite values")
    return values.astype(np.float32)

  def pad(self, values: np.ndarray, size: int) -> np.ndarray:
    out = np.broadcast_to(self.null, (size, self.dim)).copy()
    out[:len(values)] = values
    return out

  def key(self) -> str:
    return hashlib.sha256(self.null.tobytes()).hexdigest()


def condition_of(model, empty_embedding=None):
  """The condition kind of `model` (FCDM): class labels, or text embeddings whose null is
  `empty_embedding` (required for condition='text')."""
  if model.condition == "text":
    if empty_embedding is None:
      raise ValueError("a text-conditioned model samples with the empty caption's embedding "
                       "as its guidance null: pass empty_embedding (the run's captions hold it)")
    return TextEmbeddings.of(model, empty_embedding)
  return ClassLabels.of(model)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """An SD-VAE that turns latents / `scale` into images in [-1, 1]; params placed already."""
  model: Any
  scale: float
  params: Any

  def key(self):
    return [dataclasses.asdict(self.model.config), str(self.model.dtype), self.scale]


def load_decoder(vae_dir: str, config, mesh: Mesh) -> Decoder:
  """The SD-VAE in `vae_dir`, replicated on `mesh`, checked against the model's latents."""
  from fcdm_jax.models import vae as vae_lib
  model, params = vae_lib.load_vae(vae_dir)
  channels = int(config.model.in_channels)
  if model.config.latent_channels != channels:
    raise ValueError(f"the VAE in {vae_dir} has {model.config.latent_channels} latent "
                     f"channels, the model samples {channels}")
  if model.config.out_channels != 3:
    raise ValueError(f"the VAE in {vae_dir} decodes {model.config.out_channels}-channel "
                     "images, not RGB")
  return Decoder(model, float(config.data.vae_scale),
                 jax.device_put(params, sharding.replicated(mesh)))


# Compiled samplers of this process by everything they are traced with (not weights or
# seed, which are arguments): sampling several checkpoints of a run compiles once.
_COMPILED: dict[str, Any] = {}


class Generator:
  """(params, seed, sample indices, conditions) -> (uint8 images, samples before decoding).

  `config` is the run config (model, objective, latent size); `sample_cfg` the sampler's
  settings (a config.sample-like mapping). Invalid sampler settings raise here.
  """

  def __init__(self, config, sample_cfg, mesh: Mesh, decoder: Decoder | None = None,
               empty_embedding=None):
    from fcdm_jax.diffusion.objectives import make_objective
    from fcdm_jax.models import FCDM
    self.model = FCDM(**config.model)
    self.condition = condition_of(self.model, empty_embedding)
    size = int(config.latent_size)
    self.shape = (size, size, int(self.model.in_channels))
    self.mesh, self.decoder = mesh, decoder
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.parallel = sharding.data_parallel_size(mesh)
    sample_fn = make_objective(config).make_sampler(sample_cfg, self.condition.null)
    key = json.dumps([provenance.as_json(config.model), config.objective,
                      provenance.as_json(config.diffusion), provenance.as_json(config.flow),
                      provenance.as_json(sample_cfg), self.shape,
                      None if decoder is None else decoder.key(),
                      getattr(self.condition, "key", lambda: None)(),
                      [d.id for d in mesh.devices.flat], list(mesh.devices.shape)],
                     sort_keys=True, default=str)
    if key not in _COMPILED:
      _COMPILED[key] = self._build(sample_fn)
    self._images = _COMPILED[key]

  def _build(self, sample_fn):
    model, shape, decoder = self.model, self.shape, self.decoder

    def one(params, base, index, condition):
      """Sample `index` alone: its noise depends on nothing but (seed, index)."""
      key = jax.random.fold_in(base, index)
      x_T = jax.random.normal(jax.random.fold_in(key, 0), (1,) + shape, jnp.float32)
      model_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
      return sample_fn(model_fn, x_T, condition[None], jax.random.fold_in(key, 1))[0]

    def images(params, decoder_params, base, indices, conditions):
      # No activation constraints inside the vmap, whatever context this is traced in: they
      # would name the per-sample batch of 1 and leave the vmapped batch axis unsharded
      # (every device sampling the whole batch). Its sharding comes from the inputs.
      with nn.logical_axis_rules(()):
        x = jax.vmap(one, in_axes=(None, None, 0, 0))(params, base, indices, conditions)
      out = x
      if decoder is not None:
        out = decoder.model.apply(decoder_params, x / decoder.scale,
                                  method=decoder.model.decode)
      return to_uint8(out), x

    # Weights keep the shardings they arrive with (replicated or FSDP).
    return jax.jit(images, out_shardings=self.batch_sharding)

  def lower(self, abstract_params, n: int):
    """The program that samples `n` samples, lowered on abstract weights (leaves with their
    shardings) without running it: what `fcdm_jax.preflight` compiles for a TPU slice."""
    size = self.padded_size(n)
    vector = lambda dtype, *rest: jax.ShapeDtypeStruct((size, *rest), dtype,
                                                       sharding=self.batch_sharding)
    key = jax.eval_shape(lambda: stream_key(0, STREAM_NOISE))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))
    decoder_params = None if self.decoder is None else self.decoder.params
    conditions = (vector(jnp.float32, self.condition.dim)
                  if isinstance(self.condition, TextEmbeddings) else vector(jnp.int32))
    return self._images.lower(abstract_params, decoder_params, key, vector(jnp.uint32),
                              conditions)

  def padded_size(self, n: int) -> int:
    """The batch `n` samples run as: a multiple of the data-parallel size."""
    return -(-int(n) // self.parallel) * self.parallel

  def _global(self, values: np.ndarray) -> jax.Array:
    """A batch-sharded array from a value every host holds in full."""
    return jax.make_array_from_callback(values.shape, self.batch_sharding,
                                        lambda idx: values[idx])

  def __call__(self, params, seed: int, indices, conditions):
    """Starts sampling (asynchronously); returns device arrays of `padded_size(n)` samples."""
    indices = np.asarray(indices, np.uint32)
    conditions = self.condition.check(conditions)
    if len(indices) != len(conditions):
      raise ValueError(f"{len(indices)} sample indices but {len(conditions)} conditions")
    size = self.padded_size(len(indices))
    padded = np.arange(size, dtype=np.uint32) + (indices[-1] + 1 if len(indices) else 0)
    padded[:len(indices)] = indices
    decoder_params = None if self.decoder is None else self.decoder.params
    return self._images(params, decoder_params, stream_key(seed, STREAM_NOISE),
                        self._global(padded), self._global(self.condition.pad(conditions, size)))

  def generate(self, params, seed: int, indices, conditions) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, samples before decoding) of exactly these samples, as numpy."""
    images, raw = self(params, seed, indices, conditions)
    n = len(indices)
    return fetch(images)[:n], fetch(raw)[:n]

  def batches(self, params, seed: int, conditions, batch: int, progress=None):
    """Yields (start, uint8 images, samples before decoding) of samples 0..n-1 for n
    conditions, `batch` at a time (the last one padded to the same compiled shape): for
    evaluations that keep features, not 30k images."""
    conditions = self.condition.check(conditions)
    batch = self.padded_size(min(int(batch), len(conditions)))
    for start in range(0, len(conditions), batch):
      chunk = conditions[start:start + batch]
      n = len(chunk)
      if n < batch:  # the last batch runs in the compiled shape
        chunk = self.condition.pad(chunk, batch)
      image, raw = self.generate(params, seed, np.arange(start, start + batch), chunk)
      if progress is not None:
        progress(start + n, len(conditions))
      yield start, image[:n], raw[:n]

  def generate_all(self, params, seed: int, conditions, batch: int, progress=None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Samples 0..n-1 for n conditions in batches of `batch` (each compiled once)."""
    parts = list(self.batches(params, seed, conditions, batch, progress))
    return (np.concatenate([image for _, image, _ in parts]),
            np.concatenate([raw for _, _, raw in parts]))


def fetch(result) -> np.ndarray:
  """A (batch-sharded) global array as numpy on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(result, tiled=True))
  return np.asarray(result)
