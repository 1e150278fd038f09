"""Gaussian diffusion against the published ADM/DiT numerics (`gaussian_diffusion.npz`).

The fixture is NCHW; our model outputs are channels-last, so arrays are moved to NHWC.
"Relative error" is measured against each array's scale (max |reference|): elements that
happen to sit near zero carry no meaningful elementwise relative error in float32.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcdm_jax.diffusion import gaussian, likelihood, objectives, respace
from fcdm_jax.diffusion.samplers import ddim as ddim_sampler, ddpm as ddpm_sampler
from helpers.reference import assert_close, load_npz, nhwc

RTOL = 1e-5       # single-step quantities
LOOP_RTOL = 1e-4  # 10-step loops, whose values grow large
SPECS = ("250", "ddim50", "10", "25,10,5")


@pytest.fixture(scope="module")
def ref(reference_dir):
  return load_npz(reference_dir, "gaussian_diffusion.npz")


@pytest.fixture(scope="module")
def diffusion():
  return respace.spaced_diffusion("linear", 1000)


def fixed_output_model(ref, seen_times):
  """The fixture's model output, recording the timesteps the model is called with."""
  def model(x, t):
    jax.debug.callback(lambda tt: seen_times.append(np.asarray(tt)), t)
    return jnp.asarray(nhwc(ref["model_out"]))
  return model


def toy_model(x, t):
  """The fixture's loop model: eps = 0.5 sin x + t/1000, v = 0.5 tanh x (t original index)."""
  eps = 0.5 * jnp.sin(x) + t[:, None, None, None] / 1000
  return jnp.concatenate([eps, 0.5 * jnp.tanh(x)], axis=-1)


def test_linear_schedule(ref, diffusion):
  np.testing.assert_allclose(diffusion.betas, ref["betas_1000"], rtol=1e-12)
  np.testing.assert_allclose(diffusion.alphas_cumprod, ref["alphas_cumprod_1000"], rtol=1e-12)


def test_cosine_schedule_follows_alpha_bar():
  betas = gaussian.get_named_beta_schedule("cosine", 1000)
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  expected = np.array([f((i + 1) / 1000) / f(0.0) for i in range(1000)])
  uncapped = betas < gaussian.COSINE_MAX_BETA
  assert uncapped[:-1].all() and betas.max() <= gaussian.COSINE_MAX_BETA
  np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], expected[:-1], rtol=1e-9)


@pytest.mark.parametrize("spec", SPECS)
def test_respacing(ref, spec):
  key = spec.replace(",", "_")
  spaced = respace.spaced_diffusion("linear", 1000, spec)
  np.testing.assert_array_equal(spaced.timestep_map, ref[f"respaced_{key}_timestep_map"])
  np.testing.assert_allclose(spaced.betas, ref[f"respaced_{key}_betas"], rtol=1e-12)


def test_respaced_model_is_called_on_original_timesteps():
  spaced = respace.spaced_diffusion("linear", 1000, "10")
  seen = []

  def model(x, t):
    assert t.dtype == jnp.float32 and t.shape == (2,)
    jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t, ordered=True)
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))

  jax.block_until_ready(jax.jit(lambda x: ddim_sampler.ddim_sample_loop(spaced, model, x))(
      jnp.zeros((2, 2, 2, 1))))
  jax.effects_barrier()
  firsts = [float(t[0]) for t in seen]
  assert firsts == [999.0, 888.0, 777.0, 666.0, 555.0, 444.0, 333.0, 222.0, 111.0, 0.0]
  assert all((t == t[0]).all() for t in seen)


def test_q_sample(ref, diffusion):
  t = jnp.asarray(ref["t"], jnp.int32)
  x_t = diffusion.q_sample(nhwc(ref["x_start"]), t, nhwc(ref["noise"]))
  assert_close(x_t, nhwc(ref["x_t"]), RTOL)


def test_training_losses(ref, diffusion):
  seen = []
  t = jnp.asarray(ref["t"], jnp.int32)
  terms = jax.jit(lambda *a: diffusion.training_losses(fixed_output_model(ref, seen), *a))(
      nhwc(ref["x_start"]), t, nhwc(ref["noise"]))
  for name in ("mse", "vb", "loss"):
    assert terms[name].shape == (4,)
    assert_close(terms[name], ref[f"loss_{name}"], RTOL)
  jax.effects_barrier()
  np.testing.assert_array_equal(seen[0], ref["t"].astype(np.float32))


def test_vb_trains_only_the_variance_and_mse_only_the_mean(ref, diffusion):
  """Hybrid loss: the VB term sees eps through stop_gradient, the MSE never sees v."""
  t = jnp.asarray(ref["t"], jnp.int32)
  out = jnp.asarray(nhwc(ref["model_out"]))

  def term(name):
    return lambda o: diffusion.training_losses(lambda x, tt: o, nhwc(ref["x_start"]), t,
                                               nhwc(ref["noise"]))[name].sum()

  c = out.shape[-1] // 2
  g_vb, g_mse = jax.jit(jax.grad(term("vb")))(out), jax.jit(jax.grad(term("mse")))(out)
  assert np.all(np.asarray(g_vb[..., :c]) == 0) and np.any(np.asarray(g_vb[..., c:]) != 0)
  assert np.all(np.asarray(g_mse[..., c:]) == 0) and np.any(np.asarray(g_mse[..., :c]) != 0)


def test_decoder_nll_gradient_is_finite_in_the_tails():
  """The 1-ulp tanh keeps gradients finite where the CDF saturates."""
  x = jnp.array([-1.0, -0.3, 0.0, 0.5, 1.0])
  grad = jax.jit(jax.grad(lambda s: likelihood.discretized_gaussian_log_likelihood(
      x, means=jnp.array([3.0, -2.0, 0.0, 40.0, -1.0]), log_scales=s).sum()))(
          jnp.full((5,), -6.0))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_p_mean_variance(ref, diffusion):
  t = jnp.asarray(ref["t"], jnp.int32)
  out = diffusion.p_mean_variance(nhwc(ref["model_out"]), nhwc(ref["x_t"]), t)
  for name in ("mean", "variance", "log_variance", "pred_xstart"):
    assert_close(out[name], nhwc(ref[f"pmv_{name}"]), RTOL)


def test_p_sample_and_ddim_step(ref, diffusion):
  t = jnp.asarray(ref["t"], jnp.int32)
  args = (nhwc(ref["model_out"]), nhwc(ref["x_t"]), t)
  assert_close(diffusion.p_sample(*args, nhwc(ref["p_sample_noise"])), nhwc(ref["p_sample"]),
               RTOL)
  assert_close(diffusion.ddim_sample(*args), nhwc(ref["ddim_sample_eta0"]), RTOL)


def test_ddim_eta1_has_the_ddpm_posterior_variance(diffusion):
  """DDIM's eta = 1 noise scale is sqrt of the posterior variance (DDIM paper, eq. 16)."""
  t = jnp.array([1, 300, 999], jnp.int32)
  x = jnp.zeros((3, 1, 1, 1))
  out = jnp.zeros((3, 1, 1, 2))
  noise = jnp.ones_like(x)
  spread = diffusion.ddim_sample(out, x, t, noise, eta=1.0) - diffusion.ddim_sample(out, x, t)
  # 1 - abar_t / abar_{t-1} = beta_t ~ 1e-4 cancels in float32 (as in the published code).
  np.testing.assert_allclose(np.asarray(spread).ravel(),
                             np.sqrt(diffusion.posterior_variance[[1, 300, 999]]), rtol=1e-3)


def test_ddim10_loop(ref):
  spaced = respace.spaced_diffusion("linear", 1000, "10")
  x = jax.jit(lambda x0: ddim_sampler.ddim_sample_loop(spaced, toy_model, x0))(
      nhwc(ref["loop_init"]))
  assert_close(x, nhwc(ref["ddim10_eta0"]), LOOP_RTOL)


def test_ddpm10_loop_with_recorded_noise(ref):
  spaced = respace.spaced_diffusion("linear", 1000, "10")
  noise = nhwc(ref["ddpm10_step_noise"])
  x = jax.jit(lambda x0, n: ddpm_sampler.ddpm_sample_loop(spaced, toy_model, x0,
                                                          step_noise=n))(
      nhwc(ref["loop_init"]), noise)
  assert_close(x, nhwc(ref["ddpm10"]), LOOP_RTOL)


def test_loops_through_the_objective_sampler(ref):
  """The trainer's entry point runs the same loops: same numbers from a config."""
  config = ml_collections.ConfigDict(dict(
      objective="ddpm", diffusion=dict(noise_schedule="linear", diffusion_steps=1000),
      model=dict(learn_sigma=True, in_channels=4)))
  objective = objectives.make_objective(config)
  model = lambda x, t, y: toy_model(x, t)
  y = jnp.zeros((4,), jnp.int32)
  ddim = objective.make_sampler(dict(sampler="ddim", steps=10, eta=0.0), null_label=None)
  ddpm = objective.make_sampler(dict(sampler="ddpm", steps=10), null_label=None)
  key = jax.random.key(0)
  assert_close(ddim(model, nhwc(ref["loop_init"]), y, key), nhwc(ref["ddim10_eta0"]), LOOP_RTOL)
  assert_close(ddpm(model, nhwc(ref["loop_init"]), y, key,
                    step_noise=nhwc(ref["ddpm10_step_noise"])), nhwc(ref["ddpm10"]), LOOP_RTOL)


def test_objective_loss_reaches_the_irreducible_error():
  """With the exact eps predictor for data N(mu, sd^2), E[mse] = E_t[Var(eps | x_t)] =
  E_t[1 - (1 - abar_t) / (abar_t sd^2 + 1 - abar_t)], t uniform on the 1000 steps (an exact
  sum). This checks the loss's t and noise sampling end to end. Tolerance: 5 standard errors
  of the mean over the examples."""
  mu, sd = np.array([0.3, -0.5]), np.array([0.4, 1.2])
  n = 20000
  config = ml_collections.ConfigDict(dict(
      objective="ddpm", diffusion=dict(noise_schedule="linear", diffusion_steps=1000),
      model=dict(learn_sigma=True, in_channels=2)))
  objective = objectives.make_objective(config)
  ab = objective.diffusion.alphas_cumprod[:, None]
  var_t = ab * sd ** 2 + 1 - ab
  gain = jnp.asarray(np.sqrt(1 - ab) / var_t, jnp.float32)
  shift = jnp.asarray(np.sqrt(ab) * mu, jnp.float32)

  def model(x, t):
    i = t.astype(jnp.int32)
    eps = gain[i][:, None, None, :] * (x - shift[i][:, None, None, :])
    return jnp.concatenate([eps, jnp.zeros_like(x)], axis=-1)

  x0 = mu + sd * np.random.default_rng(0).standard_normal((n, 1, 1, 2))
  terms = jax.jit(lambda x, k: objective.loss(model, x, k))(jnp.asarray(x0, jnp.float32),
                                                             jax.random.key(0))
  mse = np.asarray(terms["mse"], np.float64)
  expected = np.mean(1 - (1 - ab) / var_t)
  assert abs(mse.mean() - expected) < 5 * mse.std() / np.sqrt(n)
  np.testing.assert_allclose(np.asarray(terms["loss"]), mse + np.asarray(terms["vb"]), rtol=1e-6)
