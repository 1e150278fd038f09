"""The JAX side of the benchmark: the programs of `fcdm_jax.programs` compiled and stepped.

The state and parameters are filled with random values on the host in their layout and
shardings (compiling the random initialiser would only add minutes); the batch is
`Programs.random_batch`, in the shapes and value ranges the model takes.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from fcdm_jax.perf.measure import lowered_flops
from fcdm_jax.programs import Programs, host_filled


class JaxBench:
  """Compiles `programs`' training step and sampling forward, then runs them on demand."""

  def __init__(self, programs: Programs):
    self.programs = programs
    self.state = self.params = self.batch = self.t = None
    self.train_compiled = self.sample_compiled = None
    self._rng = np.random.default_rng(0)

  def _inputs(self) -> None:
    if self.batch is None:
      self.batch, self.t = self.programs.random_batch()

  def _compile(self, lower) -> tuple[Any, dict[str, float]]:
    t0 = time.perf_counter()
    lowered = lower()
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    return compiled, dict(compile_s=time.perf_counter() - t0, lower_s=lower_s)

  # -- training step
  def compile_train(self, compile_only: bool) -> dict[str, float]:
    """Compiles the step (and, unless `compile_only`, fills a state and a batch)."""
    if not compile_only:
      self.state = host_filled(self.programs.layout()[0], self._rng)
      self._inputs()
    self.train_compiled, times = self._compile(self.programs.lower_train)
    return times

  def train_step(self) -> None:
    self.state, metrics = self.train_compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def train_xla_flops(self) -> float | None:
    """XLA's count of the whole step: lowered with the block scans unrolled (lowering only),
    since XLA counts a loop body once."""
    return lowered_flops(self.programs.lower_train(unroll=True))

  # -- sampling forward
  def compile_sample(self, compile_only: bool) -> dict[str, float]:
    if not compile_only:
      self.params = host_filled(self.programs.layout()[0].ema_params, self._rng)
      self._inputs()
    self.sample_compiled, times = self._compile(self.programs.lower_sample)
    return times

  def sample_step(self) -> None:
    b = self.batch
    jax.block_until_ready(self.sample_compiled(self.params, b["x"], self.t, b["y"]))

  def sample_xla_flops(self) -> float | None:
    return lowered_flops(self.programs.lower_sample(unroll=True))
