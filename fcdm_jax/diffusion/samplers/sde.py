"""SiT's SDE sampler for flow matching: Euler–Maruyama or stochastic Heun on a uniform time
grid, then a last step to t = 1, as one `lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion import flow, guidance
from fcdm_jax.diffusion.samplers.base import (Sampler, Setting, check_grid_steps, check_method,
                                              grid_times, noise_source, positive_steps, times)

SDE_METHODS = ("euler", "heun")


def check_sde(num_steps, method: str, diffusion_form: str, last_step, last_step_size: float,
              sample_eps: float):
  """Validated (method, form, last_step, t0, t1) of an SDE sampler (errors raised up front)."""
  check_grid_steps(num_steps)
  method = check_method(method, SDE_METHODS, "SDE")
  form = flow.check_diffusion_form(diffusion_form)
  last_step = flow.check_last_step(last_step)
  t0, t1 = flow.sde_time_interval(form, sample_eps, last_step, last_step_size)
  if method == "heun" and t1 >= 1.0:
    raise ValueError("the Heun SDE step evaluates the score at t1 = 1, where it is infinite: "
                     "use a last step (last_step_size > 0) or sample_eps > 0")
  return method, form, last_step, t0, t1


def sde_sample_loop(model_fn, x_init, *, num_steps: int, method: str = "euler",
                    diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
                    last_step="Mean", last_step_size: float = 0.04, sample_eps: float = 0.0,
                    rng=None, step_noise=None, return_trajectory: bool = False):
  """num_steps grid points on [t0, t1], num_steps - 1 stochastic steps (Euler–Maruyama or
  stochastic Heun), then the last step to t = 1. `model_fn(x, t)` is the velocity, t in [0, 1].

  With `return_trajectory`, also returns the num_steps states after each step (as SiT).
  """
  method, form, last_step, t0, t1 = check_sde(num_steps, method, diffusion_form, last_step,
                                              last_step_size, sample_eps)
  ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)
  dt = ts[1] - ts[0]
  sources, draw = noise_source(num_steps - 1, x_init, rng, step_noise)

  def drift(x, t):
    return flow.sde_drift(model_fn(x, t), x, t, form, diffusion_norm)

  def euler_maruyama(x, t, dw):
    mean_x = x + drift(x, t) * dt
    return mean_x + jnp.sqrt(2 * flow.diffusion_coefficient(t, x, form, diffusion_norm)) * dw

  def heun(x, t, dw):
    xhat = x + jnp.sqrt(2 * flow.diffusion_coefficient(t, x, form, diffusion_norm)) * dw
    k1 = drift(xhat, t)
    xp = xhat + dt * k1
    k2 = drift(xp, t + dt)
    return xhat + 0.5 * dt * (k1 + k2)

  update = euler_maruyama if method == "euler" else heun

  def step(x, inputs):
    t_cur, source = inputs
    x = update(x, times(t_cur, x), draw(source) * jnp.sqrt(dt))
    return x, (x if return_trajectory else None)

  x, trajectory = jax.lax.scan(step, x_init, (ts[:-1], sources))
  if last_step is not None:
    t = times(t1, x)
    x = flow.last_step_update(last_step, model_fn(x, t), x, t, last_step_size, form,
                              diffusion_norm)
  if return_trajectory:
    return x, jnp.concatenate([trajectory, x[None]], axis=0)
  return x


def make(objective, settings, guide):
  loop = dict(num_steps=positive_steps(settings["steps"]), method=settings["method"],
              diffusion_form=settings["diffusion_form"],
              diffusion_norm=float(settings["diffusion_norm"]),
              last_step=settings["last_step"],
              last_step_size=float(settings["last_step_size"]),
              sample_eps=objective.sample_eps)
  check_sde(loop["num_steps"], loop["method"], loop["diffusion_form"], loop["last_step"],
            loop["last_step_size"], objective.sample_eps)

  def sample_fn(model_fn, x_T, y, rng, step_noise=None):
    model = flow.velocity_only(guidance.guided_model(model_fn, y, **guide))
    return sde_sample_loop(model, x_T, rng=rng, step_noise=step_noise, **loop)

  return sample_fn


def model_times(objective, settings) -> np.ndarray:
  """Euler: one evaluation per step at its start; Heun: two, at its start and end; then one
  at t1 for the last step (if any), as `sde_sample_loop` calls the model."""
  num_steps = positive_steps(settings["steps"])
  method, _, last_step, t0, t1 = check_sde(
      num_steps, settings["method"], settings["diffusion_form"], settings["last_step"],
      float(settings["last_step_size"]), objective.sample_eps)
  ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)
  starts = np.asarray(ts[:-1])
  if method == "heun":
    ends = np.asarray(ts[:-1] + (ts[1] - ts[0]))
    starts = np.stack([starts, ends], axis=1).reshape(-1)
  last = [np.float32(t1)] if last_step is not None else []
  return np.concatenate([starts, np.asarray(last, np.float32)])


SAMPLER = Sampler(
    objectives=("flow",), make=make, model_times=model_times,
    help="SiT's SDE sampler (the paper's flow protocol)",
    settings={
        "method": Setting("euler", str, f"integration method, one of {SDE_METHODS}"),
        "diffusion_form": Setting("sigma", str, f"w(t), one of {flow.DIFFUSION_FORMS}"),
        "diffusion_norm": Setting(1.0, float, "scale of w(t)"),
        "last_step": Setting("Mean", str, f"the final jump to t = 1, one of {flow.LAST_STEPS} "
                             "(None or 'none': no last step)", nullable=True),
        "last_step_size": Setting(0.04, float, "length of the last step"),
    })
