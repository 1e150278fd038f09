"""The JAX side of the benchmark (also what `fcdm_jax.preflight` compiles for a TPU)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fcdm_jax.bench.measure import lowered_flops


class JaxBench:
  """Builds, compiles and steps the JAX training step and sampling forward.

  Programs are lowered against abstract inputs (shapes, dtypes, shardings), so the same
  object compiles for devices this process cannot run on (`fcdm_jax.preflight` hands it
  abstract TPU devices); host arrays are made only when a step is run. `cfg_scale` != 1
  makes the sampling forward the guided one (the batch [x; x] with [labels; null]).
  """

  def __init__(self, config, batch: int, devices, log, cfg_scale: float = 1.0):
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from fcdm_jax.diffusion.objectives import make_objective
    from fcdm_jax.models import FCDM
    from fcdm_jax import sharding
    from fcdm_jax.train.state import make_optimizer

    self.jax, self.jnp, self.nn = jax, jnp, nn
    self.config, self.batch, self.log = config, batch, log
    self.cfg_scale = float(cfg_scale)
    self.model = FCDM(**config.model)
    self.objective = make_objective(config)
    self.tx = make_optimizer(config)
    self.mesh = sharding.create_mesh(config, devices)
    dp = sharding.data_parallel_size(self.mesh)
    if batch % dp:
      raise ValueError(f"batch {batch} is not divisible by the {dp} data-parallel devices")
    self.input_shape = (config.latent_size, config.latent_size, config.model.in_channels)
    bs = sharding.batch_sharding(self.mesh)
    self.abstract_batch = dict(
        x=jax.ShapeDtypeStruct((batch,) + self.input_shape, jnp.float32, sharding=bs),
        y=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs))
    if config.data.source == "latents":   # the step samples the posterior on the device
      self.abstract_batch["x_std"] = self.abstract_batch["x"]
    self.abstract_t = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=bs)
    self.batch_arrays = self.t = None
    self.state = None
    self.params = None
    self._rng = np.random.default_rng(0)
    self._shardings = None

  def _host_inputs(self) -> None:
    """The batch and timesteps as global arrays with random values (for timed steps)."""
    from fcdm_jax import sharding
    if self.batch_arrays is not None:
      return
    rng = np.random.default_rng(0)
    local = dict(x=rng.standard_normal((self.batch,) + self.input_shape).astype(np.float32),
                 y=rng.integers(0, self.config.model.num_classes, self.batch).astype(np.int32))
    if "x_std" in self.abstract_batch:
      local["x_std"] = np.full_like(local["x"], 0.1)
    self.batch_arrays = sharding.global_batch(local, self.mesh)
    self.t = sharding.global_batch(
        {"t": rng.uniform(0, 999, self.batch).astype(np.float32)}, self.mesh)["t"]

  def layout(self):
    """(abstract train state with shardings, its shardings tree), computed once."""
    from fcdm_jax.train.state import state_layout
    if self._shardings is None:
      self.abstract_state, self._shardings = state_layout(self.config, self.model, self.tx,
                                                          self.mesh, self.input_shape)
    return self.abstract_state, self._shardings

  def host_filled(self, abstract):
    """Arrays of `abstract`'s shapes, dtypes and shardings with small random values."""
    def fill(a):
      if np.issubdtype(a.dtype, np.floating):
        v = (0.02 * self._rng.standard_normal(a.shape)).astype(a.dtype)
      else:
        v = np.zeros(a.shape, a.dtype)
      return self.jax.device_put(v, a.sharding) if a.sharding is not None else self.jnp.asarray(v)
    return self.jax.tree.map(fill, abstract)

  # -- training step
  def lower_train(self, unroll: bool = False):
    """The training step lowered (not compiled); `unroll` lowers the block scans unrolled."""
    from fcdm_jax.train.step import jit_train_step, make_train_step
    abstract, shardings = self.layout()
    model = self.model.clone(scan_unroll=True) if unroll else self.model
    step = jit_train_step(make_train_step(self.config, model, self.objective, self.tx),
                          self.mesh, shardings, self.config)
    return step.lower(abstract, self.abstract_batch)

  def compile_train(self, compile_only: bool) -> dict[str, Any]:
    abstract, _ = self.layout()
    if not compile_only:
      self.state = self.host_filled(abstract)
      self._host_inputs()
    t0 = time.perf_counter()
    lowered = self.lower_train()
    lower_s = time.perf_counter() - t0
    self.train_compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    return dict(compile_s=compile_s, lower_s=lower_s)

  def train_step(self) -> None:
    self.state, metrics = self.train_compiled(self.state, self.batch_arrays)
    self.jax.block_until_ready((self.state, metrics))

  def train_xla_flops(self) -> float | None:
    return lowered_flops(self.lower_train(unroll=True))

  # -- sampling forward
  def lower_sample(self, unroll: bool = False):
    """The sampling forward (guided when `cfg_scale` != 1) lowered on the EMA params'
    layout; `unroll` lowers the block scans unrolled."""
    from fcdm_jax.diffusion.guidance import guided_model
    from fcdm_jax.sharding import batch_sharding
    from fcdm_jax.sharding import sharding_context
    abstract, shardings = self.layout()
    model = self.model.clone(scan_unroll=True) if unroll else self.model
    null_label = model.num_classes if model.has_null_class else None

    def forward(p, x, t, y):
      model_fn = lambda x, t, y: model.apply({"params": p}, x, t, y)
      return guided_model(model_fn, y, cfg_scale=self.cfg_scale, null_label=null_label)(x, t)

    bs = batch_sharding(self.mesh)
    fn = self.jax.jit(forward, in_shardings=(shardings.ema_params, bs, bs, bs),
                      out_shardings=bs)
    b = self.abstract_batch
    with sharding_context(self.mesh, self.config):
      return fn.lower(abstract.ema_params, b["x"], self.abstract_t, b["y"])

  def compile_sample(self, compile_only: bool) -> dict[str, Any]:
    abstract, _ = self.layout()
    if not compile_only:
      self.params = self.host_filled(abstract.ema_params)
      self._host_inputs()
    t0 = time.perf_counter()
    lowered = self.lower_sample()
    lower_s = time.perf_counter() - t0
    self.sample_compiled = lowered.compile()
    return dict(compile_s=time.perf_counter() - t0, lower_s=lower_s)

  def sample_step(self) -> None:
    b = self.batch_arrays
    self.jax.block_until_ready(self.sample_compiled(self.params, b["x"], self.t, b["y"]))

  def sample_xla_flops(self) -> float | None:
    return lowered_flops(self.lower_sample(unroll=True))

  def forward_macs(self) -> float:
    from fcdm_jax.flops import fcdm_forward_macs
    return fcdm_forward_macs(self.model, self.config.latent_size, batch=1)
