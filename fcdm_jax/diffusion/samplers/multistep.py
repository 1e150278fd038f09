"""What the multistep solvers (`dpmpp_2m`, `unipc`) share: their time grids, the model's output
as a data prediction, and the checks on their settings.

Both objectives become one process x = alpha * x0 + sigma * noise on a grid of n points (the
steps, one network evaluation each) plus the end point (alpha, sigma) = (1, 0), where the
solvers work in lambda = log(alpha / sigma) with the model's data prediction x0(x):

- DDPM (eps models, any beta schedule): alpha = sqrt(abar), sigma = sqrt(1 - abar) at the
  grid's original step indices, x0 = (x - sigma * eps) / alpha with eps the first C output
  channels (the learned-variance channels are not used). The grid is diffusers'
  `timestep_spacing="linspace"` default: round(linspace(0, T - 1, n + 1)) reversed, last one
  dropped (T = 1000: 25 steps -> 999, 959, ..., 40; 10 steps -> 999, 899, ..., 100). The
  model is called with those indices as float32 (its training time).
- Flow (SiT's linear path): SiT's x_t = t * x_data + (1 - t) * noise with velocity
  v = x_data - noise; diffusers' flow convention is x = (1 - sigma) * x0 + sigma * noise with
  v_diffusers = noise - x0. So sigma = 1 - t, alpha = t, v_diffusers = -v and
  x0 = x - sigma * v_diffusers = x + sigma * v. The model is called with t = 1 - sigma.
  The grid is diffusers' `use_flow_sigmas=True` with its default 1000 training steps:
  DPM-Solver++ sigma = flip(1 - linspace(1, 0.001, n + 1))[:-1] (0.999 down to 0.999 / n),
  UniPC sigma = linspace(1, 0.001, n + 1)[:-1] (1 down to 0.001 + 0.999 / n). Both apply the
  time shift s (`time_shift`, diffusers' `flow_shift`, SD3's form)
      sigma' = s * sigma / (1 + (s - 1) * sigma),   in SiT's time  t' = t / (s - (s - 1) * t)
  (s > 1 spends more of the steps at high noise, near t = 0); UniPC then moves a first sigma
  of 1 (where lambda = -inf) to 1 - 1e-6; sigma is rounded to float32 as diffusers does. So
  each solver agrees with its diffusers scheduler step for step.
  `FlowObjective.sample_eps` does not apply: the grid runs to data (t = 1) as diffusers' does.

Solver coefficients are computed on the host in float64 from these (float32-exact) grid
values; the loops run in the sample's dtype (float32).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion import guidance
from fcdm_jax.diffusion.samplers.base import Sampler, Setting

# diffusers' default num_train_timesteps: it sets the flow grids' ends (1 - 1/1000, 1/1000).
FLOW_TRAIN_STEPS = 1000
FLOW_GRIDS = ("dpmsolver", "unipc")
OBJECTIVES = ("ddpm", "flow")
# UniPC moves a first sigma of 1 (t = 0, where alpha = 0 and lambda = -inf) by this much.
UNIPC_SIGMA_ONE_NUDGE = 1e-6

TIME_SHIFT = Setting(1.0, float, "flow: SD3 time shift s of the grid's noise level, "
                     "sigma' = s*sigma/(1+(s-1)*sigma), i.e. t' = t/(s-(s-1)*t) in SiT's t "
                     "(diffusers' flow_shift; 1 = none, s > 1: more steps near noise); "
                     "DDPM: must stay 1")


@dataclasses.dataclass(frozen=True)
class Grid:
  """A solver's grid: n model times and n + 1 points (alpha, sigma), the last (1, 0)."""
  times: np.ndarray        # (n,) float32: what the model is called with at each step
  alphas: np.ndarray       # (n + 1,) float64
  sigmas: np.ndarray       # (n + 1,) float64
  prediction: str          # 'eps' (DDPM) or 'velocity' (SiT flow)

  @property
  def steps(self) -> int:
    return len(self.times)

  @property
  def lambdas(self) -> np.ndarray:
    """log(alpha / sigma) at the n grid points (the end point's is +inf, left out)."""
    return np.log(self.alphas[:-1]) - np.log(self.sigmas[:-1])


def check_steps(steps, solver: str) -> int:
  """A multistep solver needs two or more steps (one model evaluation each)."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
    raise ValueError(f"{solver} is a multistep solver: steps must be an integer >= 2 (network "
                     f"evaluations), got {steps!r}")
  return int(steps)


def check_shift(shift) -> float:
  shift = float(shift)
  if not math.isfinite(shift) or shift <= 0:
    raise ValueError(f"time_shift must be a finite number > 0 (1 = no shift), got {shift!r}")
  return shift


def shift_sigma(sigma, shift: float):
  """SD3's time shift of the noise level sigma in [0, 1] (identity for shift = 1)."""
  sigma = np.asarray(sigma, np.float64)
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def ddpm_indices(num_timesteps: int, steps: int) -> np.ndarray:
  """diffusers' 'linspace' timesteps: round(linspace(0, T - 1, n + 1)) reversed, minus the 0."""
  indices = np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
  if np.any(np.diff(indices) >= 0):
    raise ValueError(f"steps={steps} repeats time steps of a {num_timesteps}-step process: "
                     f"use fewer steps")
  return indices


def flow_sigmas(steps: int, shift: float, grid: str) -> np.ndarray:
  """The n noise levels (float32 values, high to low) of diffusers' flow grid `grid`."""
  if grid == "dpmsolver":
    # 1 - linspace(1, 1/T, n + 1), high to low, the 0 dropped: diffusers' own arithmetic.
    sigmas = np.flip(1.0 - np.linspace(1.0, 1.0 / FLOW_TRAIN_STEPS, steps + 1))[:-1]
  elif grid == "unipc":
    sigmas = np.linspace(1.0, 1.0 / FLOW_TRAIN_STEPS, steps + 1)[:-1]
  else:
    raise ValueError(f"unknown flow grid {grid!r}; expected one of {FLOW_GRIDS}")
  sigmas = shift_sigma(sigmas, shift)
  if grid == "unipc" and abs(sigmas[0] - 1.0) < UNIPC_SIGMA_ONE_NUDGE:
    sigmas[0] -= UNIPC_SIGMA_ONE_NUDGE
  return sigmas.astype(np.float32)


def make_grid(objective, steps, shift, flow_grid: str, solver: str) -> Grid:
  """The grid of `solver` for `objective` (a DDPMObjective or a FlowObjective), validated."""
  name = getattr(objective, "name", None)
  if name not in OBJECTIVES:
    raise ValueError(f"{solver} serves the {OBJECTIVES} objectives, not {name!r}")
  steps = check_steps(steps, solver)
  shift = check_shift(shift)
  if name == "ddpm":
    if shift != 1.0:
      raise ValueError(f"time_shift={shift} applies to the flow objective only; the DDPM grid "
                       "is diffusers' linspace steps (leave time_shift at 1)")
    diffusion = objective.diffusion
    indices = ddpm_indices(diffusion.num_timesteps, steps)
    abar = np.asarray(diffusion.alphas_cumprod, np.float64)[indices]
    times = diffusion.timestep_map[indices].astype(np.float32)
    alphas, sigmas = np.sqrt(abar), np.sqrt(1.0 - abar)
    prediction = "eps"
  else:
    sigmas = flow_sigmas(steps, shift, flow_grid).astype(np.float64)
    alphas = 1.0 - sigmas
    times = alphas.astype(np.float32)       # SiT's t = 1 - sigma
    prediction = "velocity"
  return Grid(times=times, alphas=np.append(alphas, 1.0), sigmas=np.append(sigmas, 0.0),
              prediction=prediction)


def model_times(objective, settings, flow_grid: str, solver: str) -> np.ndarray:
  """The times a multistep solver calls the model with (one per step), from its settings."""
  return make_grid(objective, settings["steps"], settings["time_shift"], flow_grid, solver).times


def data_prediction(prediction: str):
  """f(out, x, alpha, sigma) -> the model's x0 prediction from its output at (x, alpha, sigma)."""
  def leading(out, x):
    channels = x.shape[-1]
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (channels, 2 * channels):
      raise ValueError(f"model output has shape {out.shape}; expected x's {x.shape} with "
                       f"{channels} or {2 * channels} channels")
    return out[..., :channels]

  if prediction == "eps":
    return lambda out, x, alpha, sigma: (x - sigma * leading(out, x)) / alpha
  if prediction == "velocity":
    return lambda out, x, alpha, sigma: x + sigma * leading(out, x)
  raise ValueError(f"unknown prediction {prediction!r}")


def scan_inputs(dtype, *columns) -> tuple:
  """Per-step scalars (float64 host arrays) as `dtype` arrays, what a `lax.scan` reads."""
  return tuple(jnp.asarray(np.asarray(c, np.float64), dtype) for c in columns)


def solver(name: str, flow_grid: str, loop, help: str) -> Sampler:
  """The registry entry of a deterministic multistep solver: `loop(grid, model_fn, x_T)`
  over the time grid of the objective (`make_grid`), guidance bound around the model."""

  def make(objective, settings, guide):
    grid = make_grid(objective, settings["steps"], settings["time_shift"], flow_grid, name)

    def sample_fn(model_fn, x_T, y, rng, step_noise=None):
      del rng  # deterministic
      if step_noise is not None:
        raise ValueError(f"{name} is deterministic: it takes no step_noise")
      return loop(grid, guidance.guided_model(model_fn, y, **guide), x_T)

    return sample_fn

  return Sampler(objectives=OBJECTIVES, make=make, settings={"time_shift": TIME_SHIFT},
                 help=help,
                 model_times=lambda objective, settings: model_times(objective, settings,
                                                                     flow_grid, name))
