"""The training objective named by the config, with its loss and its samplers.

`make_objective(config)` returns an object with
  loss(model_fn, x_start, rng, positions=None) -> dict of per-example (N,) float32 terms
    ('loss', ...); example i draws its time and noise from fold_in(rng, positions[i])
    (its position in the global batch; default i), so a batch split into micro-batches
    draws what it draws whole (gradient accumulation)
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
from fcdm_jax.diffusion.respace import respace, space_timesteps, spaced_diffusion
from fcdm_jax.diffusion.samplers.base import positive_steps

OBJECTIVES = ("ddpm", "flow")


def example_draws(rng, positions, n: int):
  """(t key, noise key) of each of n examples: both from fold_in(rng, position); positions
  default to 0..n-1."""
  if positions is None:
    positions = jnp.arange(n, dtype=jnp.uint32)
  keys = jax.vmap(lambda p: jax.random.split(jax.random.fold_in(rng, p)))(positions)
  return keys[:, 0], keys[:, 1]


def example_normal(keys, shape, dtype):
  """One standard normal draw of `shape` per key."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def _guidance_kwargs(settings, null_label, time_range) -> dict:
  """Guidance settings of resolved sampler settings, checked against the model's null label."""
  if null_label is not None and np.ndim(null_label) == 1:
    null_label = np.asarray(null_label, np.float32)   # the empty caption's text embedding
    if not np.all(np.isfinite(null_label)):
      raise ValueError("the null text embedding has non-finite values")
  elif null_label is not None and (np.ndim(null_label) != 0 or isinstance(null_label, bool)
                                   or int(null_label) != null_label or null_label < 0):
    raise ValueError(f"null_label must be a non-negative integer (a class), a 1-D text "
                     f"embedding, or None; got {null_label!r}")
  cfg_scale, interval = guidance.check_guidance(settings["cfg_scale"], null_label,
                                                settings["cfg_interval"], time_range)
  return dict(cfg_scale=cfg_scale, null_label=null_label, interval=interval,
              guide_all_eps=bool(settings["guide_all_eps"]))


class Objective:
  """What both objectives share: their samplers come from the registry by name, and a time
  the model is called with (`time_range`, where a guidance interval lies)."""

  name: str
  time_range: tuple[float, float]

  def time_of_sigma(self, sigma) -> np.ndarray:
    """The model time where the noise-to-signal ratio sigma (EDM's sigma: x = x0 + sigma *
    noise up to scale) is `sigma`: how a paper's guidance interval in sigma becomes
    cfg_interval."""
    raise NotImplementedError

  def make_sampler(self, sample_cfg, null_label):
    """The sampler `sample_cfg['sampler']` names (`diffusion.samplers.SAMPLERS`; default:
    the objective's first) with its settings from `sample_cfg` (defaults where absent or
    None), guided for `null_label`. Unknown keys and bad values raise here."""
    samplers.check_keys(sample_cfg.keys(), self.name)
    sampler = samplers.get(sample_cfg.get("sampler"), self.name)
    settings = samplers.resolve(sampler, sample_cfg)
    return sampler.make(self, settings, _guidance_kwargs(settings, null_label, self.time_range))


class DDPMObjective(Objective):
  """ADM/DiT Gaussian diffusion: eps prediction, hybrid loss, its samplers (DDPM, DDIM)."""

  name = "ddpm"

  def __init__(self, noise_schedule: str = "linear", diffusion_steps: int = 1000,
               learn_sigma: bool = True):
    self.diffusion_steps = diffusion_steps
    # DiT: learned-range variance with learn_sigma, otherwise the fixed large variance.
    self.diffusion = spaced_diffusion(noise_schedule, diffusion_steps,
                                      var_type="learned_range" if learn_sigma else "fixed_large")
    # The model's time: the original step index, 0 (nearly data) .. T - 1 (nearly noise).
    self.time_range = (0.0, float(diffusion_steps - 1))

  def time_of_sigma(self, sigma) -> np.ndarray:
    """The (fractional) step t where sqrt((1 - abar_t) / abar_t) = sigma, interpolated
    between steps and clipped to the time range (DiT's linear schedule: sigma 0.34 -> t
    about 100, 1.02 -> about 261)."""
    abar = np.asarray(self.diffusion.alphas_cumprod, np.float64)
    sigmas = np.sqrt((1.0 - abar) / abar)   # increasing with t
    return np.interp(np.asarray(sigma, np.float64), sigmas, np.arange(len(sigmas), dtype=float))

  def loss(self, model_fn, x_start, rng, positions=None):
    """Per-example 'loss' = 'mse' + 'vb' at uniform random t with fresh noise."""
    t_keys, noise_keys = example_draws(rng, positions, x_start.shape[0])
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.diffusion.num_timesteps,
                                              dtype=jnp.int32))(t_keys)
    noise = example_normal(noise_keys, x_start.shape[1:], x_start.dtype)
    return self.diffusion.training_losses(model_fn, x_start, t, noise)

  def sampling_diffusion(self, sample_cfg):
    """The respaced process of a sample config: 'respacing' spec if given, else str(steps)."""
    spec = sample_cfg.get("respacing", None)
    if spec is None:
      spec = str(positive_steps(sample_cfg.get("steps", None)))
    return respace(self.diffusion, space_timesteps(self.diffusion_steps, spec))


class FlowObjective(Objective):
  """SiT linear-path flow matching: velocity loss, its samplers (SDE, ODE)."""

  name = "flow"

  def __init__(self, train_eps: float = 0.0, sample_eps: float = 0.0):
    if not 0.0 <= train_eps < 0.5 or not 0.0 <= sample_eps < 0.5:
      raise ValueError(f"train_eps and sample_eps must be in [0, 0.5), got {train_eps}, "
                       f"{sample_eps}")
    self.train_eps = float(train_eps)
    self.sample_eps = float(sample_eps)
    # SiT's t: 0 is noise, 1 is data (x_t = t * x_data + (1 - t) * noise).
    self.time_range = (0.0, 1.0)

  def time_of_sigma(self, sigma) -> np.ndarray:
    """t = 1 / (1 + sigma): x_t / t = x_data + ((1 - t) / t) * noise, so sigma = (1 - t) / t
    (EDM2's [0.34, 1.02] -> t in about [0.495, 0.746])."""
    return 1.0 / (1.0 + np.asarray(sigma, np.float64))

  def loss(self, model_fn, x_start, rng, positions=None):
    """Per-example 'loss': velocity MSE at t ~ U[train_eps, 1 - train_eps], x0 ~ N(0, I)."""
    t_keys, noise_keys = example_draws(rng, positions, x_start.shape[0])
    t = jax.vmap(lambda k: flow.sample_t(k, 1, self.train_eps)[0])(t_keys)
    x0 = example_normal(noise_keys, x_start.shape[1:], x_start.dtype)
    return dict(loss=flow.training_loss(flow.velocity_only(model_fn), x_start, x0, t))


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
