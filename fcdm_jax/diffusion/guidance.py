"""Classifier-free guidance: one rule shared by the model's guided forward and every sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PUBLISHED_GUIDED_CHANNELS = 3  # the published code guides out[:, :3] only


def guided_channels(in_channels: int, guide_all_eps: bool) -> int:
  """How many leading output channels get guidance: 3 (published) or every eps channel."""
  return in_channels if guide_all_eps else PUBLISHED_GUIDED_CHANNELS


def combine_cfg(out, cfg_scale, num_guided: int):
  """`out` = model output on the batch [cond half; null-label half] (channels last).

  Returns the same shape: the first `num_guided` channels of both halves become
  `u + s * (c - u)`; the remaining channels pass through unguided.
  """
  guided, rest = out[..., :num_guided], out[..., num_guided:]
  cond, uncond = jnp.split(guided, 2, axis=0)
  mixed = uncond + cfg_scale * (cond - uncond)
  return jnp.concatenate([jnp.concatenate([mixed, mixed], axis=0), rest], axis=-1)


NO_INTERVAL = ("", "none")   # what a command line writes for "no guidance interval"


def check_interval(interval, time_range=None, what: str = "cfg_interval"):
  """The guidance interval as (low, high) floats, or None for none.

  Accepts a pair of numbers or the command line's "LOW,HIGH"; None, an empty tuple, "none"
  and ml_collections' parse of "None"/"none" for a tuple field ((None,), ('none',)) mean no
  interval. Both ends must be finite with low <= high and, given the objective's
  `time_range` (its model time, `Objective.time_range`), inside it. `what` names the value in
  the errors (a flag or a config field).
  """
  if isinstance(interval, str):
    interval = tuple(v.strip() for v in interval.strip().strip("()[]").split(","))
  if interval is None or (isinstance(interval, (tuple, list)) and len(interval) <= 1 and all(
      v is None or str(v).strip().lower() in NO_INTERVAL for v in interval)):
    return None
  try:
    lo, hi = (float(v) for v in interval)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be two numbers LOW,HIGH (or 'none'), got {interval!r}") from None
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ValueError(f"{what} must be finite numbers LOW,HIGH, got {interval!r}")
  if lo > hi:
    raise ValueError(f"{what}=({lo:g}, {hi:g}) is reversed: it must be LOW,HIGH with "
                     "LOW <= HIGH")
  if time_range is not None:
    start, end = time_range
    if lo < start or hi > end:
      raise ValueError(f"{what}=({lo:g}, {hi:g}) lies outside the objective's time range "
                       f"[{start:g}, {end:g}] (the time the model is called with; convert a "
                       "paper's sigma interval with Objective.time_of_sigma)")
  return (lo, hi)


def check_guidance(cfg_scale, null_label, interval=None, time_range=None):
  """Clear errors for guidance the model cannot do; returns (scale, interval) normalised
  (`check_interval`)."""
  cfg_scale = float(cfg_scale)
  if cfg_scale != 1.0 and null_label is None:
    raise ValueError(f"cfg_scale={cfg_scale} needs a null (unconditional) label, but the model "
                     "has none (class_dropout_prob=0): use cfg_scale=1.0")
  return cfg_scale, check_interval(interval, time_range)


def rows_per_evaluation(times, cfg_scale, interval) -> np.ndarray:
  """The network rows per image of an evaluation at each of `times` (what `guided_model`
  runs): 1 unguided or outside the interval, 2 guided (the doubled batch, or the null rows
  inside the interval). Compared in float32, as the model's time is."""
  times = np.asarray(times, np.float32)
  if float(cfg_scale) == 1.0:
    return np.ones(times.shape, np.int64)
  if interval is None:
    return np.full(times.shape, 2, np.int64)
  inside = (times >= np.float32(interval[0])) & (times <= np.float32(interval[1]))
  return 1 + inside.astype(np.int64)


def null_like(y, null_label):
  """The unconditional condition for every row of `y`: the null class index for class
  labels (N,), or the empty caption's embedding (D,) for text embeddings (N, D)."""
  if np.ndim(null_label) == 0:
    return jnp.full_like(y, null_label)
  return jnp.broadcast_to(jnp.asarray(null_label, y.dtype), y.shape)


def mix_cfg(cond, uncond, cfg_scale, num_guided: int):
  """The conditional rows' guided output from separate conditional and null-label outputs:
  equal to `combine_cfg` on their concatenation, first half."""
  c, u = cond[..., :num_guided], uncond[..., :num_guided]
  return jnp.concatenate([u + cfg_scale * (c - u), cond[..., num_guided:]], axis=-1)


def guided_model(model_fn, y, *, cfg_scale, null_label, guide_all_eps: bool = False,
                 interval=None):
  """`model_fn(x, t, y)` -> `f(x, t)` for conditions y, classifier-free guided when
  cfg_scale != 1.

  Guidance runs the batch [x; x] with conditions [y; null] (the published sampling recipe;
  `null_like`) and returns the conditional half. `interval = (low, high)` guides only where
  low <= t <= high, in the time the model is called with (DDPM: original step index;
  flow: t in [0, 1]); elsewhere the output is the conditional one.

  With an interval the network runs on the conditional rows (N) and, only when some row's t
  is inside (`lax.cond`), once more on the null-label rows (N): N rows per call outside the
  interval, 2N inside, where the output is full guidance's (the same per-row network, in two
  calls of N rows instead of one of 2N: equal up to the float effects of a call's batch
  size). Every sampler's t is one value per step, so the choice is per step; under `vmap`
  with t not batched (the generator's per-sample vmap of a fixed time grid) the cond stays a
  branch, and where t is batched (adaptive dopri5's per-sample step sizes) it becomes a
  select that evaluates both: 2N rows, as without the saving.
  """
  cfg_scale, interval = check_guidance(cfg_scale, null_label, interval)
  if cfg_scale == 1.0:
    return lambda x, t: model_fn(x, t, y)

  def guided(x, t):
    n = x.shape[0]
    labels = jnp.concatenate([y, null_like(y, null_label)], axis=0)
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), labels)
    return combine_cfg(out, cfg_scale, guided_channels(x.shape[-1], guide_all_eps))[:n]

  if interval is None:
    return guided

  def guided_in_interval(x, t):
    cond = model_fn(x, t, y)
    inside = (t >= interval[0]) & (t <= interval[1])

    def with_guidance(cond):
      uncond = model_fn(x, t, null_like(y, null_label))
      mixed = mix_cfg(cond, uncond, cfg_scale, guided_channels(x.shape[-1], guide_all_eps))
      return jnp.where(inside.reshape((-1,) + (1,) * (cond.ndim - 1)), mixed, cond)

    return jax.lax.cond(jnp.any(inside), with_guidance, lambda cond: cond, cond)

  return guided_in_interval
