"""Flow matching on the linear path with velocity prediction (SiT's transport, `ICPlan`).

t = 0 is noise and t = 1 is data: x_t = t*x1 + (1-t)*x0, target velocity u_t = x1 - x0.
For sampling with an SDE the score is recovered from the velocity,
s = (t*v - x) / (1 - t), and dx = [v + w(t) s] dt + sqrt(2 w(t)) dW keeps the marginals of
the ODE dx = v dt for any diffusion coefficient w(t) (the "diffusion form").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion import likelihood

# Canonical names; SiT spells the last one "inccreasing-decreasing", accepted as an alias.
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
_FORM_ALIASES = {"inccreasing-decreasing": "increasing-decreasing"}
# What to do on the final stretch [t1, 1] that the SDE does not integrate (the score blows up
# at t = 1): "Mean" one SDE-drift step, "Euler" one velocity step, "Tweedie" the posterior
# mean E[x1 | x_t1], or None to stop at t1.
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


def expand_t(t, x):
  """Per-example times (N,) shaped to broadcast over x."""
  return t.reshape((-1,) + (1,) * (x.ndim - 1))


def path(x0, x1, t):
  """(x_t, u_t) on the linear path between noise x0 (t = 0) and data x1 (t = 1)."""
  te = expand_t(t, x1)
  alpha_t, sigma_t = te, 1 - te
  d_alpha_t, d_sigma_t = 1.0, -1.0
  return alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0


def sample_t(rng, n: int, train_eps: float = 0.0):
  """Training times, uniform on [train_eps, 1 - train_eps] (SiT's velocity model: [0, 1])."""
  if not 0.0 <= train_eps < 0.5:
    raise ValueError(f"train_eps must be in [0, 0.5), got {train_eps}")
  t0, t1 = train_eps, 1.0 - train_eps
  return jax.random.uniform(rng, (n,), jnp.float32) * (t1 - t0) + t0


def _check_velocity(v, x):
  if v.shape != x.shape:
    raise ValueError(f"velocity model returned shape {v.shape}, expected x's shape {x.shape}")
  return v


def velocity_only(model_fn):
  """SiT-style models built with learn_sigma output [v, extra]: the velocity is the first C."""
  def velocity(x, t):
    out = model_fn(x, t)
    return out[..., :x.shape[-1]] if out.shape[-1] == 2 * x.shape[-1] else out
  return velocity


def training_loss(model_fn, x1, x0, t):
  """Per-example mean squared error between the predicted and the path velocity."""
  xt, ut = path(x0, x1, t)
  v = _check_velocity(model_fn(xt, t), xt)
  return likelihood.mean_flat((v - ut) ** 2)


def score_from_velocity(v, x, t):
  """Score of p_t from the velocity: (t*v - x) / (1 - t) on the linear path."""
  te = expand_t(t, x)
  alpha_t, d_alpha_t = te, 1.0
  sigma_t, d_sigma_t = 1 - te, -1.0
  reverse_alpha_ratio = alpha_t / d_alpha_t
  var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
  return (reverse_alpha_ratio * v - x) / var


def check_diffusion_form(form: str) -> str:
  """Canonical diffusion-form name (case-insensitive); ValueError naming the choices."""
  by_lower = {f.lower(): f for f in DIFFUSION_FORMS}
  by_lower.update(_FORM_ALIASES)
  key = str(form).lower()
  if key not in by_lower:
    raise ValueError(f"unknown diffusion form {form!r}; expected one of {DIFFUSION_FORMS}")
  return by_lower[key]


def check_last_step(last_step):
  """Canonical last-step name, or None for 'none'/None (case-insensitive)."""
  if last_step is None or str(last_step).lower() == "none":
    return None
  by_lower = {s.lower(): s for s in LAST_STEPS if s is not None}
  if str(last_step).lower() not in by_lower:
    raise ValueError(f"unknown last step {last_step!r}; expected one of {LAST_STEPS}")
  return by_lower[str(last_step).lower()]


def diffusion_coefficient(t, x, form: str, norm: float = 1.0):
  """w(t) of SiT's diffusion forms, broadcast over x ("sigma" = "linear" = 1 - t here)."""
  form = check_diffusion_form(form)
  te = expand_t(t, x)
  if form == "constant":
    return jnp.full_like(te, norm)
  if form == "SBDM":
    # alpha'/alpha * sigma^2 - sigma * sigma' = (1 - t) / t: the VP-SDE's diffusion.
    sigma_t, d_sigma_t = 1 - te, -1.0
    return norm * ((1 / te) * sigma_t ** 2 - sigma_t * d_sigma_t)
  if form in ("sigma", "linear"):
    return norm * (1 - te)
  if form == "decreasing":
    return 0.25 * (norm * jnp.cos(np.pi * te) + 1) ** 2
  return norm * jnp.sin(np.pi * te) ** 2


def sde_drift(v, x, t, form: str, norm: float = 1.0):
  """Drift v + w(t) * score of the sampling SDE."""
  return v + diffusion_coefficient(t, x, form, norm) * score_from_velocity(v, x, t)


def sde_time_interval(form: str, sample_eps: float, last_step, last_step_size: float
                      ) -> tuple[float, float]:
  """[t0, t1] that the SDE integrates (SiT's check_interval for a velocity model).

  t0 = sample_eps for SBDM (w = (1-t)/t is infinite at 0), else 0; t1 = 1 - last_step_size,
  or 1 - sample_eps without a last step.
  """
  form, last_step = check_diffusion_form(form), check_last_step(last_step)
  if not 0.0 <= sample_eps < 0.5:
    raise ValueError(f"sample_eps must be in [0, 0.5), got {sample_eps}")
  if last_step is None:
    last_step_size = 0.0
  elif not 0.0 < last_step_size < 1.0:
    raise ValueError(f"last_step {last_step!r} needs last_step_size in (0, 1), got "
                     f"{last_step_size}; use last_step=None for no last step")
  t0 = sample_eps if form == "SBDM" else 0.0
  t1 = 1.0 - last_step_size if last_step_size != 0 else 1.0 - sample_eps
  if form == "SBDM" and t0 == 0.0:
    raise ValueError("diffusion form 'SBDM' has w(t) = (1-t)/t, infinite at t = 0: set "
                     "sample_eps > 0")
  if t0 >= t1:
    raise ValueError(f"empty SDE time interval [{t0}, {t1}]")
  return t0, t1


def last_step_update(last_step, v, x, t, step_size: float, form: str, norm: float = 1.0):
  """The final jump from t1 to 1 (see LAST_STEPS); `v` is the velocity at (x, t)."""
  last_step = check_last_step(last_step)
  if last_step is None:
    return x
  if last_step == "Mean":
    return x + sde_drift(v, x, t, form, norm) * step_size
  if last_step == "Euler":
    return x + v * step_size
  # Tweedie: E[x1 | x_t] = (x + sigma_t^2 * score) / alpha_t.
  te = expand_t(t, x)
  alpha_t, sigma_t = te, 1 - te
  return x / alpha_t + (sigma_t ** 2) / alpha_t * score_from_velocity(v, x, t)
