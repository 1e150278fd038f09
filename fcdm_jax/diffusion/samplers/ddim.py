"""DDIM (ADM's loop; eta = 0 deterministic) over respaced steps, as one `lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fcdm_jax.diffusion import guidance
from fcdm_jax.diffusion.gaussian import GaussianDiffusion, check_eta
from fcdm_jax.diffusion.samplers.base import Sampler, Setting, noise_source
from fcdm_jax.diffusion.samplers.ddpm import CLIP_DENOISED, RESPACING, model_times


def ddim_sample_loop(diffusion: GaussianDiffusion, model_fn, x_T, *, eta: float = 0.0, rng=None,
                     step_noise=None, clip_denoised: bool = False):
  """DDIM over the steps of `diffusion`; eta = 0 needs no randomness."""
  eta = check_eta(eta)
  num = diffusion.num_timesteps
  indices = jnp.arange(num - 1, -1, -1, dtype=jnp.int32)
  if eta == 0 and step_noise is None:
    sources, draw = jnp.zeros((num,), jnp.float32), lambda _: None
  else:
    sources, draw = noise_source(num, x_T, rng, step_noise)

  def step(x, inputs):
    i, source = inputs
    t = jnp.full((x.shape[0],), i, jnp.int32)
    out = model_fn(x, diffusion.model_time(t))
    return diffusion.ddim_sample(out, x, t, draw(source), eta, clip_denoised), None

  x, _ = jax.lax.scan(step, x_T, (indices, sources))
  return x


def make(objective, settings, guide):
  diffusion = objective.sampling_diffusion(settings)
  eta = check_eta(settings["eta"])
  clip_denoised = bool(settings["clip_denoised"])

  def sample_fn(model_fn, x_T, y, rng, step_noise=None):
    model = guidance.guided_model(model_fn, y, **guide)
    return ddim_sample_loop(diffusion, model, x_T, eta=eta, rng=rng, step_noise=step_noise,
                            clip_denoised=clip_denoised)

  return sample_fn


SAMPLER = Sampler(objectives=("ddpm",), make=make, model_times=model_times,
                  settings={"respacing": RESPACING, "clip_denoised": CLIP_DENOISED,
                            "eta": Setting(0.0, float, "DDIM eta (0 = deterministic)")},
                  help="DDIM, deterministic at eta 0")
