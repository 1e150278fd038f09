"""What a sampler is to the registry, and the helpers the sampling loops share.

A `Sampler` names the objectives it serves, the settings it reads (each with its default
and type), `make(objective, settings, guide) -> sample_fn(model_fn, x_T, y, rng,
step_noise=None)` and `model_times(objective, settings)`: the times it calls the network
with for one image, one entry per evaluation, which is what its cost is counted from
(`samplers.evaluations_per_image`). `settings` holds every key of `COMMON` and of the
sampler's own `settings`, with the defaults filled in (`samplers.resolve`); `guide` is
`guidance.guided_model`'s keywords, already checked. A sampler whose evaluations depend on
the data (adaptive dopri5) has `model_times` return None and counts them itself: its
sample_fn then takes `return_evaluations=True` and returns (x, evaluations per row).

Stochastic loops take either a PRNG key or `step_noise`, the caller's standard normal draw
for each step (shape (num_steps, *x.shape)); both go through the same step code
(`noise_source`), which is how the tests replay the reference's recorded noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Setting:
  """One sampler setting: its default, the type a config field holds, and whether None is
  one of its values (`nullable`; otherwise None stands for the default)."""
  default: Any
  type: type
  help: str
  nullable: bool = False


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registry entry: which objectives it serves, its own settings, how it is built, and
  the times it calls the network with (None: data dependent, counted as it runs)."""
  objectives: tuple[str, ...]
  settings: Mapping[str, Setting]
  make: Callable[..., Callable]
  help: str
  model_times: Callable[..., np.ndarray | None]


CFG_INTERVAL_HELP = (
    "(low, high): guide only where low <= t <= high, in the time the model is called with "
    "(DDPM: the original step index, 0 = data .. T-1 = noise; flow: SiT's t, 0 = noise .. "
    "1 = data), elsewhere the conditional rows alone run (half the cost); None = every step. "
    "From the sigma interval papers quote (EDM2: sigma in [0.34, 1.02] for DiT): DDPM: the "
    "steps t with sqrt((1 - abar_t) / abar_t) in it (DiT's linear schedule: about "
    "[100, 261]); flow: t = 1 / (1 + sigma), i.e. sigma = (1 - t) / t (about [0.495, "
    "0.746]); `Objective.time_of_sigma` computes both. Command line: --cfg_interval=LOW,HIGH "
    "or --config.sample.cfg_interval=LOW,HIGH ('none': no interval)")

# Settings every sampler reads (guidance is bound around every sampler's model).
COMMON = {
    "sampler": Setting(None, str, "the sampler's registry name"),
    "steps": Setting(None, int, "sampling steps (DDPM: respaced steps; flow: time-grid points)"),
    "cfg_scale": Setting(1.0, float, "classifier-free guidance scale; 1 = none"),
    "cfg_interval": Setting(None, tuple, CFG_INTERVAL_HELP),
    "guide_all_eps": Setting(False, bool, "guide every eps channel, not the published first 3"),
}


def check_method(method: str, choices: tuple[str, ...], what: str) -> str:
  key = str(method).lower()
  if key not in choices:
    raise ValueError(f"unknown {what} method {method!r}; expected one of {choices}")
  return key


def positive_steps(steps) -> int:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
    raise ValueError(f"sample steps must be a positive integer, got {steps!r}")
  return int(steps)


def check_grid_steps(num_steps) -> int:
  """Flow samplers take SiT's `num_steps`: the number of time-grid points (>= 2)."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
    raise ValueError(f"steps must be an integer >= 2 (time-grid points, SiT's num_steps), "
                     f"got {num_steps!r}")
  return num_steps


def grid_times(t0: float, t1: float, num_steps: int) -> np.ndarray:
  """The float32 time grid the flow loops build (`jnp.linspace`), as numpy."""
  return np.asarray(jnp.linspace(t0, t1, num_steps, dtype=jnp.float32))


def noise_source(num_steps: int, x, rng, step_noise):
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


def times(value, x):
  """The scalar time `value` for every row of x, float32 (N,)."""
  return jnp.full((x.shape[0],), value, jnp.float32)
