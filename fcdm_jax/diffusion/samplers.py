"""Sampling loops as compiled loops: DDPM and DDIM (Gaussian), SDE and ODE (flow matching).

Every loop is one `lax.scan` (or the adaptive solver's `lax.while_loop`), so the model is
traced once per loop whatever the step count, and a jitted sampler compiles once per
shape. Stochastic loops take either a PRNG key or `step_noise`, the caller's standard
normal draw for each step (shape (num_steps, *x.shape)); both go through the same step
code, which is how the tests replay the reference's recorded noise.

Model functions here take (x, t) and return channels-last output: for the Gaussian loops
t is the original timestep index as float32, for flow t in [0, 1]. Labels and guidance
are bound beforehand (`guidance.guided_model`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fcdm_jax.diffusion import flow, ode
from fcdm_jax.diffusion.gaussian import GaussianDiffusion, check_eta

SDE_METHODS = ("euler", "heun")
ODE_METHODS = ("euler", "heun", "dopri5")


def check_method(method: str, choices: tuple[str, ...], what: str) -> str:
  key = str(method).lower()
  if key not in choices:
    raise ValueError(f"unknown {what} method {method!r}; expected one of {choices}")
  return key


def check_grid_steps(num_steps) -> int:
  """Flow samplers take SiT's `num_steps`: the number of time-grid points (>= 2)."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
    raise ValueError(f"steps must be an integer >= 2 (time-grid points, SiT's num_steps), "
                     f"got {num_steps!r}")
  return num_steps


def _noise_source(num_steps: int, x, rng, step_noise):
  """(scan inputs, draw): recorded noise is passed through, keys are drawn from in the step."""
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise, x.dtype)
    if step_noise.shape != (num_steps,) + x.shape:
      raise ValueError(f"step_noise has shape {step_noise.shape}, expected "
                       f"{(num_steps,) + x.shape} (one draw per step)")
    return step_noise, lambda noise: noise
  if rng is None:
    raise ValueError("a stochastic sampler needs a PRNG key (rng) or recorded step_noise")
  return jax.random.split(rng, num_steps), lambda key: jax.random.normal(key, x.shape, x.dtype)


def _times(value, x):
  return jnp.full((x.shape[0],), value, jnp.float32)


# --- Gaussian diffusion --------------------------------------------------------------------
def ddpm_sample_loop(diffusion: GaussianDiffusion, model_fn, x_T, *, rng=None, step_noise=None,
                     clip_denoised: bool = False):
  """Ancestral sampling over every step of `diffusion` (respaced: its steps), t = T-1 .. 0."""
  num = diffusion.num_timesteps
  sources, draw = _noise_source(num, x_T, rng, step_noise)

  def step(x, inputs):
    i, source = inputs
    t = jnp.full((x.shape[0],), i, jnp.int32)
    out = model_fn(x, diffusion.model_time(t))
    return diffusion.p_sample(out, x, t, draw(source), clip_denoised), None

  indices = jnp.arange(num - 1, -1, -1, dtype=jnp.int32)
  x, _ = jax.lax.scan(step, x_T, (indices, sources))
  return x


def ddim_sample_loop(diffusion: GaussianDiffusion, model_fn, x_T, *, eta: float = 0.0, rng=None,
                     step_noise=None, clip_denoised: bool = False):
  """DDIM over the steps of `diffusion`; eta = 0 needs no randomness."""
  eta = check_eta(eta)
  num = diffusion.num_timesteps
  indices = jnp.arange(num - 1, -1, -1, dtype=jnp.int32)
  if eta == 0 and step_noise is None:
    sources, draw = jnp.zeros((num,), jnp.float32), lambda _: None
  else:
    sources, draw = _noise_source(num, x_T, rng, step_noise)

  def step(x, inputs):
    i, source = inputs
    t = jnp.full((x.shape[0],), i, jnp.int32)
    out = model_fn(x, diffusion.model_time(t))
    return diffusion.ddim_sample(out, x, t, draw(source), eta, clip_denoised), None

  x, _ = jax.lax.scan(step, x_T, (indices, sources))
  return x


# --- flow matching -------------------------------------------------------------------------
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
  """SiT's SDE sampler: num_steps grid points on [t0, t1], num_steps - 1 stochastic steps
  (Euler–Maruyama or stochastic Heun), then the last step to t = 1.

  With `return_trajectory`, also returns the num_steps states after each step (as SiT).
  """
  method, form, last_step, t0, t1 = check_sde(num_steps, method, diffusion_form, last_step,
                                              last_step_size, sample_eps)
  ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)
  dt = ts[1] - ts[0]
  sources, draw = _noise_source(num_steps - 1, x_init, rng, step_noise)

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
    x = update(x, _times(t_cur, x), draw(source) * jnp.sqrt(dt))
    return x, (x if return_trajectory else None)

  x, trajectory = jax.lax.scan(step, x_init, (ts[:-1], sources))
  if last_step is not None:
    t = _times(t1, x)
    x = flow.last_step_update(last_step, model_fn(x, t), x, t, last_step_size, form,
                              diffusion_norm)
  if return_trajectory:
    return x, jnp.concatenate([trajectory, x[None]], axis=0)
  return x


def ode_sample_loop(model_fn, x_init, *, num_steps: int, method: str = "heun", t0: float = 0.0,
                    t1: float = 1.0):
  """dx = v dt from noise (t0) to data (t1) on num_steps grid points: Euler or Heun (2nd order)."""
  check_grid_steps(num_steps)
  method = check_method(method, ODE_METHODS[:2], "fixed-step ODE")
  ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)

  def step(x, inputs):
    t_cur, t_next = inputs
    dt = t_next - t_cur
    v = model_fn(x, _times(t_cur, x))
    if method == "euler":
      return x + dt * v, None
    v_next = model_fn(x + dt * v, _times(t_next, x))
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
    return model_fn(x, _times(t, x))

  x, info = ode.dopri5(f, x_init, t0, t1, rtol=rtol, atol=atol, max_steps=max_steps)
  x = jnp.where(info.success, x, jnp.nan)
  return (x, info) if return_info else x
