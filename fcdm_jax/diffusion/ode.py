"""Adaptive Dormand–Prince 5(4) ODE solver as one `lax.while_loop` (what SiT's dopri5 does).

The step size follows the embedded 4th-order error estimate, measured as an RMS over the
whole state relative to `atol + rtol * |y|` (the torchdiffeq convention), with the first
step chosen by Hairer's rule. Runs under `jax.jit`; the number of steps is data-dependent
but bounded by `max_steps`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Butcher tableau of DOPRI5: nodes c, stage weights a, 5th-order weights b, and b - b*
# (b* the embedded 4th-order weights). The 7th stage is f at the new point (FSAL).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = _A[6] + (0.0,)
_B_ERR = (35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
          -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40)
ORDER = 5
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


class SolveInfo(NamedTuple):
  """How the solve went: accepted/attempted steps, where it stopped, whether it got to t1,
  and how often it evaluated f."""
  num_accepted: jax.Array
  num_steps: jax.Array
  t: jax.Array
  success: jax.Array
  num_evaluations: jax.Array


def evaluations(num_steps, first_step_given: bool = False):
  """f evaluations of a solve with `num_steps` attempts: f(t0), Hairer's probe for the first
  step (unless given), and 6 per attempt (its 7th stage is the next attempt's first, FSAL)."""
  return (1 if first_step_given else 2) + (len(_C) - 1) * num_steps


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def _combine(y, h, ks, weights):
  out = y
  for w, k in zip(weights, ks):
    if w != 0.0:
      out = out + (h * w) * k
  return out


def initial_step(f, t0, y0, f0, rtol: float, atol: float):
  """Hairer's first step: keep the first Euler step's relative change and curvature small."""
  scale = atol + jnp.abs(y0) * rtol
  d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
  f1 = f(t0 + h0, y0 + h0 * f0)
  d2 = _rms((f1 - f0) / scale) / h0
  dmax = jnp.maximum(d1, d2)
  h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / dmax) ** (1.0 / ORDER))
  return jnp.minimum(100 * h0, h1)


def dopri5(f, y0, t0: float, t1: float, *, rtol: float = 1e-3, atol: float = 1e-6,
           max_steps: int = 4096, first_step=None):
  """Integrate dy/dt = f(t, y) from t0 to t1 > t0; returns (y(t1), SolveInfo).

  `f` takes a scalar float32 time. If `max_steps` attempts do not reach t1 the returned
  state is where it stopped and `info.success` is False.
  """
  if not t1 > t0:
    raise ValueError(f"dopri5 integrates forward: need t1 > t0, got [{t0}, {t1}]")
  if rtol <= 0 or atol <= 0:
    raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
  if max_steps <= 0:
    raise ValueError(f"max_steps must be > 0, got {max_steps}")
  t0 = jnp.asarray(t0, jnp.float32)
  t1 = jnp.asarray(t1, jnp.float32)
  f0 = f(t0, y0)
  h = initial_step(f, t0, y0, f0, rtol, atol) if first_step is None else jnp.asarray(
      first_step, jnp.float32)

  def cond(state):
    t, _, _, _, _, steps = state
    return (t < t1) & (steps < max_steps)

  def body(state):
    t, y, k1, h, accepted, steps = state
    last = h >= t1 - t
    h = jnp.where(last, t1 - t, h)
    ks = [k1]
    for i in range(1, 7):
      ks.append(f(t + _C[i] * h, _combine(y, h, ks, _A[i])))
    y_new = _combine(y, h, ks[:6], _B[:6])
    err = _combine(jnp.zeros_like(y), h, ks, _B_ERR)
    scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
    err_norm = _rms(err / scale)
    accept = err_norm <= 1.0
    factor = jnp.where(err_norm == 0, MAX_FACTOR,
                       SAFETY * jnp.power(jnp.maximum(err_norm, 1e-30), -1.0 / ORDER))
    factor = jnp.clip(factor, MIN_FACTOR, jnp.where(accept, MAX_FACTOR, 1.0))
    t = jnp.where(accept, jnp.where(last, t1, t + h), t)
    y = jnp.where(accept, y_new, y)
    k1 = jnp.where(accept, ks[6], k1)
    return t, y, k1, h * factor, accepted + accept.astype(jnp.int32), steps + 1

  state = (t0, y0, f0, h, jnp.int32(0), jnp.int32(0))
  t, y, _, _, accepted, steps = jax.lax.while_loop(cond, body, state)
  return y, SolveInfo(num_accepted=accepted, num_steps=steps, t=t, success=t >= t1,
                      num_evaluations=evaluations(steps, first_step is not None))
