"""DDPM ancestral sampling (ADM/DiT) over respaced steps, as one `lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion import guidance
from fcdm_jax.diffusion.gaussian import GaussianDiffusion
from fcdm_jax.diffusion.samplers.base import Sampler, Setting, noise_source

RESPACING = Setting(None, str, "ADM respacing spec ('250', 'ddim50', '25,10,5'); None: "
                    "str(steps)")
CLIP_DENOISED = Setting(False, bool, "clip the predicted x0 to [-1, 1] (pixel models)")


def ddpm_sample_loop(diffusion: GaussianDiffusion, model_fn, x_T, *, rng=None, step_noise=None,
                     clip_denoised: bool = False):
  """Ancestral sampling over every step of `diffusion` (respaced: its steps), t = T-1 .. 0.

  `model_fn(x, t)` takes the original step index as float32 and returns channels-last output.
  """
  num = diffusion.num_timesteps
  sources, draw = noise_source(num, x_T, rng, step_noise)

  def step(x, inputs):
    i, source = inputs
    t = jnp.full((x.shape[0],), i, jnp.int32)
    out = model_fn(x, diffusion.model_time(t))
    return diffusion.p_sample(out, x, t, draw(source), clip_denoised), None

  indices = jnp.arange(num - 1, -1, -1, dtype=jnp.int32)
  x, _ = jax.lax.scan(step, x_T, (indices, sources))
  return x


def make(objective, settings, guide):
  diffusion = objective.sampling_diffusion(settings)
  clip_denoised = bool(settings["clip_denoised"])

  def sample_fn(model_fn, x_T, y, rng, step_noise=None):
    model = guidance.guided_model(model_fn, y, **guide)
    return ddpm_sample_loop(diffusion, model, x_T, rng=rng, step_noise=step_noise,
                            clip_denoised=clip_denoised)

  return sample_fn


def model_times(objective, settings) -> np.ndarray:
  """One evaluation per respaced step, at its original index, from the noisiest down."""
  return objective.sampling_diffusion(settings).timestep_map[::-1].astype(np.float32)


SAMPLER = Sampler(objectives=("ddpm",), make=make, model_times=model_times,
                  settings={"respacing": RESPACING, "clip_denoised": CLIP_DENOISED},
                  help="DDPM ancestral sampling (the paper's FID protocol)")
