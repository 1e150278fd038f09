"""Samplers: exact-model statistics, one compilation per shape, guidance, argument errors.

Exact-model tests. For data x ~ N(mu, diag sd^2) the Bayes-optimal eps / velocity
predictor is affine in x and known in closed form (below), and so is the DDPM reverse
variance, so every sampler is an affine map of Gaussian inputs and its output law is
Gaussian with moments we can propagate in float64, step by step, from the sampler's
equations (`*_law` below, independent of the code under test). Each test asserts
  1. the empirical mean and variance of N samples match that law within 5 standard
     errors (SE of the mean sqrt(V/N), of the variance V*sqrt(2/(N-1)), exact for
     Gaussian output); with 4 channels x 2 moments x ~10 samplers at 5 SE the chance of
     a false failure is below 1e-4, while any wrong coefficient moves a moment by many SE;
  2. that law is the data law up to the sampler's own discretisation bias, bounded per
     sampler below (e.g. DDPM-250 with the exact variance is exact; deterministic DDIM-50
     shrinks the variance by 6-11% on this data, as its closed form shows).
Together: the samples reproduce the data mean and variance within 5 SE + that bias.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcdm_jax.diffusion import gaussian, guidance, objectives, respace
from fcdm_jax.diffusion.samplers import ddpm
from fcdm_jax.diffusion.gaussian import GaussianDiffusion


def randn(seed, shape):
  """Test inputs from numpy (an eager jax.random.normal compiles for every new shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


MU = np.array([0.5, -1.0, 0.0, 2.0])
SD = np.array([0.5, 1.0, 1.5, 0.75])
N = 32768
Z_MAX = 5.0


def ddpm_objective(learn_sigma=True):
  return objectives.make_objective(ml_collections.ConfigDict(dict(
      objective="ddpm", diffusion=dict(noise_schedule="linear", diffusion_steps=1000),
      model=dict(learn_sigma=learn_sigma, in_channels=4))))


def flow_objective(sample_eps=0.0):
  return objectives.make_objective(ml_collections.ConfigDict(dict(
      objective="flow", flow=dict(train_eps=0.0, sample_eps=sample_eps),
      model=dict(learn_sigma=False, in_channels=4))))


# --- exact models ----------------------------------------------------------------------------
def exact_ddpm_tables(d: GaussianDiffusion):
  """Per respaced step: eps gain, sqrt(abar) mu, learned-range v and the true reverse variance."""
  ab = d.alphas_cumprod[:, None]
  var_t = ab * SD ** 2 + 1 - ab
  x0_var = SD ** 2 * (1 - ab) / var_t  # Var[x0 | x_t]
  true_var = d.posterior_variance[:, None] + d.posterior_mean_coef1[:, None] ** 2 * x0_var
  lo, hi = d.posterior_log_variance_clipped[:, None], d.log_betas[:, None]
  v = 2 * (np.log(true_var) - lo) / (hi - lo) - 1
  return np.sqrt(1 - ab) / var_t, np.sqrt(ab) * MU, v, true_var


def exact_ddpm_model(d: GaussianDiffusion):
  """eps = E[eps | x_t] and v giving the exact reverse variance; t is the original index."""
  gain, shift, v, _ = (jnp.asarray(a, jnp.float32) for a in exact_ddpm_tables(d))
  timestep_map = jnp.asarray(d.timestep_map, jnp.int32)

  def model(x, t, y):
    i = jnp.searchsorted(timestep_map, t.astype(jnp.int32))
    eps = gain[i][:, None, None, :] * (x - shift[i][:, None, None, :])
    return jnp.concatenate([eps, jnp.broadcast_to(v[i][:, None, None, :], x.shape)], axis=-1)

  return model


def velocity_coefficients(t):
  """v(x, t) = k x + c for the linear path from N(0, 1) to N(MU, SD^2)."""
  var_t = t ** 2 * SD ** 2 + (1 - t) ** 2
  k = (t * SD ** 2 - (1 - t)) / var_t
  return k, MU - k * t * MU


def exact_velocity_model(x, t, y):
  t = t[:, None, None, None]
  var_t = t ** 2 * SD ** 2 + (1 - t) ** 2
  k = (t * SD ** 2 - (1 - t)) / var_t
  return (k * x + (MU - k * t * MU)).astype(jnp.float32)


# --- closed-form output laws (float64) ----------------------------------------------------------
def ddpm_law(d: GaussianDiffusion):
  """Ancestral sampling with the exact model, from N(0, 1): x' = A x + B + noise of true_var."""
  _, _, _, true_var = exact_ddpm_tables(d)
  m, var = np.zeros(4), np.ones(4)
  for i in reversed(range(d.num_timesteps)):
    ab = d.alphas_cumprod[i]
    g = np.sqrt(ab) * SD ** 2 / (ab * SD ** 2 + 1 - ab)  # x0_hat = MU + g (x - sqrt(ab) MU)
    c1, c2 = d.posterior_mean_coef1[i], d.posterior_mean_coef2[i]
    a, b = c1 * g + c2, c1 * (MU - g * np.sqrt(ab) * MU)
    m, var = a * m + b, a ** 2 * var + (true_var[i] if i > 0 else 0.0)
  return m, var


def ddim_law(d: GaussianDiffusion, eta: float):
  """x' = sqrt(ab') x0_hat + sqrt(1 - ab' - s^2) eps_hat + s z, both hats affine in x."""
  m, var = np.zeros(4), np.ones(4)
  for i in reversed(range(d.num_timesteps)):
    ab, abp = d.alphas_cumprod[i], d.alphas_cumprod_prev[i]
    var_t = ab * SD ** 2 + 1 - ab
    s2 = eta ** 2 * (1 - abp) / (1 - ab) * (1 - ab / abp) if i > 0 else 0.0
    a = (np.sqrt(abp * ab) * SD ** 2 + np.sqrt((1 - abp - s2) * (1 - ab))) / var_t
    m, var = a * m + (np.sqrt(abp) * MU - a * np.sqrt(ab) * MU), a ** 2 * var + s2
  return m, var


def sde_drift_coefficients(t, w):
  """Drift v + w * score = a x + b, with score = (t v - x) / (1 - t)."""
  k, c = velocity_coefficients(t)
  return k + w * (t * k - 1) / (1 - t), c + w * t * c / (1 - t)


def diffusion_w(form, t):
  if form in ("sigma", "linear"):
    return 1 - t
  if form == "constant":
    return 1.0
  assert form == "SBDM"
  return (1 - t) / t


def flow_sde_law(steps, method, form, last_step, last_step_size, sample_eps=0.0):
  """SiT's SDE sampler from N(0, 1) on linspace(t0, t1, steps), then its last step."""
  t0 = sample_eps if form == "SBDM" else 0.0
  t1 = 1 - last_step_size if last_step else 1 - sample_eps
  ts = np.linspace(t0, t1, steps)
  dt = ts[1] - ts[0]
  m, var = np.zeros(4), np.ones(4)
  for t in ts[:-1]:
    w = diffusion_w(form, t)
    if method == "euler":
      a, b = sde_drift_coefficients(t, w)
      m, var = m + (a * m + b) * dt, (1 + a * dt) ** 2 * var + 2 * w * dt
    else:  # Heun: noise first, then a trapezoidal drift step
      var = var + 2 * w * dt
      a1, b1 = sde_drift_coefficients(t, w)
      a2, b2 = sde_drift_coefficients(t + dt, diffusion_w(form, t + dt))
      a = 1 + dt / 2 * (a1 + a2 * (1 + dt * a1))
      m, var = a * m + dt / 2 * (b1 + a2 * dt * b1 + b2), a ** 2 * var
  if last_step == "Mean":
    a, b = sde_drift_coefficients(t1, diffusion_w(form, t1))
    a, b = 1 + a * last_step_size, b * last_step_size
  elif last_step in ("Euler", "Tweedie"):  # Tweedie = x + (1 - t1) v on this path
    h = last_step_size if last_step == "Euler" else 1 - t1
    k, c = velocity_coefficients(t1)
    a, b = 1 + k * h, c * h
  else:
    a, b = 1.0, 0.0
  return a * m + b, a ** 2 * var


def flow_ode_law(steps, method):
  ts = np.linspace(0.0, 1.0, steps)
  m, var = np.zeros(4), np.ones(4)
  for t, t_next in zip(ts[:-1], ts[1:]):
    dt = t_next - t
    k1, c1 = velocity_coefficients(t)
    if method == "euler":
      a, b = 1 + dt * k1, dt * c1
    else:
      k2, c2 = velocity_coefficients(t_next)
      a, b = 1 + dt / 2 * (k1 + k2 * (1 + dt * k1)), dt / 2 * (c1 + k2 * dt * c1 + c2)
    m, var = a * m + b, a ** 2 * var
  return m, var


# --- the checks --------------------------------------------------------------------------------
def check_samples(samples, law, var_bias_bound, mean_bias_bound=0.015):
  samples = np.asarray(samples, np.float64).reshape(-1, 4)
  n = samples.shape[0]
  m, var = law
  mean, emp_var = samples.mean(0), samples.var(0, ddof=1)
  # 1. the samples follow the sampler's closed-form law (statistical: 5 SE)
  np.testing.assert_array_less(np.abs(mean - m), Z_MAX * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(emp_var - var), Z_MAX * var * np.sqrt(2 / (n - 1)))
  # 2. that law is the data law up to the sampler's discretisation bias
  assert np.all(np.abs(m - MU) <= mean_bias_bound * SD), (m, MU)
  assert np.all(np.abs(var / SD ** 2 - 1) <= var_bias_bound), (var, SD ** 2)


@pytest.fixture(scope="module")
def noise():
  return randn(0, (N, 1, 1, 4))


@pytest.fixture(scope="module")
def labels():
  return jnp.zeros((N,), jnp.int32)


# Bias bounds: the largest |variance ratio - 1| of the closed-form law over the four
# channels, rounded up. DDPM with the exact variance is exact but for the last step, which
# returns the mean (a 1e-4 / sd^2 variance deficit). DDIM's deterministic steps shrink the
# variance (Cauchy-Schwarz on each step's two coefficients): by up to 11% here at 50 steps,
# still 0.6% at 1000 - a property of DDIM, not of this code - and leave 1.3% sd of the prior's
# mean error (N(0, 1) vs q(x_T)) in the mean (hence the mean bound 0.015 sd). DDIM with
# eta = 1 adds the posterior variance, which is less than the true reverse variance of a
# coarse step: 5.6% short at 250 steps.
@pytest.mark.parametrize("sample_cfg, var_bias_bound", [
    (dict(sampler="ddpm", steps=250), 0.002),
    (dict(sampler="ddim", steps=50, eta=0.0), 0.12),
    (dict(sampler="ddim", respacing="ddim250", eta=1.0), 0.06),
])
def test_gaussian_samplers_reproduce_the_data(sample_cfg, var_bias_bound, noise, labels):
  objective = ddpm_objective()
  d = objective.sampling_diffusion(sample_cfg)
  sample = jax.jit(objective.make_sampler(sample_cfg, null_label=None), static_argnums=0)
  out = sample(exact_ddpm_model(d), noise, labels, jax.random.key(1))
  if sample_cfg["sampler"] == "ddpm":
    law = ddpm_law(d)
  else:
    law = ddim_law(d, sample_cfg["eta"])
  check_samples(out, law, var_bias_bound)


# Flow bias bounds: the published SDE stops at t1 = 0.96 and takes one noiseless "Mean" step
# of 0.04, which removes about 2 w dt = 0.0032 of variance (2.5% at sd = 0.5); Euler ODE is
# first order (1.5% at 250 points), Heun second order (0.3% at 50).
@pytest.mark.parametrize("sample_cfg, sample_eps, var_bias_bound", [
    (dict(sampler="sde", steps=250, method="euler", diffusion_form="sigma", last_step="Mean",
          last_step_size=0.04), 0.0, 0.03),
    (dict(sampler="sde", steps=250, method="heun", diffusion_form="SBDM", last_step="Tweedie",
          last_step_size=0.04), 0.04, 0.03),
    (dict(sampler="sde", steps=250, method="euler", diffusion_form="linear", last_step="Euler",
          last_step_size=0.04), 0.0, 0.03),
    (dict(sampler="sde", steps=250, method="euler", diffusion_form="constant", last_step=None),
     0.0, 0.01),
    (dict(sampler="ode", steps=250, method="euler"), 0.0, 0.02),
    (dict(sampler="ode", steps=50, method="heun"), 0.0, 0.003),
])
def test_flow_samplers_reproduce_the_data(sample_cfg, sample_eps, var_bias_bound, noise, labels):
  objective = flow_objective(sample_eps)
  sample = jax.jit(objective.make_sampler(sample_cfg, null_label=None), static_argnums=0)
  out = sample(exact_velocity_model, noise, labels, jax.random.key(2))
  if sample_cfg["sampler"] == "sde":
    law = flow_sde_law(sample_cfg["steps"], sample_cfg["method"], sample_cfg["diffusion_form"],
                       sample_cfg["last_step"], sample_cfg.get("last_step_size", 0.0), sample_eps)
  else:
    law = flow_ode_law(sample_cfg["steps"], sample_cfg["method"])
  check_samples(out, law, var_bias_bound)


def test_adaptive_ode_reproduces_the_data(noise, labels):
  """dopri5 solves the exact flow, whose law is the data law; rtol 1e-5 makes its error
  (~1e-5 relative per sample) negligible next to the 5-SE statistical tolerance."""
  sample_cfg = dict(sampler="ode", method="dopri5", rtol=1e-5, atol=1e-6)
  sample = jax.jit(flow_objective().make_sampler(sample_cfg, null_label=None), static_argnums=0)
  out = sample(exact_velocity_model, noise, labels, None)
  check_samples(out, (MU, SD ** 2), var_bias_bound=0.0)  # law == data law: the 5-SE check


# --- compilation -------------------------------------------------------------------------------
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.mark.parametrize("objective, sample_cfg, out_mult", [
    ("ddpm", dict(sampler="ddpm", steps=250), 2),
    ("ddpm", dict(sampler="ddim", steps=250, cfg_scale=4.0), 2),
    ("flow", dict(sampler="sde", steps=250), 1),
    ("flow", dict(sampler="ode", method="dopri5"), 1),
])
def test_sampler_compiles_once_per_shape(objective, sample_cfg, out_mult):
  """The trainer's usage: params are jit arguments, the model closes over them."""
  obj = ddpm_objective() if objective == "ddpm" else flow_objective()
  sample_fn = obj.make_sampler(sample_cfg, null_label=10)
  traces = []

  def apply(params, x, t, y):
    traces.append(x.shape)  # a Python side effect: runs only while tracing
    out = params["scale"] * x + 1e-3 * y[:, None, None, None]
    return jnp.concatenate([out] * out_mult, axis=-1)

  sample = jax.jit(lambda params, x, y, rng: sample_fn(
      lambda x, t, y: apply(params, x, t, y), x, y, rng))
  calls = [({"scale": jnp.float32(s)}, randn(i, (b, 4, 4, 4)),
            jnp.arange(b, dtype=jnp.int32), jax.random.key(10 + i))
           for i, (s, b) in enumerate([(-0.1, 2), (-0.2, 2), (-0.1, 3)])]
  compiles = []

  def on_event(event, duration, **kwargs):
    if event == BACKEND_COMPILE_EVENT:
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    jax.block_until_ready(sample(*calls[0]))
    first = len(traces)
    assert len(compiles) == 1
    # The loop is not unrolled: the model is traced a few times (scan body, last step,
    # solver stages), not once per step.
    assert 1 <= first <= 9
    jax.block_until_ready(sample(*calls[1]))  # new values, same shapes: nothing recompiles
    assert len(traces) == first and len(compiles) == 1
    jax.block_until_ready(sample(*calls[2]))  # a new batch size compiles once more
    assert len(traces) == 2 * first and len(compiles) == 2
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)


# --- guidance ----------------------------------------------------------------------------------
def labelled_model(x, t, y):
  """A model whose 8 output channels depend on x, t and the label."""
  h = jnp.sin(x + 0.1 * y[:, None, None, None]) + 1e-3 * t[:, None, None, None]
  return jnp.concatenate([h, jnp.tanh(x) * (1 + y[:, None, None, None])], axis=-1)


@pytest.mark.parametrize("guide_all_eps, guided", [(False, 3), (True, 4)])
def test_guided_model_runs_cond_and_null_halves(guide_all_eps, guided):
  seen = {}

  def model(x, t, y):
    seen.update(x=x, t=t, y=y)
    return labelled_model(x, t, y)

  x = randn(3, (2, 2, 2, 4))
  t = jnp.array([5.0, 5.0])
  y = jnp.array([3, 7])
  out = guidance.guided_model(model, y, cfg_scale=2.5, null_label=10,
                              guide_all_eps=guide_all_eps)(x, t)
  np.testing.assert_array_equal(np.asarray(seen["x"]), np.concatenate([x, x]))
  np.testing.assert_array_equal(np.asarray(seen["y"]), [3, 7, 10, 10])
  np.testing.assert_array_equal(np.asarray(seen["t"]), [5.0] * 4)
  cond, uncond = labelled_model(x, t, y), labelled_model(x, t, jnp.array([10, 10]))
  expected = np.asarray(cond).copy()
  expected[..., :guided] = uncond[..., :guided] + 2.5 * (cond[..., :guided] - uncond[..., :guided])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)


def test_guidance_interval_keeps_the_conditional_output_outside():
  x = randn(4, (2, 2, 2, 4))
  y = jnp.array([1, 2])
  f = guidance.guided_model(labelled_model, y, cfg_scale=4.0, null_label=10,
                            interval=(100.0, 500.0))
  plain = guidance.guided_model(labelled_model, y, cfg_scale=4.0, null_label=10)
  t = jnp.array([50.0, 300.0])  # first example outside, second inside
  out = np.asarray(f(x, t))
  np.testing.assert_array_equal(out[0], np.asarray(labelled_model(x, t, y))[0])
  np.testing.assert_array_equal(out[1], np.asarray(plain(x, t))[1])


@pytest.mark.parametrize("objective, sample_cfg", [
    ("ddpm", dict(sampler="ddim", steps=20, eta=0.0)),
    ("ddpm", dict(sampler="ddpm", steps=20)),
    ("flow", dict(sampler="sde", steps=20)),
    ("flow", dict(sampler="ode", steps=20, method="heun")),
])
def test_every_sampler_applies_guidance(objective, sample_cfg):
  """A guided sampler = the unguided sampler on the hand-guided model (same noise)."""
  obj = ddpm_objective() if objective == "ddpm" else flow_objective()
  model = labelled_model if objective == "ddpm" else (
      lambda x, t, y: labelled_model(x, t, y)[..., :4])
  x = randn(5, (3, 2, 2, 4))
  y = jnp.array([0, 4, 9])
  draws = {"ddpm": 20, "sde": 19}.get(sample_cfg["sampler"])
  noise = None if draws is None else randn(6, (draws,) + x.shape)

  def hand_guided(x, t, y):
    c, u = model(x, t, y), model(x, t, jnp.full_like(y, 10))
    return c.at[..., :3].set(u[..., :3] + 3.0 * (c[..., :3] - u[..., :3]))

  guided = obj.make_sampler(dict(sample_cfg, cfg_scale=3.0), null_label=10)
  reference = obj.make_sampler(dict(sample_cfg, cfg_scale=1.0), null_label=None)
  out = jax.jit(lambda x, n: guided(model, x, y, None, step_noise=n))(x, noise)
  expected = jax.jit(lambda x, n: reference(hand_guided, x, y, None, step_noise=n))(x, noise)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-4, atol=1e-4)
  unguided = jax.jit(lambda x, n: reference(model, x, y, None, step_noise=n))(x, noise)
  assert np.abs(np.asarray(out) - np.asarray(unguided)).max() > 1e-2


# --- bad arguments -----------------------------------------------------------------------------
def config_error(objective, **overrides):
  config = ml_collections.ConfigDict(dict(
      objective=objective, diffusion=dict(noise_schedule="linear", diffusion_steps=1000),
      flow=dict(train_eps=0.0, sample_eps=0.0), model=dict(learn_sigma=True, in_channels=4)))
  config.update(overrides)
  return objectives.make_objective(config)


@pytest.mark.parametrize("build, message", [
    (lambda: gaussian.get_named_beta_schedule("quadratic", 1000), "unknown noise schedule"),
    (lambda: config_error("ddpm", diffusion=dict(noise_schedule="sqrt", diffusion_steps=1000)),
     "unknown noise schedule"),
    (lambda: gaussian.get_named_beta_schedule("linear", 0), "diffusion_steps"),
    (lambda: config_error("score"), "unknown objective"),
    (lambda: respace.space_timesteps(1000, "2000"), "cannot divide a section of 1000 steps"),
    (lambda: respace.space_timesteps(25, "10,20"), "cannot divide a section of 12 steps into 20"),
    (lambda: respace.space_timesteps(1000, "ddim999"), "no integer stride"),
    (lambda: respace.space_timesteps(1000, "10,abc"), "not an integer"),
    (lambda: respace.space_timesteps(1000, "0"), "must be > 0"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="ddpm", steps=0), None),
     "steps must be a positive integer"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="ddim", steps=-5), None),
     "steps must be a positive integer"),
    (lambda: flow_objective().make_sampler(dict(sampler="sde", steps=1), None),
     "steps must be an integer >= 2"),
    (lambda: flow_objective().make_sampler(dict(sampler="ode", steps=0, method="euler"), None),
     "steps must be a positive integer"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="ddim", steps=50, eta=-0.5), None),
     "eta must be a finite number >= 0"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="ddpm", steps=50, cfg_scale=1.5), None),
     "needs a null"),
    (lambda: flow_objective().make_sampler(dict(sampler="ode", steps=50, cfg_scale=4.0), None),
     "needs a null"),
    (lambda: guidance.guided_model(labelled_model, jnp.zeros((1,), jnp.int32), cfg_scale=2.0,
                                   null_label=None), "needs a null"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="ddpm", steps=50, cfg_interval=(5, 1)),
                                           None), r"cfg_interval=\(5, 1\) is reversed"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="ddpm", steps=50,
                                                cfg_interval=(100, 1000)), None),
     r"cfg_interval=\(100, 1000\) lies outside the objective's time range \[0, 999\]"),
    (lambda: flow_objective().make_sampler(dict(sampler="ode", steps=50,
                                                cfg_interval=(0.2, 1.5)), None),
     r"cfg_interval=\(0.2, 1.5\) lies outside the objective's time range \[0, 1\]"),
    (lambda: flow_objective().make_sampler(dict(sampler="ode", steps=50,
                                                cfg_interval=(0.2, 0.3, 0.4)), None),
     r"cfg_interval must be two numbers LOW,HIGH"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="sde", steps=50), None),
     "sampler 'sde' does not serve the 'ddpm' objective"),
    (lambda: flow_objective().make_sampler(dict(sampler="ddim", steps=50), None),
     "sampler 'ddim' does not serve the 'flow' objective"),
    (lambda: flow_objective().make_sampler(dict(sampler="sde", steps=50, diffusion_form="cubic"),
                                           None), "unknown diffusion form"),
    (lambda: flow_objective().make_sampler(dict(sampler="sde", steps=50, last_step="Median"),
                                           None), "unknown last step"),
    (lambda: flow_objective().make_sampler(dict(sampler="sde", steps=50, method="rk4"), None),
     "unknown SDE method"),
    (lambda: flow_objective().make_sampler(dict(sampler="ode", steps=50, method="rk4"), None),
     "unknown ODE method"),
    (lambda: flow_objective().make_sampler(dict(sampler="sde", steps=50, diffusion_form="SBDM"),
                                           None), "sample_eps > 0"),
    (lambda: flow_objective().make_sampler(dict(sampler="sde", steps=50, method="heun",
                                                last_step=None), None), "Heun SDE"),
    (lambda: flow_objective().make_sampler(dict(sampler="sde", steps=50, last_step_size=0.0),
                                           None), "last_step_size"),
    (lambda: flow_objective().make_sampler(dict(sampler="ode", method="dopri5", rtol=0.0), None),
     "atol, rtol, max_steps > 0"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="ddim", steps=10), -1), "null_label"),
])
def test_bad_arguments_raise_clear_errors(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_model_output_channels_are_checked():
  d = respace.spaced_diffusion("linear", 1000, "10")
  with pytest.raises(ValueError, match="needs 8 channels"):
    ddpm.ddpm_sample_loop(d, lambda x, t: x, jnp.zeros((1, 2, 2, 4)), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="one draw per step"):
    ddpm.ddpm_sample_loop(d, lambda x, t: jnp.concatenate([x, x], -1), jnp.zeros((1, 2, 2, 4)),
                          step_noise=jnp.zeros((9, 1, 2, 2, 4)))
  with pytest.raises(ValueError, match="PRNG key"):
    ddpm.ddpm_sample_loop(d, lambda x, t: jnp.concatenate([x, x], -1), jnp.zeros((1, 2, 2, 4)))


def test_fixed_variance_objective():
  """learn_sigma=False: C output channels, DiT's fixed large variance, loss = mse only."""
  objective = ddpm_objective(learn_sigma=False)
  x = randn(7, (4, 2, 2, 4))
  terms = jax.jit(lambda x, k: objective.loss(lambda x, t: 0.5 * x, x, k))(x, jax.random.key(8))
  np.testing.assert_array_equal(np.asarray(terms["loss"]), np.asarray(terms["mse"]))
  assert np.all(np.isfinite(np.asarray(terms["vb"])))
  sample = objective.make_sampler(dict(sampler="ddpm", steps=10), None)
  out = jax.jit(lambda x, n: sample(lambda x, t, y: 0.5 * x, x, jnp.zeros((4,), jnp.int32), None,
                                    step_noise=n))(x, randn(9, (10,) + x.shape))
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


def test_a_sampler_is_one_registry_entry(monkeypatch):
  """Registering a sampler makes it a name `make_sampler`, the config sections and the errors
  know, with its own settings and their defaults; nothing else changes."""
  from fcdm_jax import config_base
  from fcdm_jax.diffusion import samplers
  from fcdm_jax.diffusion.samplers.base import Sampler, Setting

  def make(objective, settings, guide):
    diffusion = objective.sampling_diffusion(settings)
    model = lambda model_fn, y: guidance.guided_model(model_fn, y, **guide)
    return lambda model_fn, x_T, y, rng, step_noise=None: ddpm.ddpm_sample_loop(
        diffusion, model(model_fn, y), x_T, rng=rng, step_noise=step_noise,
        clip_denoised=settings["clip_x0"])

  monkeypatch.setitem(samplers.SAMPLERS, "ancestral", Sampler(
      objectives=("ddpm",), make=make, help="DDPM under another name",
      model_times=ddpm.model_times,
      settings={"respacing": ddpm.RESPACING, "clip_x0": Setting(True, bool, "clip x0")}))
  assert samplers.names("ddpm") == ("ddpm", "ddim", "dpmpp_2m", "unipc", "ancestral")
  assert samplers.names("flow") == ("sde", "ode", "dpmpp_2m", "unipc")
  config = config_base.get_config("S", 256, "ddpm")
  assert config.sample.clip_x0 is True and config.eval.clip_x0 is None
  assert samplers.resolve(samplers.SAMPLERS["ancestral"], dict(steps=5))["clip_x0"] is True

  x, noise = randn(1, (2, 4, 4, 4)), randn(2, (5, 2, 4, 4, 4))
  model_fn = lambda x, t, y: jnp.concatenate([0.3 * x, jnp.zeros_like(x)], -1)
  labels = jnp.zeros((2,), jnp.int32)
  ours = ddpm_objective().make_sampler(dict(sampler="ancestral", steps=5, clip_x0=False), None)
  theirs = ddpm_objective().make_sampler(dict(sampler="ddpm", steps=5), None)
  np.testing.assert_array_equal(ours(model_fn, x, labels, None, noise),
                                theirs(model_fn, x, labels, None, noise))
  with pytest.raises(ValueError, match=r"unknown sampler 'dpm'; expected one of \('ddpm', "
                                       r"'ddim', 'sde', 'ode', 'dpmpp_2m', 'unipc', "
                                       r"'ancestral'\)"):
    ddpm_objective().make_sampler(dict(sampler="dpm", steps=5), None)
  with pytest.raises(ValueError, match=r"\['clip_x0'\] for the 'flow' objective"):
    flow_objective().make_sampler(dict(sampler="ode", steps=5, clip_x0=True), None)


def test_settings_two_samplers_read_with_different_defaults_default_to_each_sampler():
  """`method` is 'euler' for the SDE and 'heun' for the ODE: the flow sections declare it
  unset, so switching the sampler keeps each one's default."""
  from fcdm_jax.diffusion import samplers
  declared = samplers.declared_settings("flow")
  assert declared["method"].default is None and declared["last_step"].default == "Mean"
  assert samplers.resolve(samplers.get("ode", "flow"), dict(method=None))["method"] == "heun"
  assert samplers.resolve(samplers.get("sde", "flow"), {})["method"] == "euler"
  # last_step=None is a value (no last step), not "the default".
  assert samplers.resolve(samplers.get("sde", "flow"), dict(last_step=None))["last_step"] is None
  assert samplers.resolve(samplers.get("sde", "flow"), {})["last_step"] == "Mean"
