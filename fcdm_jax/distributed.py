"""Multi-host start-up and barriers for the command-line tools, without the training imports.

`maybe_initialize(requested)` calls `jax.distributed.initialize()` when asked or when the
environment names a cluster (JAX_COORDINATOR_ADDRESS, or SLURM with several tasks); on TPU
pods and SLURM JAX finds the coordinator itself, elsewhere set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host.
"""

from __future__ import annotations

import itertools
import os

import jax


def maybe_initialize(requested: bool = False) -> None:
  env = os.environ
  wanted = (requested or "JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("SLURM_NTASKS", "1")) > 1)
  if not wanted or jax.distributed.is_initialized():
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def broadcast_from_host0(value):
  """Host 0's numpy value on every host (e.g. a decision read from shared storage)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return multihost_utils.broadcast_one_to_all(value)


def meet(name: str, timeout_s: float) -> bool:
  """Every process waits here for the others, at most `timeout_s` (a no-op on one process).

  The coordination service's barrier, which needs no device and gives up after the
  timeout (`barrier` above waits on a device collective for ever). Returns whether every
  process arrived. `global_state.client` is JAX's own client of that service (what its
  multi-process test harness uses); without it, the device barrier stands in. Every process
  must pass the same names in the same order.
  """
  if jax.process_count() == 1:
    return True
  from jax._src import distributed as jax_distributed   # the service's client: no public API
  client = getattr(jax_distributed.global_state, "client", None)
  if client is None:
    barrier(name)
    return True
  try:
    client.wait_at_barrier(name, int(timeout_s * 1000))
  except Exception:   # DEADLINE_EXCEEDED (or the service gone): the others did not come
    return False
  return True


# How long a compiled program waits for the other processes before its first run: a
# loaded host may compile a large model for many minutes.
START_TIMEOUT_S = 2 * 3600
_STARTS = itertools.count()   # barrier names: every process starts programs in the same order


class StartTogether:
  """A jitted function whose first run of each argument layout starts on all processes at once.

  On CPU, cross-process collectives (gloo) connect the processes inside the first program
  that needs them and give up after 30 s, so a process that compiled 30 s faster than
  another fails its first step. Here each process compiles ahead (`lower().compile()`),
  then all meet at a coordination-service barrier and start within milliseconds of each
  other. On one process this is the jitted function itself.
  """

  def __init__(self, jitted, name: str):
    self.jitted, self.name = jitted, name
    self._compiled = {}

  def __call__(self, *args):
    if jax.process_count() == 1:
      return self.jitted(*args)
    leaves, tree = jax.tree.flatten(args)
    layout = (tree, tuple((getattr(a, "shape", None), str(getattr(a, "dtype", type(a))),
                           getattr(a, "sharding", None)) for a in leaves))
    compiled = self._compiled.get(layout)
    if compiled is None:
      compiled = self.jitted.lower(*args).compile()
      name = f"fcdm_jax/start/{self.name}/{next(_STARTS)}"
      if not meet(name, START_TIMEOUT_S):
        raise RuntimeError(f"the other processes did not reach {name} within "
                           f"{START_TIMEOUT_S} s (one of them failed or hangs)")
      self._compiled[layout] = compiled
    return compiled(*args)
