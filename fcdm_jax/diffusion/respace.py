"""Timestep respacing (ADM): sample with a subset of the training steps.

A spec string picks the subset: "250" (250 evenly spread steps), "25,10,5" (split the
steps into three equal sections and take 25, 10 and 5 from them), or "ddim50" (an
integer stride giving exactly 50 steps, as DDIM uses). The respaced process keeps the
alphas_cumprod of the kept steps, so its betas are 1 - abar_i / abar_{i-1}, and its model
is called on the original indices (`GaussianDiffusion.timestep_map`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from fcdm_jax.diffusion.gaussian import GaussianDiffusion, get_named_beta_schedule

DDIM_PREFIX = "ddim"


def _positive_int(text: str, spec) -> int:
  try:
    value = int(text)
  except ValueError:
    raise ValueError(f"respacing spec {spec!r}: {text!r} is not an integer step count") from None
  if value <= 0:
    raise ValueError(f"respacing spec {spec!r}: step counts must be > 0, got {value}")
  return value


def space_timesteps(num_timesteps: int, spec) -> list[int]:
  """Sorted original step indices to keep, from a spec string (or an int step count)."""
  if num_timesteps <= 0:
    raise ValueError(f"num_timesteps must be > 0, got {num_timesteps}")
  text = str(spec).strip().replace(" ", "")
  if text.startswith(DDIM_PREFIX):
    desired = _positive_int(text[len(DDIM_PREFIX):], spec)
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == desired:
        return list(range(0, num_timesteps, stride))
    raise ValueError(f"respacing spec {spec!r}: no integer stride gives exactly {desired} of "
                     f"{num_timesteps} steps")
  counts = [_positive_int(part, spec) for part in text.split(",")]
  size_per, extra = divmod(num_timesteps, len(counts))
  start, steps = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"respacing spec {spec!r}: cannot divide a section of {size} steps "
                       f"into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    position = 0.0
    for _ in range(count):
      steps.append(start + round(position))
      position += stride
    start += size
  return sorted(set(steps))


def respace(base: GaussianDiffusion, use_timesteps: Iterable[int]) -> GaussianDiffusion:
  """The process that visits only `use_timesteps` of `base`, with the same alphas_cumprod there."""
  keep = set(int(i) for i in use_timesteps)
  if not keep or min(keep) < 0 or max(keep) >= base.num_timesteps:
    raise ValueError(f"timesteps to keep must be a non-empty subset of [0, {base.num_timesteps})")
  last_alpha_cumprod = 1.0
  betas, timestep_map = [], []
  for i, alpha_cumprod in enumerate(base.alphas_cumprod):
    if i in keep:
      betas.append(1 - alpha_cumprod / last_alpha_cumprod)
      last_alpha_cumprod = alpha_cumprod
      timestep_map.append(base.timestep_map[i])
  return GaussianDiffusion(np.array(betas), timestep_map=timestep_map, var_type=base.var_type)


def spaced_diffusion(noise_schedule: str, diffusion_steps: int, spec=None,
                     var_type: str = "learned_range") -> GaussianDiffusion:
  """The training process ('linear', 1000 steps, ...) respaced by `spec` (None: all steps)."""
  base = GaussianDiffusion(get_named_beta_schedule(noise_schedule, diffusion_steps),
                           var_type=var_type)
  if spec is None:
    return base
  return respace(base, space_timesteps(diffusion_steps, spec))
