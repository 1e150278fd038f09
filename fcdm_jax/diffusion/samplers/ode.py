"""The probability-flow ODE dx = v dt for flow matching: Euler or Heun on a uniform grid (one
`lax.scan`), or adaptive Dormand–Prince (SiT's dopri5, one `lax.while_loop`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion import flow, guidance
from fcdm_jax.diffusion import ode as ode_solver
from fcdm_jax.diffusion.samplers.base import (Sampler, Setting, check_grid_steps, check_method,
                                              grid_times, positive_steps, times)

ODE_METHODS = ("euler", "heun", "dopri5")


def ode_sample_loop(model_fn, x_init, *, num_steps: int, method: str = "heun", t0: float = 0.0,
                    t1: float = 1.0):
  """dx = v dt from noise (t0) to data (t1) on num_steps grid points: Euler or Heun (2nd order)."""
  check_grid_steps(num_steps)
  method = check_method(method, ODE_METHODS[:2], "fixed-step ODE")
  ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)

  def step(x, inputs):
    t_cur, t_next = inputs
    dt = t_next - t_cur
    v = model_fn(x, times(t_cur, x))
    if method == "euler":
      return x + dt * v, None
    v_next = model_fn(x + dt * v, times(t_next, x))
    return x + 0.5 * dt * (v + v_next), None

  x, _ = jax.lax.scan(step, x_init, (ts[:-1], ts[1:]))
  return x


def ode_sample_adaptive(model_fn, x_init, *, atol: float = 1e-6, rtol: float = 1e-3,
                        max_steps: int = 4096, t0: float = 0.0, t1: float = 1.0,
                        return_info: bool = False):
  """dx = v dt with adaptive Dormand–Prince steps (SiT's default ODE sampler, dopri5).

  Samples are NaN if the solver runs out of `max_steps` before t1, so that a failed
  solve cannot pass for a sample.
  """
  def f(t, x):
    return model_fn(x, times(t, x))

  x, info = ode_solver.dopri5(f, x_init, t0, t1, rtol=rtol, atol=atol, max_steps=max_steps)
  x = jnp.where(info.success, x, jnp.nan)
  return (x, info) if return_info else x


def make(objective, settings, guide):
  del objective  # the ODE runs on [0, 1] whatever sample_eps
  method = check_method(settings["method"], ODE_METHODS, "ODE")
  # dopri5 counts its evaluations, as the generator runs it (a per-sample vmap): the first,
  # f(t0 = 0), has one time for all samples, so an interval stays a branch there; every other
  # has per-sample times, which make an interval a select that runs both halves (2 rows).
  first = int(guidance.rows_per_evaluation([0.0], guide["cfg_scale"], guide["interval"])[0])
  rest = 1 if guide["cfg_scale"] == 1.0 else 2
  if method == "dopri5":
    tolerances = dict(atol=float(settings["atol"]), rtol=float(settings["rtol"]),
                      max_steps=int(settings["max_steps"]))
    if tolerances["atol"] <= 0 or tolerances["rtol"] <= 0 or tolerances["max_steps"] <= 0:
      raise ValueError(f"dopri5 needs atol, rtol, max_steps > 0, got {tolerances}")
  else:
    num_steps = check_grid_steps(positive_steps(settings["steps"]))

  def sample_fn(model_fn, x_T, y, rng, step_noise=None, return_evaluations=False):
    del rng  # deterministic
    if step_noise is not None:
      raise ValueError("the ODE sampler is deterministic: it takes no step_noise")
    model = flow.velocity_only(guidance.guided_model(model_fn, y, **guide))
    if method == "dopri5":
      x, info = ode_sample_adaptive(model, x_T, return_info=True, **tolerances)
      if return_evaluations:   # counted by the solver's loop: data dependent
        evaluations = first + rest * (info.num_evaluations - 1)
        return x, jnp.full((x.shape[0],), evaluations, jnp.float32)
      return x
    if return_evaluations:
      raise ValueError(f"the {method} ODE has a fixed time grid: its evaluations are "
                       "counted from model_times")
    return ode_sample_loop(model, x_T, num_steps=num_steps, method=method)

  return sample_fn


def model_times(objective, settings) -> np.ndarray | None:
  """Euler: one evaluation per step at its start; Heun: two, at its start and end;
  dopri5: None (its steps depend on the data; it counts them as it runs)."""
  del objective
  method = check_method(settings["method"], ODE_METHODS, "ODE")
  if method == "dopri5":
    return None
  ts = grid_times(0.0, 1.0, check_grid_steps(positive_steps(settings["steps"])))
  if method == "euler":
    return ts[:-1]
  return np.stack([ts[:-1], ts[1:]], axis=1).reshape(-1)


SAMPLER = Sampler(
    objectives=("flow",), make=make, model_times=model_times,
    help="the probability-flow ODE (Euler, Heun or adaptive dopri5)",
    settings={
        "method": Setting("heun", str, f"integration method, one of {ODE_METHODS}"),
        "atol": Setting(1e-6, float, "dopri5: absolute tolerance"),
        "rtol": Setting(1e-3, float, "dopri5: relative tolerance"),
        "max_steps": Setting(4096, int, "dopri5: most step attempts (NaN samples past it)"),
    })
