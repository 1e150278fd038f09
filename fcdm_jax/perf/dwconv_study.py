"""The depthwise 7x7 conv formulations timed at a config's level shapes (bench `--mode=dwconv`)."""

from __future__ import annotations

import statistics
from typing import Any, Callable

import jax

from fcdm_jax.models import layers
from fcdm_jax.perf.machine import load_average
from fcdm_jax.perf.measure import timed

STUDY_IMPLS = ("xla", "shift", "shift_vjp")


def dwconv_study(config, batch: int = 8, repeats: int = 5, impls=STUDY_IMPLS,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """The depthwise 7x7 conv formulations at the shapes of the config's three levels.

  Per formulation and level: the conv alone forward ('fwd'), its backward given the
  cotangent ('bwd': input and kernel gradients), and the block's first chain forward
  (dwconv -> LayerNorm -> adaLN modulate -> pwconv1, 'chain'), which shows how the
  formulation fuses with its consumers. Formulations alternate within each repeat.
  """
  def chain(fn):
    def f(x, k, w1, s):
      h = layers.modulate(layers.layer_norm(fn(x, k)), s, s)
      return h @ w1
    return f

  size, c0, ratio = config.latent_size, config.model.hidden_size, config.model.mlp_ratio
  out: dict[str, Any] = dict(batch=batch, repeats=repeats, levels=[],
                             load_average_start=load_average())
  for level in range(3):
    h, c = size // 2 ** level, c0 * 2 ** level
    keys = jax.random.split(jax.random.key(level), 5)
    x = jax.random.normal(keys[0], (batch, h, h, c))
    k = 0.1 * jax.random.normal(keys[1], (7, 7, 1, c))
    g = jax.random.normal(keys[2], (batch, h, h, c))
    w1 = 0.05 * jax.random.normal(keys[3], (c, int(c * ratio)))
    s = jax.random.normal(keys[4], (batch, c))
    cases = {}
    for impl in impls:
      fn = layers.DWCONV_FNS[impl]
      cases[(impl, "fwd")] = (jax.jit(fn).lower(x, k).compile(), (x, k))
      bwd = jax.jit(lambda x, k, g, fn=fn: jax.vjp(fn, x, k)[1](g))
      cases[(impl, "bwd")] = (bwd.lower(x, k, g).compile(), (x, k, g))
      cases[(impl, "chain")] = (jax.jit(chain(fn)).lower(x, k, w1, s).compile(), (x, k, w1, s))
    times: dict[tuple, list] = {key: [] for key in cases}
    for fn, args in cases.values():
      jax.block_until_ready(fn(*args))
    for _ in range(repeats):
      for key, (fn, args) in cases.items():
        times[key].append(timed(lambda: jax.block_until_ready(fn(*args))))
    row = dict(shape=[batch, h, h, c])
    for (impl, what), ts in times.items():
      row.setdefault(impl, {})[what] = dict(median_ms=1e3 * statistics.median(ts),
                                            min_ms=1e3 * min(ts))
    out["levels"].append(row)
    log(f"dwconv {row['shape']}: " + "; ".join(
        f"{impl} fwd {row[impl]['fwd']['median_ms']:.1f} bwd {row[impl]['bwd']['median_ms']:.1f}"
        f" chain {row[impl]['chain']['median_ms']:.1f} ms" for impl in impls))
  out["load_average_end"] = load_average()
  return out
