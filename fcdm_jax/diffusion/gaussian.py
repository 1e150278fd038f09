"""ADM/DiT Gaussian diffusion: beta schedules, q(x_t | x_0), p(x_{t-1} | x_t), losses, one step.

Schedule constants are computed in float64 numpy and cast to float32 only when indexed,
exactly as the published code does, so that results match it to float32 rounding.
Every function takes `t` as integer indices into *this* process (0..num_timesteps-1);
a respaced process (`respace.py`) calls the model on `model_time(t)`, the original
training-step index. Model outputs are channels-last: [eps, variance values] on the
last axis when the variance is learned.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.diffusion import likelihood

NOISE_SCHEDULES = ("linear", "cosine")
# learned_range: the model's extra channels v in [-1, 1] interpolate the log variance
# between the posterior variance (v = -1) and beta (v = 1); fixed_*: no variance output.
VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")
COSINE_MAX_BETA = 0.999


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = COSINE_MAX_BETA
                        ) -> np.ndarray:
  """Betas whose cumulative product follows `alpha_bar(t)` on t in [0, 1], capped at max_beta."""
  betas = []
  for i in range(num_diffusion_timesteps):
    t1 = i / num_diffusion_timesteps
    t2 = (i + 1) / num_diffusion_timesteps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
  """'linear' (DDPM/ADM/DiT, scaled to keep its shape for any step count) or 'cosine' (iDDPM)."""
  if not isinstance(num_diffusion_timesteps, (int, np.integer)) or num_diffusion_timesteps <= 0:
    raise ValueError(f"diffusion_steps must be a positive integer, got {num_diffusion_timesteps!r}")
  if name == "linear":
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
  if name == "cosine":
    return betas_for_alpha_bar(
        num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
  raise ValueError(f"unknown noise schedule {name!r}; expected one of {NOISE_SCHEDULES}")


def _extract(arr: np.ndarray, t, ndim: int):
  """arr[t] rounded to float32 (as the published code rounds), shaped to broadcast over x."""
  values = jnp.asarray(arr.astype(np.float32))[t]
  return values.reshape(values.shape + (1,) * (ndim - 1))


class GaussianDiffusion:
  """One (possibly respaced) diffusion process: its float64 constants and the math on them.

  Immutable; methods are pure functions of arrays, safe to close over inside `jax.jit`.
  """

  def __init__(self, betas, *, timestep_map=None, var_type: str = "learned_range"):
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
      raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
      raise ValueError("betas must lie in (0, 1]")
    if var_type not in VAR_TYPES:
      raise ValueError(f"unknown variance type {var_type!r}; expected one of {VAR_TYPES}")
    n = betas.size
    self.betas = betas
    self.num_timesteps = n
    self.var_type = var_type
    self.timestep_map = (np.arange(n, dtype=np.int64) if timestep_map is None
                         else np.asarray(timestep_map, dtype=np.int64))
    if self.timestep_map.shape != (n,):
      raise ValueError(f"timestep_map has shape {self.timestep_map.shape}, expected ({n},)")

    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas, axis=0)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.log_betas = np.log(betas)
    # Variance of q(x_{t-1} | x_t, x_0); it is 0 at t = 0, so its log there is replaced by
    # the t = 1 value (a one-step process has only beta to offer).
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    first = self.posterior_variance[1] if n > 1 else betas[0]
    self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
    self.posterior_mean_coef1 = (betas * np.sqrt(self.alphas_cumprod_prev)
                                 / (1.0 - self.alphas_cumprod))
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - self.alphas_cumprod))
    # fixed_large uses beta, but the posterior variance at t = 0 for a sane decoder.
    self.fixed_large_variance = np.append(first, betas[1:])

  # --- time ---------------------------------------------------------------------------
  def model_time(self, t):
    """The timestep the model is called on: the original index, as float32."""
    return jnp.asarray(self.timestep_map.astype(np.int32))[t].astype(jnp.float32)

  # --- forward process -------------------------------------------------------------------
  def q_sample(self, x_start, t, noise):
    """Sample x_t ~ q(x_t | x_0) with the given standard normal noise."""
    return (_extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    nd = x_t.ndim
    mean = (_extract(self.posterior_mean_coef1, t, nd) * x_start
            + _extract(self.posterior_mean_coef2, t, nd) * x_t)
    return (mean, _extract(self.posterior_variance, t, nd),
            _extract(self.posterior_log_variance_clipped, t, nd))

  def predict_xstart_from_eps(self, x_t, t, eps):
    return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
            / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

  # --- reverse process ------------------------------------------------------------------
  def split_output(self, model_output, x):
    """(eps, variance values or None) from a channels-last output; checks the channel count."""
    c = x.shape[-1]
    want = 2 * c if self.var_type == "learned_range" else c
    if model_output.shape != x.shape[:-1] + (want,):
      raise ValueError(
          f"model output has shape {model_output.shape}; variance type {self.var_type!r} with "
          f"{c}-channel x {x.shape} needs {want} channels (channels last, eps first)")
    if self.var_type == "learned_range":
      return model_output[..., :c], model_output[..., c:]
    return model_output, None

  def p_mean_variance(self, model_output, x, t, clip_denoised: bool = False):
    """p(x_{t-1} | x_t) for this model output: dict of mean, variance, log_variance, pred_xstart."""
    eps, var_values = self.split_output(model_output, x)
    nd = x.ndim
    if self.var_type == "learned_range":
      min_log = _extract(self.posterior_log_variance_clipped, t, nd)
      max_log = _extract(self.log_betas, t, nd)
      frac = (var_values + 1) / 2
      log_variance = frac * max_log + (1 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      var = self.fixed_large_variance if self.var_type == "fixed_large" else self.posterior_variance
      log_var = (np.log(self.fixed_large_variance) if self.var_type == "fixed_large"
                 else self.posterior_log_variance_clipped)
      variance = jnp.broadcast_to(_extract(var, t, nd), x.shape)
      log_variance = jnp.broadcast_to(_extract(log_var, t, nd), x.shape)
    pred_xstart = self.predict_xstart_from_eps(x, t, eps)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

  def p_sample(self, model_output, x, t, noise, clip_denoised: bool = False):
    """One ancestral (DDPM) step x_t -> x_{t-1}; no noise is added where t == 0."""
    out = self.p_mean_variance(model_output, x, t, clip_denoised)
    nonzero_mask = _nonzero_mask(t, x.ndim)
    return out["mean"] + nonzero_mask * jnp.exp(0.5 * out["log_variance"]) * noise

  def ddim_sample(self, model_output, x, t, noise=None, eta: float = 0.0,
                  clip_denoised: bool = False):
    """One DDIM step x_t -> x_{t-1}; eta = 0 is deterministic, eta = 1 matches DDPM's variance.

    `noise` may be None when eta == 0 (nothing random is added then).
    """
    eta = check_eta(eta)
    out = self.p_mean_variance(model_output, x, t, clip_denoised)
    eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar = _extract(self.alphas_cumprod, t, x.ndim)
    alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.ndim)
    sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
             * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
    mean_pred = (out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
                 + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
    if eta == 0:
      return mean_pred
    if noise is None:
      raise ValueError(f"DDIM with eta={eta} needs noise")
    return mean_pred + _nonzero_mask(t, x.ndim) * sigma * noise

  # --- training -------------------------------------------------------------------------
  def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised: bool = False):
    """Per-example variational-bound term in bits/dim: KL(q || p), decoder NLL at t = 0."""
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
    kl = likelihood.normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = likelihood.mean_flat(kl) / np.log(2.0)
    decoder_nll = -likelihood.discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    decoder_nll = likelihood.mean_flat(decoder_nll) / np.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl)

  def training_losses(self, model_fn, x_start, t, noise):
    """Hybrid loss of improved DDPM / DiT: mse(eps) + vb, per example.

    The VB term sees the eps output through stop_gradient, so only the variance channels
    learn from it. With a fixed variance the VB term is reported but not trained on.
    `model_fn(x_t, model_time)` returns channels-last output.
    """
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.model_time(t))
    eps, var_values = self.split_output(model_output, x_t)
    if var_values is None:
      frozen = jax.lax.stop_gradient(model_output)
    else:
      frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
    vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
    mse = likelihood.mean_flat((noise - eps) ** 2)
    loss = mse + vb if var_values is not None else mse
    return dict(loss=loss, mse=mse, vb=vb)


def _nonzero_mask(t, ndim: int):
  """1 where t != 0, shaped to broadcast: the last step returns the mean."""
  return (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def check_eta(eta) -> float:
  """eta is a Python number (it decides at trace time whether noise is drawn)."""
  try:
    value = float(eta)
  except (TypeError, ValueError):
    value = math.nan
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"DDIM eta must be a finite number >= 0, got {eta!r}")
  return value
