"""UniPC (Zhao et al. 2023), bh2, order 2, with the UniC corrector, for DDPM (eps) and flow
(SiT velocity) models: deterministic, one network evaluation per step, one `lax.scan`.

The step rules are diffusers' `UniPCMultistepScheduler` with its defaults (predict_x0,
solver_type 'bh2', solver_order 2, lower_order_final, no corrector disabled, final sigma 0)
on the same grid (`multistep`: for DDPM its linspace steps, for flow its flow sigmas starting
at 1 - 1e-6). With data predictions m_i, h = lambda_{i+1} - lambda_i and B(h) = e^{-h} - 1:
  UniP (predictor), order p_i = min(2, i + 1, n - i):
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} B(h) (m_i + rho_p D1),
    D1 = (m_{i-1} - m_i) / r, r = (lambda_{i-1} - lambda_i) / h, rho_p = 1/2 at order 2
    (this predictor is DPM-Solver++(2M));
  UniC (corrector), at every step i >= 1, of the order p_{i-1} of the predictor it corrects:
    x_i <- (sigma_i / sigma_{i-1}) x_{i-1}
           - alpha_i B(h) (m_{i-1} + rho_0 D1 + rho_1 (m_i - m_{i-1})),
    h = lambda_i - lambda_{i-1},
    with m_i the model's prediction at the predicted x_i (no extra evaluation: the same m_i
    then drives the next predictor), rho_1 = 1/2 at order 1, and at order 2
    D1 = (m_{i-2} - m_{i-1}) / r, r = (lambda_{i-2} - lambda_{i-1}) / h and
    [[1, 1], [r, 1]] (rho_0, rho_1) = (g_1, 2 g_2) / B(h), where
    g_1 = B(h) / (-h) - 1 and g_2 = g_1 / (-h) - 1/2.
The last step (to sigma = 0) returns m_{n-1}, the prediction at the uncorrected x_{n-1}
(as diffusers: the last correction is multiplied by sigma_n = 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion.samplers import multistep
from fcdm_jax.diffusion.samplers.base import times

NAME = "unipc"
FLOW_GRID = "unipc"
ORDER = 2


def orders(n: int) -> np.ndarray:
  """The predictor's order at each of n steps: warm-up first step, lower-order final step."""
  return np.array([min(ORDER, i + 1, n - i) for i in range(n)])


def predictor_coefficients(grid: multistep.Grid):
  """(a, b, k) per step: x_{i+1} = a x_i + b (m_i + k (m_i - m_{i-1})), float64."""
  n, lam, order = grid.steps, grid.lambdas, orders(grid.steps)
  a, b, k = np.zeros(n), np.zeros(n), np.zeros(n)
  for i in range(n):
    alpha_next, sigma_next = grid.alphas[i + 1], grid.sigmas[i + 1]
    if sigma_next == 0.0:   # to the data: lambda = +inf, B(h) = -1
      b[i] = alpha_next
      continue
    h = np.log(alpha_next) - np.log(sigma_next) - lam[i]
    a[i] = sigma_next / grid.sigmas[i]
    b[i] = -alpha_next * np.expm1(-h)
    if order[i] == 2:
      r = (lam[i - 1] - lam[i]) / h
      k[i] = -0.5 / r     # rho_p D1 = (1/2) (m_{i-1} - m_i) / r
  return a, b, k


def corrector_coefficients(grid: multistep.Grid):
  """(use, a, b, p, q) per step: at steps with `use`, the predicted x_i becomes
  a x_{i-1} + b (m_{i-1} + p (m_{i-2} - m_{i-1}) + q (m_i - m_{i-1})), float64."""
  n, lam, order = grid.steps, grid.lambdas, orders(grid.steps)
  use = np.arange(n) > 0
  a, b, p, q = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
  for i in range(1, n):
    h = lam[i] - lam[i - 1]
    hh = -h
    b_h = np.expm1(hh)
    a[i] = grid.sigmas[i] / grid.sigmas[i - 1]
    b[i] = -grid.alphas[i] * b_h
    if order[i - 1] == 1:
      q[i] = 0.5
      continue
    r = (lam[i - 2] - lam[i - 1]) / h
    g1 = b_h / hh - 1.0
    g2 = g1 / hh - 0.5
    rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([g1, 2.0 * g2]) / b_h)
    p[i], q[i] = rho[0] / r, rho[1]
  return use, a, b, p, q


def unipc_loop(grid: multistep.Grid, model_fn, x_T):
  """x_T at the grid's first point -> the sample; `model_fn(x, t)` is called once per step."""
  to_data = multistep.data_prediction(grid.prediction)
  use, *corrector = corrector_coefficients(grid)
  columns = multistep.scan_inputs(x_T.dtype, grid.alphas[:-1], grid.sigmas[:-1],
                                  *predictor_coefficients(grid), *corrector)

  def step(carry, inputs):
    x_pred, x_prev, m_prev, m_prev2 = carry
    t, correct, alpha, sigma, a, b, k, ca, cb, cp, cq = inputs
    m = to_data(model_fn(x_pred, times(t, x_pred)), x_pred, alpha, sigma)
    corrected = ca * x_prev + cb * (m_prev + cp * (m_prev2 - m_prev) + cq * (m - m_prev))
    x = jnp.where(correct, corrected, x_pred)
    return (a * x + b * (m + k * (m - m_prev)), x, m, m_prev), None

  zeros = jnp.zeros_like(x_T)
  (x, _, _, _), _ = jax.lax.scan(step, (x_T, zeros, zeros, zeros),
                                 (jnp.asarray(grid.times), jnp.asarray(use)) + columns)
  return x


SAMPLER = multistep.solver(NAME, FLOW_GRID, unipc_loop,
                           help="UniPC (bh2, UniC corrector), deterministic multistep "
                                "(10-25 steps; training previews)")
