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

Conditions. The model's condition kind (`fcdm_jax.conditions`), bound to the model, checks
the given conditions, gives guidance its null and fills padded slots: class labels (the
null class) or pooled caption embeddings (the empty caption's embedding is the null).

Images. `image_decoder` is the one rule for what turns samples into images: a latent
model's SD-VAE, none for a pixel model (1 or 3 channels).

Cost. The program also returns each sample's network evaluations (`sampling.cost`): the
sampler's count from its time grid (`samplers.evaluations_per_image`, `grid_evaluations`),
or what adaptive dopri5 counted in its loop. `generate`, `generate_all` and `batches` leave
the record of the samples they made in `last_cost`.

Weights are arguments of every call, already placed in their shardings (replicated, or
FSDP-sharded as `checkpoint.load_ema_params` restores them); the batch is split
over the mesh's data-parallel axes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fcdm_jax import distributed, provenance, sharding
from fcdm_jax.conditions import condition_of
from fcdm_jax.data import source_spec
from fcdm_jax.diffusion import samplers
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.models import FCDM
from fcdm_jax.models import vae as vae_lib
from fcdm_jax.sampling import cost as cost_lib

# fold_in tags of PRNGKey(seed): independent streams of one sampling seed.
STREAM_NOISE = 0    # the samples' starting and sampler noise
STREAM_LABELS = 1   # random class labels (`fcdm_jax.sample --labels=random`)


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
  return source_spec(config.data.source).latent


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


def image_decoder(config, vae_dir: str | None, mesh: Mesh, purpose: str,
                  raw_ok: bool = False) -> Decoder | None:
  """What turns the model's samples into images: a latent model's SD-VAE from `vae_dir`,
  None for a pixel model, whose samples are images if it has 1 or 3 channels.

  `purpose` names where `vae_dir` comes from, for the errors ('--vae',
  'config.preview.vae_dir'). A latent model without `vae_dir` is an error unless `raw_ok`
  (a preview may show raw latents: None then), and so is a VAE for a pixel model.
  """
  source = config.data.source
  if is_latent(config):
    if vae_dir:
      return load_decoder(vae_dir, config, mesh)
    if raw_ok:
      return None
    raise ValueError(f"the model samples SD-VAE latents (config.data.source={source!r}): "
                     f"{purpose} must name the SD-VAE directory that decodes them")
  if vae_dir:
    raise ValueError(f"the model samples pixels (config.data.source={source!r}); {purpose} "
                     "is for latent models only")
  if not raw_ok and int(config.model.in_channels) not in (1, 3):
    raise ValueError(f"a pixel-space model with {config.model.in_channels} channels has no "
                     "images (1 or 3 channels expected)")
  return None


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
    self.model = FCDM(**config.model)
    self.condition = condition_of(self.model, empty_embedding)
    size = int(config.latent_size)
    self.shape = (size, size, int(self.model.in_channels))
    self.mesh, self.decoder = mesh, decoder
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.parallel = sharding.data_parallel_size(mesh)
    objective = make_objective(config)
    sample_fn = objective.make_sampler(sample_cfg, self.condition.null)
    # None: the sampler counts its evaluations as it runs (adaptive dopri5).
    self.grid_evaluations = samplers.evaluations_per_image(sample_cfg, objective)
    self.last_cost = None
    key = json.dumps([provenance.as_json(config.model), config.objective,
                      provenance.as_json(config.diffusion), provenance.as_json(config.flow),
                      provenance.as_json(sample_cfg), self.shape,
                      None if decoder is None else decoder.key(),
                      self.condition.key(),
                      [d.id for d in mesh.devices.flat], list(mesh.devices.shape)],
                     sort_keys=True, default=str)
    if key not in _COMPILED:   # one compile per program, whatever the number of Generators
      _COMPILED[key] = distributed.StartTogether(self._build(sample_fn), "sample")
    self._run = _COMPILED[key]
    self._images = self._run.jitted

  def _build(self, sample_fn):
    model, shape, decoder = self.model, self.shape, self.decoder
    grid_evaluations = self.grid_evaluations

    def one(params, base, index, condition):
      """Sample `index` alone: its noise depends on nothing but (seed, index). Returns it
      with its network evaluations."""
      key = jax.random.fold_in(base, index)
      x_T = jax.random.normal(jax.random.fold_in(key, 0), (1,) + shape, jnp.float32)
      model_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
      args = (model_fn, x_T, condition[None], jax.random.fold_in(key, 1))
      if grid_evaluations is None:
        x, evaluations = sample_fn(*args, return_evaluations=True)
        return x[0], evaluations[0]
      return sample_fn(*args)[0], jnp.float32(grid_evaluations)

    def images(params, decoder_params, base, indices, conditions):
      # No activation constraints inside the vmap, whatever context this is traced in: they
      # would name the per-sample batch of 1 and leave the vmapped batch axis unsharded
      # (every device sampling the whole batch). Its sharding comes from the inputs.
      with nn.logical_axis_rules(()):
        x, evaluations = jax.vmap(one, in_axes=(None, None, 0, 0))(params, base, indices,
                                                                    conditions)
      out = x
      if decoder is not None:
        out = decoder.model.apply(decoder_params, x / decoder.scale,
                                  method=decoder.model.decode)
      return to_uint8(out), x, evaluations

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
    return self._images.lower(abstract_params, decoder_params, key, vector(jnp.uint32),
                              self.condition.abstract(size, self.batch_sharding))

  def padded_size(self, n: int) -> int:
    """The batch `n` samples run as: a multiple of the data-parallel size."""
    return -(-int(n) // self.parallel) * self.parallel

  def _global(self, values: np.ndarray) -> jax.Array:
    """A batch-sharded array from a value every host holds in full."""
    return jax.make_array_from_callback(values.shape, self.batch_sharding,
                                        lambda idx: values[idx])

  def cost(self, evaluations) -> dict:
    """The cost record (`sampling.cost`) of samples with these per-sample evaluations."""
    return cost_lib.record(evaluations, measured=self.grid_evaluations is None)

  def planned_cost(self) -> dict | None:
    """The cost record known before sampling (a time grid's), or None (measured as it runs)."""
    if self.grid_evaluations is None:
      return None
    return cost_lib.grid_record(self.grid_evaluations)

  def __call__(self, params, seed: int, indices, conditions):
    """Starts sampling (asynchronously); returns device arrays (uint8 images, samples
    before decoding, network evaluations per sample) of `padded_size(n)` samples."""
    indices = np.asarray(indices, np.uint32)
    conditions = self.condition.check(conditions)
    if len(indices) != len(conditions):
      raise ValueError(f"{len(indices)} sample indices but {len(conditions)} conditions")
    size = self.padded_size(len(indices))
    padded = np.arange(size, dtype=np.uint32) + (indices[-1] + 1 if len(indices) else 0)
    padded[:len(indices)] = indices
    decoder_params = None if self.decoder is None else self.decoder.params
    return self._run(params, decoder_params, stream_key(seed, STREAM_NOISE),
                        self._global(padded), self._global(self.condition.pad(conditions, size)))

  def _generate(self, params, seed: int, indices, conditions):
    images, raw, evaluations = self(params, seed, indices, conditions)
    n = len(indices)
    return fetch(images)[:n], fetch(raw)[:n], fetch(evaluations)[:n]

  def generate(self, params, seed: int, indices, conditions) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, samples before decoding) of exactly these samples, as numpy; their
    cost in `last_cost`."""
    images, raw, evaluations = self._generate(params, seed, indices, conditions)
    self.last_cost = self.cost(evaluations)
    return images, raw

  def batches(self, params, seed: int, conditions, batch: int, progress=None):
    """Yields (start, uint8 images, samples before decoding) of samples 0..n-1 for n
    conditions, `batch` at a time (the last one padded to the same compiled shape): for
    evaluations that keep features, not 30k images. Once all are yielded, `last_cost` is
    the record of the n samples."""
    conditions = self.condition.check(conditions)
    batch = self.padded_size(min(int(batch), len(conditions)))
    spent = []
    for start in range(0, len(conditions), batch):
      chunk = conditions[start:start + batch]
      n = len(chunk)
      if n < batch:  # the last batch runs in the compiled shape
        chunk = self.condition.pad(chunk, batch)
      image, raw, evaluations = self._generate(params, seed, np.arange(start, start + batch),
                                               chunk)
      spent.append(evaluations[:n])
      if progress is not None:
        progress(start + n, len(conditions))
      yield start, image[:n], raw[:n]
    self.last_cost = self.cost(np.concatenate(spent))

  def generate_all(self, params, seed: int, conditions, batch: int, progress=None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Samples 0..n-1 for n conditions in batches of `batch` (each compiled once)."""
    parts = list(self.batches(params, seed, conditions, batch, progress))
    return (np.concatenate([image for _, image, _ in parts]),
            np.concatenate([raw for _, _, raw in parts]))


def fetch(result) -> np.ndarray:
  """A (batch-sharded) global array as numpy on every host."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(result, tiled=True))
  return np.asarray(result)
