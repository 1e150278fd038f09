"""Counting what the FCDM network really runs: `counted_rows()` patches `FCDM.apply` so that
every call that runs records its rows (a host callback: an untaken `lax.cond` branch records
nothing, a select records both), for checking the cost samplers report."""

import contextlib

import jax

from fcdm_jax.models import FCDM
from fcdm_jax.sampling import generator as generator_lib


@contextlib.contextmanager
def counted_rows():
  """Yields the list of row counts of the network's calls (compiled programs that hold the
  callback are dropped from the generator's cache afterwards)."""
  calls = []
  original = FCDM.apply
  compiled = set(generator_lib._COMPILED)

  def apply(self, variables, x, *args, **kwargs):
    jax.debug.callback(lambda x: calls.append(x.shape[0]), x)
    return original(self, variables, x, *args, **kwargs)

  FCDM.apply = apply
  try:
    yield calls
  finally:
    FCDM.apply = original
    for key in set(generator_lib._COMPILED) - compiled:
      del generator_lib._COMPILED[key]


def rows_since(calls: list) -> int:
  """The rows of the calls recorded so far (all of them finished), and forget them."""
  jax.effects_barrier()
  total = sum(calls)
  calls.clear()
  return total
