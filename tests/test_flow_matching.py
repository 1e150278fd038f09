"""Flow matching (SiT linear path) against `flow_matching.npz`, plus its SDE/ODE pieces.

The fixture is NCHW; arrays are moved to NHWC. Relative error is measured against each
array's scale (max |reference|).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcdm_jax.diffusion import flow, objectives, ode
from fcdm_jax.diffusion.samplers import ode as ode_sampler, sde as sde_sampler
from helpers.reference import assert_close, load_npz, nhwc

RTOL = 1e-5
LOOP_RTOL = 1e-4


@pytest.fixture(scope="module")
def ref(reference_dir):
  return load_npz(reference_dir, "flow_matching.npz")


def randn(seed, shape):
  """Test inputs from numpy (an eager jax.random.normal compiles for every new shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def flow_config(**flow_fields):
  return ml_collections.ConfigDict(dict(
      objective="flow", flow=dict(dict(train_eps=0.0, sample_eps=0.0), **flow_fields),
      model=dict(learn_sigma=False, in_channels=4)))


def toy_velocity(x, t):
  """The fixture's velocity model: v = -x + cos(3t)."""
  return -x + jnp.cos(3 * t)[:, None, None, None]


def test_path(ref):
  xt, ut = flow.path(nhwc(ref["x0_noise"]), nhwc(ref["x1_data"]), jnp.asarray(ref["t"]))
  assert_close(xt, nhwc(ref["xt"]), RTOL)
  assert_close(ut, nhwc(ref["ut"]), RTOL)


def test_loss(ref):
  seen = []

  def model(x, t):
    jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t)
    return jnp.asarray(nhwc(ref["model_out"]))

  loss = jax.jit(lambda *a: flow.training_loss(model, *a))(
      nhwc(ref["x1_data"]), nhwc(ref["x0_noise"]), jnp.asarray(ref["t"]))
  assert_close(loss, ref["loss"], RTOL)
  jax.effects_barrier()
  np.testing.assert_array_equal(seen[0], ref["t"])  # t passed unscaled, in [0, 1]


def test_sde_euler_trajectory_with_recorded_noise(ref):
  run = jax.jit(lambda x, n: sde_sampler.sde_sample_loop(
      toy_velocity, x, num_steps=10, method="Euler", diffusion_form="sigma", last_step="Mean",
      last_step_size=0.04, step_noise=n, return_trajectory=True))
  final, trajectory = run(nhwc(ref["sde_init"]), nhwc(ref["sde_euler10_step_noise"]))
  assert trajectory.shape == (10, 4, 8, 8, 4)
  for i in range(10):
    assert_close(trajectory[i], nhwc(ref["sde_euler10_trajectory"][i]), LOOP_RTOL)
  assert_close(final, nhwc(ref["sde_euler10_sigma_mean004_final"]), LOOP_RTOL)


def test_sde_through_the_objective_sampler(ref):
  objective = objectives.make_objective(flow_config())
  sample = objective.make_sampler(dict(sampler="sde", steps=10, diffusion_form="sigma",
                                        last_step="Mean", last_step_size=0.04), null_label=None)
  final = jax.jit(lambda x, n: sample(lambda x, t, y: toy_velocity(x, t), x,
                                      jnp.zeros((4,), jnp.int32), None, step_noise=n))(
      nhwc(ref["sde_init"]), nhwc(ref["sde_euler10_step_noise"]))
  assert_close(final, nhwc(ref["sde_euler10_sigma_mean004_final"]), LOOP_RTOL)


@pytest.mark.parametrize("form, expected", [
    ("constant", lambda t, n: n + 0 * t),
    ("SBDM", lambda t, n: n * (1 - t) / t),
    ("sigma", lambda t, n: n * (1 - t)),
    ("linear", lambda t, n: n * (1 - t)),
    ("decreasing", lambda t, n: 0.25 * (n * np.cos(np.pi * t) + 1) ** 2),
    ("increasing-decreasing", lambda t, n: n * np.sin(np.pi * t) ** 2),
    ("inccreasing-decreasing", lambda t, n: n * np.sin(np.pi * t) ** 2),  # SiT's spelling
])
def test_diffusion_forms(form, expected):
  t = np.array([0.1, 0.25, 0.5, 0.9], np.float32)
  x = jnp.zeros((4, 1, 1, 1))
  w = flow.diffusion_coefficient(jnp.asarray(t), x, form, norm=0.7)
  np.testing.assert_allclose(np.asarray(w).ravel(), expected(t.astype(np.float64), 0.7),
                             rtol=1e-5)


def gaussian_velocity(mu, sd):
  """Exact velocity E[x1 - x0 | x_t] for data N(mu, sd^2) and noise N(0, 1)."""
  def velocity(x, t):
    t = t[:, None, None, None]
    var = t ** 2 * sd ** 2 + (1 - t) ** 2
    return mu + (t * sd ** 2 - (1 - t)) / var * (x - t * mu)
  return velocity


def test_score_from_velocity_is_the_gaussian_score():
  mu, sd = jnp.array([0.3, -1.0]), jnp.array([0.5, 2.0])
  x = randn(0, (5, 1, 1, 2))
  t = jnp.array([0.05, 0.3, 0.5, 0.7, 0.95])
  te = t[:, None, None, None]
  true_score = -(x - te * mu) / (te ** 2 * sd ** 2 + (1 - te) ** 2)
  score = flow.score_from_velocity(gaussian_velocity(mu, sd)(x, t), x, t)
  assert_close(score, true_score, RTOL)


def test_last_steps():
  x = randn(1, (3, 2, 2, 1))
  t = jnp.full((3,), 0.96)
  v = toy_velocity(x, t)
  h = 0.04
  w = 1 - 0.96
  score = (0.96 * v - x) / (1 - 0.96)
  cases = {
      "Mean": x + h * (v + w * score),
      "Euler": x + h * v,
      # Tweedie's E[x1 | x_t] on the linear path is exactly the Euler jump to t = 1.
      "Tweedie": x + (1 - 0.96) * v,
      None: x,
  }
  for name, expected in cases.items():
    out = flow.last_step_update(name, v, x, t, h, "sigma")
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=2e-5, atol=2e-5)


def test_sde_time_interval():
  assert flow.sde_time_interval("sigma", 0.0, "Mean", 0.04) == (0.0, 0.96)
  assert flow.sde_time_interval("SBDM", 0.04, None, 0.04) == (0.04, 0.96)
  assert flow.sde_time_interval("linear", 0.01, "none", 0.0) == (0.0, 0.99)


def exact_ode_solution(y0, t):
  """y' = -y + cos(3t): y = (y0 - 0.1) e^{-t} + 0.1 cos 3t + 0.3 sin 3t."""
  return (y0 - 0.1) * np.exp(-t) + 0.1 * np.cos(3 * t) + 0.3 * np.sin(3 * t)


def test_dopri5_meets_its_tolerance():
  y0 = jnp.linspace(-2.0, 2.0, 16).reshape(4, 2, 2, 1)
  expected = exact_ode_solution(np.asarray(y0, np.float64), 1.0)
  f = lambda t, y: -y + jnp.cos(3 * t)
  steps = {}
  for rtol in (1e-3, 1e-6):
    y, info = jax.jit(lambda y: ode.dopri5(f, y, 0.0, 1.0, rtol=rtol, atol=rtol * 1e-2))(y0)
    assert bool(info.success) and float(info.t) == 1.0
    # Local error control keeps the global error within a small multiple of the tolerance.
    np.testing.assert_allclose(np.asarray(y), expected, rtol=10 * rtol + 1e-6,
                               atol=10 * rtol * np.abs(expected).max())
    steps[rtol] = int(info.num_accepted)
  assert steps[1e-6] > steps[1e-3] >= 1


def test_adaptive_sampler_marks_an_unfinished_solve():
  x = jnp.ones((2, 1, 1, 1))
  out, info = jax.jit(lambda x: ode_sampler.ode_sample_adaptive(
      toy_velocity, x, rtol=1e-9, atol=1e-9, max_steps=2, return_info=True))(x)
  assert not bool(info.success) and np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_fixed_step_ode_convergence_order(method, order):
  y0 = jnp.full((1, 1, 1, 1), 0.7)
  expected = exact_ode_solution(0.7, 1.0)
  errors = []
  for steps in (21, 41):  # 20 and 40 intervals
    y = ode_sampler.ode_sample_loop(toy_velocity, y0, num_steps=steps, method=method)
    errors.append(abs(float(y.ravel()[0]) - expected))
  assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.25)


def test_flow_objective_loss_reaches_the_irreducible_error():
  """With the exact velocity, E[loss] = E_t[Var(x1 - x0 | x_t)], t ~ U[0, 1].

  Var(u | x_t) = (sd^2 + 1) - (t sd^2 - (1 - t))^2 / (t^2 sd^2 + (1 - t)^2); its t-average
  is computed by quadrature. Tolerance: 5 standard errors of the mean over the examples.
  """
  mu, sd = np.array([0.5, -1.0]), np.array([0.6, 1.3])
  n = 20000
  objective = objectives.make_objective(flow_config())
  x1 = mu + sd * np.asarray(randn(3, (n, 1, 1, 2)))
  k2 = jax.random.key(3)
  loss = np.asarray(jax.jit(lambda x, k: objective.loss(
      gaussian_velocity(jnp.asarray(mu, jnp.float32), jnp.asarray(sd, jnp.float32)), x, k))(
          jnp.asarray(x1, jnp.float32), k2)["loss"])
  assert loss.shape == (n,)
  t = (np.arange(200000) + 0.5) / 200000
  var_t = t[:, None] ** 2 * sd ** 2 + (1 - t[:, None]) ** 2
  cond_var = (sd ** 2 + 1) - (t[:, None] * sd ** 2 - (1 - t[:, None])) ** 2 / var_t
  expected = cond_var.mean()
  assert abs(loss.mean() - expected) < 5 * loss.std() / np.sqrt(n)


def test_flow_objective_takes_sit_learn_sigma_outputs():
  """A model with [v, extra] outputs (SiT learn_sigma) is trained on its velocity half."""
  objective = objectives.make_objective(flow_config())
  x = randn(4, (3, 2, 2, 2))
  key = jax.random.key(5)
  base, doubled = jax.jit(lambda x, k: (
      objective.loss(lambda x, t: -x, x, k)["loss"],
      objective.loss(lambda x, t: jnp.concatenate([-x, 100 + x], -1), x, k)["loss"]))(x, key)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(doubled))


def test_train_eps_bounds_the_training_times():
  objective = objectives.make_objective(flow_config(train_eps=0.2))
  seen = []

  def model(x, t):
    jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t)
    return x

  jax.jit(lambda k: objective.loss(model, jnp.zeros((512, 1, 1, 1)), k))(jax.random.key(6))
  jax.effects_barrier()
  t = seen[0]
  assert t.min() >= 0.2 and t.max() <= 0.8 and t.max() - t.min() > 0.5
