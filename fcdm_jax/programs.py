"""The programs a run compiles, built in one place for the benchmark and the preflights.

`Programs(config, batch, devices)` builds, over the run's mesh on `devices` (this process's,
or abstract TPU/GPU devices that only compile):
  train    the trainer's own step (`train.step.make_train_step` + `jit_train_step` on the
           layout of `train.state.state_layout`, the optimizer of `make_optimizer`) at the
           global `batch`;
  sample   one sampling forward on the EMA params, classifier-free guided when
           `cfg_scale` != 1 (`diffusion.guidance.guided_model`, the model's own null);
  preview  the training preview's sampler, its whole loop (`sampling.Generator.lower`).
Each is lowered against abstract inputs (shapes, dtypes, shardings), never run here. The
batch is what the run's source feeds the model: x of the source's element shape, y as the
model's condition takes it (`conditions.abstract_y`: int32 class labels or float text
embeddings), and the latent posterior's std 'x_std' where the source hands one over
(`data.source_spec`, which gives the element shape too). `random_batch` fills the same
shapes with host values the model accepts, for timed steps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax import conditions, sampling, sharding
from fcdm_jax.data import source_spec
from fcdm_jax.diffusion.guidance import guided_model
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.flops import fcdm_forward_macs
from fcdm_jax.models import FCDM
from fcdm_jax.train.state import make_optimizer, state_layout
from fcdm_jax.train.step import JittedTrainStep, jit_train_step, make_train_step


def host_filled(abstract, rng: np.random.Generator):
  """Arrays of `abstract`'s shapes, dtypes and shardings: small normal values for floats,
  zeros otherwise (a train state or parameters, without compiling their initialiser)."""
  def fill(a):
    if np.issubdtype(a.dtype, np.floating):
      v = (0.02 * rng.standard_normal(a.shape)).astype(a.dtype)
    else:
      v = np.zeros(a.shape, a.dtype)
    return jax.device_put(v, a.sharding) if a.sharding is not None else jnp.asarray(v)
  return jax.tree.map(fill, abstract)


class Programs:
  """The train step, sampling forward and preview sampler of `config` at global `batch`
  on the mesh of `config.mesh` over `devices` (default: this process's)."""

  def __init__(self, config, batch: int, devices=None, *, cfg_scale: float = 1.0):
    self.config, self.batch, self.cfg_scale = config, int(batch), float(cfg_scale)
    self.model = FCDM(**config.model)
    self.objective = make_objective(config)
    self.tx = make_optimizer(config)
    self.mesh = sharding.create_mesh(config, devices)
    dp = sharding.data_parallel_size(self.mesh)
    if self.batch < 1 or self.batch % dp:
      raise ValueError(f"batch {self.batch} must be positive and divisible by the {dp} "
                       "data-parallel devices")
    source = source_spec(config.data.source)
    self.input_shape = source.element_shape(config)
    # A text model's guidance null is the empty caption's embedding, which the run's
    # captions hold; its value does not change the programs, so zeros stand in for it.
    self.empty_embedding = np.zeros((int(self.model.text_dim),), np.float32)
    self.condition = conditions.condition_of(self.model, self.empty_embedding)
    bs = sharding.batch_sharding(self.mesh)
    x = jax.ShapeDtypeStruct((self.batch,) + self.input_shape, jnp.float32, sharding=bs)
    self.abstract_batch = dict(x=x, y=conditions.abstract_y(self.model, self.batch, bs))
    if source.posterior:   # the step samples the posterior on the device
      self.abstract_batch["x_std"] = x
    self.abstract_t = jax.ShapeDtypeStruct((self.batch,), jnp.float32, sharding=bs)
    self._layout = None

  def layout(self):
    """(abstract train state with shardings attached, its shardings tree), computed once."""
    if self._layout is None:
      self._layout = state_layout(self.config, self.model, self.tx, self.mesh,
                                  self.input_shape)
    return self._layout

  def _model(self, unroll: bool) -> FCDM:
    """The model, with its block scans unrolled when `unroll` (for XLA's FLOP counts, which
    count a loop body once)."""
    return self.model.clone(scan_unroll=True) if unroll else self.model

  # -- training step
  def train_step(self, unroll: bool = False) -> JittedTrainStep:
    """The training loop's step, jitted over the mesh with the state donated."""
    _, shardings = self.layout()
    step = make_train_step(self.config, self._model(unroll), self.objective, self.tx)
    return jit_train_step(step, self.mesh, shardings, self.config)

  def lower_train(self, unroll: bool = False):
    abstract, _ = self.layout()
    return self.train_step(unroll).lower(abstract, self.abstract_batch)

  # -- sampling forward
  def sample_forward(self, unroll: bool = False):
    """Jitted `(ema_params, x, t, y) -> model output`: one network evaluation of sampling,
    on the batch [x; x] with [y; null] when guided."""
    _, shardings = self.layout()
    model, null = self._model(unroll), self.condition.null

    def forward(params, x, t, y):
      model_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
      return guided_model(model_fn, y, cfg_scale=self.cfg_scale, null_label=null)(x, t)

    bs = sharding.batch_sharding(self.mesh)
    return jax.jit(forward, in_shardings=(shardings.ema_params, bs, bs, bs), out_shardings=bs)

  def lower_sample(self, unroll: bool = False):
    abstract, _ = self.layout()
    b = self.abstract_batch
    with sharding.sharding_context(self.mesh, self.config):
      return self.sample_forward(unroll).lower(abstract.ema_params, b["x"], self.abstract_t,
                                               b["y"])

  # -- preview sampler
  def preview_generator(self) -> sampling.Generator:
    """The generator of the training previews (config.preview's sampler)."""
    return sampling.Generator(self.config, sampling.sampler_settings(self.config, "preview"),
                              self.mesh, empty_embedding=self.empty_embedding)

  def preview_batch(self, generator: sampling.Generator) -> int:
    """The samples of one preview grid, padded as the generator runs them: per_class per
    row, a row per class shown (at most num_classes) or per caption shown."""
    rows = int(self.config.preview.num_classes_shown)
    if isinstance(self.condition, conditions.ClassLabels):
      rows = min(rows, self.condition.num_classes)
    return generator.padded_size(rows * int(self.config.preview.per_class))

  def lower_preview(self):
    """The preview's whole sampling loop, lowered as the training loop calls it."""
    abstract, _ = self.layout()
    generator = self.preview_generator()
    return generator.lower(abstract.ema_params, self.preview_batch(generator))

  # -- counts and inputs
  def forward_macs(self) -> float:
    """Multiply-adds of one forward per image (the paper's GFLOPs x 1e9)."""
    return fcdm_forward_macs(self.model, self.input_shape[0], batch=1)

  def random_batch(self, seed: int = 0) -> tuple[dict[str, jax.Array], jax.Array]:
    """(batch, timesteps) as global arrays of the abstract batch's shapes, this process's
    rows filled with values the model takes: normal x, x_std 0.1, y class labels in range
    (integer y) or normal embeddings (float y); t uniform in [0, 999)."""
    rng = np.random.default_rng(seed)
    local = self.batch // jax.process_count()
    out: dict[str, Any] = {}
    for name, a in self.abstract_batch.items():
      shape = (local,) + a.shape[1:]
      if name == "x_std":
        out[name] = np.full(shape, 0.1, np.float32)
      elif np.issubdtype(a.dtype, np.integer):
        out[name] = rng.integers(0, self.model.num_classes, shape).astype(a.dtype)
      else:
        out[name] = rng.standard_normal(shape).astype(a.dtype)
    out["t"] = rng.uniform(0, 999, local).astype(np.float32)
    arrays = sharding.global_batch(out, self.mesh)
    t = arrays.pop("t")
    return arrays, t
