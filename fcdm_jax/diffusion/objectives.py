"""The training objective named by the config, with its loss and its samplers.

`make_objective(config)` returns an object with
  loss(model_fn, x_start, rng) -> dict of per-example (N,) float32 terms ('loss', ...)
  make_sampler(sample_cfg, null_label) -> sample_fn(model_fn, x_T, y, rng, step_noise=None)
where `loss`'s model_fn(x_t, t) and `sample_fn`'s model_fn(x, t, y) return channels-last
output and t is what the network takes (DDPM: original step index as float32; flow: t in
[0, 1]). Both are pure and jit-able; a jitted sampler compiles once per input shape.
Sampler settings are validated when the sampler is made, so a bad config fails at start-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion import flow, guidance, samplers
from fcdm_jax.diffusion.gaussian import check_eta
from fcdm_jax.diffusion.respace import respace, space_timesteps, spaced_diffusion

OBJECTIVES = ("ddpm", "flow")
DDPM_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("sde", "ode")


def _sampler_name(sample_cfg, choices: tuple[str, ...], objective: str) -> str:
  name = str(sample_cfg.get("sampler", choices[0])).lower()
  if name not in choices:
    raise ValueError(f"unknown sampler {sample_cfg.get('sampler')!r} for the {objective!r} "
                     f"objective; expected one of {choices}")
  return name


def _positive_steps(sample_cfg) -> int:
  steps = sample_cfg.get("steps", None)
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
    raise ValueError(f"sample steps must be a positive integer, got {steps!r}")
  return int(steps)


def _guidance_kwargs(sample_cfg, null_label) -> dict:
  """Guidance settings of a sample config, checked against the model's null label now."""
  if null_label is not None and np.ndim(null_label) == 1:
    null_label = np.asarray(null_label, np.float32)   # the empty caption's text embedding
    if not np.all(np.isfinite(null_label)):
      raise ValueError("the null text embedding has non-finite values")
  elif null_label is not None and (np.ndim(null_label) != 0 or isinstance(null_label, bool)
                                   or int(null_label) != null_label or null_label < 0):
    raise ValueError(f"null_label must be a non-negative integer (a class), a 1-D text "
                     f"embedding, or None; got {null_label!r}")
  cfg_scale, interval = guidance.check_guidance(
      sample_cfg.get("cfg_scale", 1.0), null_label, sample_cfg.get("cfg_interval", None))
  return dict(cfg_scale=cfg_scale, null_label=null_label, interval=interval,
              guide_all_eps=bool(sample_cfg.get("guide_all_eps", False)))


class DDPMObjective:
  """ADM/DiT Gaussian diffusion: eps prediction, hybrid loss, DDPM/DDIM sampling."""

  name = "ddpm"

  def __init__(self, noise_schedule: str = "linear", diffusion_steps: int = 1000,
               learn_sigma: bool = True):
    self.diffusion_steps = diffusion_steps
    # DiT: learned-range variance with learn_sigma, otherwise the fixed large variance.
    self.diffusion = spaced_diffusion(noise_schedule, diffusion_steps,
                                      var_type="learned_range" if learn_sigma else "fixed_large")

  def loss(self, model_fn, x_start, rng):
    """Per-example 'loss' = 'mse' + 'vb' at uniform random t with fresh noise."""
    t_key, noise_key = jax.random.split(rng)
    t = jax.random.randint(t_key, (x_start.shape[0],), 0, self.diffusion.num_timesteps,
                           dtype=jnp.int32)
    noise = jax.random.normal(noise_key, x_start.shape, x_start.dtype)
    return self.diffusion.training_losses(model_fn, x_start, t, noise)

  def sampling_diffusion(self, sample_cfg):
    """The respaced process of a sample config: 'respacing' spec if given, else str(steps)."""
    spec = sample_cfg.get("respacing", None)
    if spec is None:
      spec = str(_positive_steps(sample_cfg))
    return respace(self.diffusion, space_timesteps(self.diffusion_steps, spec))

  def make_sampler(self, sample_cfg, null_label):
    """DDPM ('ddpm') or DDIM ('ddim', with eta) over the respaced steps, with guidance."""
    sampler = _sampler_name(sample_cfg, DDPM_SAMPLERS, self.name)
    diffusion = self.sampling_diffusion(sample_cfg)
    eta = check_eta(sample_cfg.get("eta", 0.0))
    clip_denoised = bool(sample_cfg.get("clip_denoised", False))
    guide = _guidance_kwargs(sample_cfg, null_label)

    def sample_fn(model_fn, x_T, y, rng, step_noise=None):
      model = guidance.guided_model(model_fn, y, **guide)
      if sampler == "ddpm":
        return samplers.ddpm_sample_loop(diffusion, model, x_T, rng=rng, step_noise=step_noise,
                                         clip_denoised=clip_denoised)
      return samplers.ddim_sample_loop(diffusion, model, x_T, eta=eta, rng=rng,
                                       step_noise=step_noise, clip_denoised=clip_denoised)

    return sample_fn


def _velocity_only(model_fn):
  """SiT-style models built with learn_sigma output [v, extra]: the velocity is the first C."""
  def velocity(x, t):
    out = model_fn(x, t)
    return out[..., :x.shape[-1]] if out.shape[-1] == 2 * x.shape[-1] else out
  return velocity


class FlowObjective:
  """SiT linear-path flow matching: velocity loss, SDE and ODE sampling, with guidance."""

  name = "flow"

  def __init__(self, train_eps: float = 0.0, sample_eps: float = 0.0):
    if not 0.0 <= train_eps < 0.5 or not 0.0 <= sample_eps < 0.5:
      raise ValueError(f"train_eps and sample_eps must be in [0, 0.5), got {train_eps}, "
                       f"{sample_eps}")
    self.train_eps = float(train_eps)
    self.sample_eps = float(sample_eps)

  def loss(self, model_fn, x_start, rng):
    """Per-example 'loss': velocity MSE at t ~ U[train_eps, 1 - train_eps], x0 ~ N(0, I)."""
    t_key, noise_key = jax.random.split(rng)
    t = flow.sample_t(t_key, x_start.shape[0], self.train_eps)
    x0 = jax.random.normal(noise_key, x_start.shape, x_start.dtype)
    return dict(loss=flow.training_loss(_velocity_only(model_fn), x_start, x0, t))

  def make_sampler(self, sample_cfg, null_label):
    """'sde' (method euler|heun, diffusion_form, diffusion_norm, last_step, last_step_size)
    or 'ode' (method euler|heun|dopri5; atol, rtol, max_steps for dopri5); `steps` counts
    time-grid points as in SiT.
    """
    sampler = _sampler_name(sample_cfg, FLOW_SAMPLERS, self.name)
    guide = _guidance_kwargs(sample_cfg, null_label)
    if sampler == "sde":
      settings = dict(
          num_steps=_positive_steps(sample_cfg),
          method=sample_cfg.get("method", "euler"),
          diffusion_form=sample_cfg.get("diffusion_form", "sigma"),
          diffusion_norm=float(sample_cfg.get("diffusion_norm", 1.0)),
          last_step=sample_cfg.get("last_step", "Mean"),
          last_step_size=float(sample_cfg.get("last_step_size", 0.04)),
          sample_eps=self.sample_eps)
      samplers.check_sde(settings["num_steps"], settings["method"], settings["diffusion_form"],
                         settings["last_step"], settings["last_step_size"], self.sample_eps)

      def sample_fn(model_fn, x_T, y, rng, step_noise=None):
        model = _velocity_only(guidance.guided_model(model_fn, y, **guide))
        return samplers.sde_sample_loop(model, x_T, rng=rng, step_noise=step_noise, **settings)

      return sample_fn

    method = samplers.check_method(sample_cfg.get("method", "heun"), samplers.ODE_METHODS, "ODE")
    if method == "dopri5":
      tolerances = dict(atol=float(sample_cfg.get("atol", 1e-6)),
                        rtol=float(sample_cfg.get("rtol", 1e-3)),
                        max_steps=int(sample_cfg.get("max_steps", 4096)))
      if tolerances["atol"] <= 0 or tolerances["rtol"] <= 0 or tolerances["max_steps"] <= 0:
        raise ValueError(f"dopri5 needs atol, rtol, max_steps > 0, got {tolerances}")
    else:
      num_steps = samplers.check_grid_steps(_positive_steps(sample_cfg))

    def sample_fn(model_fn, x_T, y, rng, step_noise=None):
      del rng  # deterministic
      if step_noise is not None:
        raise ValueError("the ODE sampler is deterministic: it takes no step_noise")
      model = _velocity_only(guidance.guided_model(model_fn, y, **guide))
      if method == "dopri5":
        return samplers.ode_sample_adaptive(model, x_T, **tolerances)
      return samplers.ode_sample_loop(model, x_T, num_steps=num_steps, method=method)

    return sample_fn


def make_objective(config):
  """The objective of a run config (`config.objective`, `.diffusion`, `.flow`, `.model`)."""
  objective = config.objective
  if objective == "ddpm":
    return DDPMObjective(noise_schedule=config.diffusion.noise_schedule,
                         diffusion_steps=config.diffusion.diffusion_steps,
                         learn_sigma=config.model.learn_sigma)
  if objective == "flow":
    return FlowObjective(train_eps=config.flow.train_eps, sample_eps=config.flow.sample_eps)
  raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
