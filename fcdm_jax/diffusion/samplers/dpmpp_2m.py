"""DPM-Solver++(2M) (Lu et al. 2022) for DDPM (eps) and flow (SiT velocity) models:
deterministic, one network evaluation per step, one `lax.scan`.

The step rule is diffusers' `DPMSolverMultistepScheduler` with its defaults (algorithm_type
'dpmsolver++', solver_order 2, solver_type 'midpoint', lower_order_final, final sigma 0) on
the same grid (`multistep`: for DDPM its linspace steps, for flow its flow sigmas starting at
0.999). With the model's data predictions D_i and h_i = lambda_{i+1} - lambda_i:
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i
              - alpha_{i+1} (e^{-h_i} - 1) (D_i + (D_i - D_{i-1}) / (2 r_i)),  r_i = h_{i-1} / h_i,
second order except at the first step (no D_{i-1} yet) and the last one (to sigma = 0), which
are first order (the D_{i-1} term dropped); the last step returns alpha_n D_{n-1} = D_{n-1}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion.samplers import multistep
from fcdm_jax.diffusion.samplers.base import times

NAME = "dpmpp_2m"
FLOW_GRID = "dpmsolver"


def coefficients(grid: multistep.Grid):
  """(a, b, k) per step: x_{i+1} = a x_i + b (D_i + k (D_i - D_{i-1})), float64."""
  n, lam = grid.steps, grid.lambdas
  a, b, k = np.zeros(n), np.zeros(n), np.zeros(n)
  for i in range(n):
    alpha_next, sigma_next = grid.alphas[i + 1], grid.sigmas[i + 1]
    if sigma_next == 0.0:   # to the data: lambda = +inf, e^{-h} = 0
      b[i] = alpha_next
      continue
    h = np.log(alpha_next) - np.log(sigma_next) - lam[i]
    a[i] = sigma_next / grid.sigmas[i]
    b[i] = -alpha_next * np.expm1(-h)
    if i > 0:
      k[i] = 0.5 * h / (lam[i] - lam[i - 1])
  return a, b, k


def dpmpp_2m_loop(grid: multistep.Grid, model_fn, x_T):
  """x_T at the grid's first point -> the sample; `model_fn(x, t)` is called once per step."""
  to_data = multistep.data_prediction(grid.prediction)
  columns = multistep.scan_inputs(x_T.dtype, grid.alphas[:-1], grid.sigmas[:-1],
                                  *coefficients(grid))

  def step(carry, inputs):
    x, d_prev = carry
    t, alpha, sigma, a, b, k = inputs
    d = to_data(model_fn(x, times(t, x)), x, alpha, sigma)
    return (a * x + b * (d + k * (d - d_prev)), d), None

  (x, _), _ = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)),
                           (jnp.asarray(grid.times),) + columns)
  return x


SAMPLER = multistep.solver(NAME, FLOW_GRID, dpmpp_2m_loop,
                           help="DPM-Solver++(2M), deterministic multistep (10-25 steps)")
