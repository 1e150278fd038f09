"""The cost every sampling output reports (`samplers.evaluations_per_image`, `sampling.cost`)
is the network's real work: a host callback in the model records the rows of every call
that runs (an untaken `lax.cond` branch records nothing, a select records both), and the
rows per image must equal the reported evaluations, for every sampler, unguided, guided and
guided on an interval, as the generator runs them (a per-sample `vmap`); and through the
real generator, whose reported cost is checked against the FCDM network's own calls."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcdm_jax import sampling, sharding
from fcdm_jax.diffusion import guidance, objectives, samplers
from fcdm_jax.models import FCDM
from fcdm_jax.sampling import cost as cost_lib
from helpers.network_calls import counted_rows, rows_since
from helpers.training import tiny_demo_config

C = 2
NULL = 7
INTERVALS = {"ddpm": (300.0, 700.0), "flow": (0.3, 0.7)}
CASES = [   # (objective, settings): every sampler, and each time-grid variant
    ("ddpm", dict(sampler="ddpm", steps=6)),
    ("ddpm", dict(sampler="ddim", steps=6)),
    ("ddpm", dict(sampler="ddim", respacing="ddim10")),
    ("ddpm", dict(sampler="dpmpp_2m", steps=6)),
    ("ddpm", dict(sampler="unipc", steps=6)),
    ("flow", dict(sampler="sde", steps=6)),
    ("flow", dict(sampler="sde", steps=6, method="heun")),
    ("flow", dict(sampler="sde", steps=6, last_step=None)),
    ("flow", dict(sampler="ode", steps=6, method="euler")),
    ("flow", dict(sampler="ode", steps=6, method="heun")),
    ("flow", dict(sampler="ode", method="dopri5", rtol=1e-2, atol=1e-3)),
    ("flow", dict(sampler="dpmpp_2m", steps=6, time_shift=3.0)),
    ("flow", dict(sampler="unipc", steps=6)),
]


def make_objective(name):
  if name == "ddpm":   # fixed variance: the model's output is eps alone (C channels)
    return objectives.DDPMObjective(learn_sigma=False)
  return objectives.FlowObjective()


def counting(calls):
  """A smooth model that records the rows of each call that runs."""
  def model(x, t, y):
    jax.debug.callback(lambda x: calls.append(x.shape[0]), x)
    shift = 0.05 * (y.astype(jnp.float32) - 3.0).reshape((-1, 1, 1, 1))
    return 0.3 * x + shift + 1e-4 * t.reshape((-1, 1, 1, 1))
  return model


def rows_per_image(objective, settings, n=3, measured=False):
  """(network rows per image the sampler really ran under the generator's per-sample vmap,
  the per-image counts dopri5 reported (measured) or None)."""
  calls = []
  sample_fn = objective.make_sampler(settings, NULL)
  model = counting(calls)

  def one(x1, y1, key):
    if measured:
      x, evaluations = sample_fn(model, x1[None], y1[None], key, return_evaluations=True)
      return x[0], evaluations[0]
    return sample_fn(model, x1[None], y1[None], key)[0], jnp.float32(0)

  x = jax.random.normal(jax.random.PRNGKey(0), (n, 4, 4, C))
  y = jnp.arange(n, dtype=jnp.int32) % 5
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  _, reported = jax.block_until_ready(jax.jit(jax.vmap(one))(x, y, keys))
  jax.effects_barrier()
  return sum(calls) / n, (np.asarray(reported) if measured else None)


@pytest.mark.parametrize("guide", ["unguided", "guided", "interval"])
@pytest.mark.parametrize("objective_name, settings", CASES,
                         ids=[f"{o}-" + "-".join(str(v) for v in s.values()) for o, s in CASES])
def test_reported_evaluations_are_the_rows_the_network_ran(objective_name, settings, guide):
  objective = make_objective(objective_name)
  settings = dict(settings, cfg_scale=1.0 if guide == "unguided" else 4.0,
                  cfg_interval=INTERVALS[objective_name] if guide == "interval" else None)
  static = samplers.evaluations_per_image(settings, objective)
  if settings.get("method") == "dopri5":   # data dependent: counted by the solver's loop
    assert static is None
    ran, reported = rows_per_image(objective, settings, measured=True)
    # A batched while-loop runs every image until the slowest is done: each image's rows
    # are the batch's largest count, each image reports its own.
    assert ran == reported.max() and reported.min() >= 2 + 6
    return
  ran, _ = rows_per_image(objective, settings)
  assert static == ran
  evaluations = len(samplers.get(settings["sampler"], objective_name).model_times(
      objective, samplers.resolve(samplers.get(settings["sampler"], objective_name),
                                  settings)))
  expected = {"unguided": evaluations, "guided": 2 * evaluations}.get(guide)
  if expected is not None:
    assert static == expected
  else:   # the interval takes some evaluations and leaves others
    assert evaluations < static < 2 * evaluations


def test_rows_per_evaluation_compares_in_the_models_float32_time():
  times = np.asarray([0.1, 0.3, 0.7, 0.70000005], np.float32)
  np.testing.assert_array_equal(guidance.rows_per_evaluation(times, 4.0, (0.3, 0.7)),
                                [1, 2, 2, 1])
  np.testing.assert_array_equal(guidance.rows_per_evaluation(times, 1.0, (0.3, 0.7)), [1] * 4)
  np.testing.assert_array_equal(guidance.rows_per_evaluation(times, 4.0, None), [2] * 4)


def test_cost_records():
  assert cost_lib.grid_record(40) == {"evaluations_per_image": 40,
                                      "evaluations_counted": "time grid"}
  assert cost_lib.record([40, 40], measured=False) == cost_lib.grid_record(40)
  assert cost_lib.record([26, 38, 38], measured=True) == {
      "evaluations_per_image": 34, "evaluations_counted": "measured",
      "evaluations_per_image_max": 38}
  assert cost_lib.describe(cost_lib.grid_record(40)) == "40 network evaluations per image"
  assert "mean 34, max 38" in cost_lib.describe(cost_lib.record([26, 38, 38], measured=True))
  with pytest.raises(ValueError, match="no images were sampled"):
    cost_lib.record([], measured=False)


@pytest.fixture(scope="module")
def counted_network():
  """FCDM.apply recording the rows of each call that runs (the generator's network)."""
  with counted_rows() as calls:
    yield calls


@pytest.mark.slow
@pytest.mark.parametrize("objective_name, settings", [
    ("ddpm", dict(sampler="dpmpp_2m", steps=5, cfg_interval=(100.0, 600.0))),
    ("flow", dict(sampler="unipc", steps=5, cfg_interval=(0.3, 0.7))),
    ("flow", dict(sampler="sde", steps=4, method="heun")),
    ("flow", dict(sampler="ode", method="dopri5", rtol=1e-2, atol=1e-2)),
])
def test_the_generators_cost_is_the_networks_calls(objective_name, settings, counted_network):
  """The real generator (8 devices, per-sample vmap): `last_cost` is the FCDM network's
  rows per image; a time grid's equals `evaluations_per_image`."""
  config = tiny_demo_config(objective_name, seed=3)
  mesh = sharding.create_mesh(config)
  shapes = jax.eval_shape(lambda: FCDM(**config.model).init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), np.zeros((1,), np.float32),
      np.zeros((1,), np.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                        nn.unbox(shapes)["params"])
  params = jax.device_put(params, sharding.replicated(mesh))
  generator = sampling.Generator(config, dict(settings, cfg_scale=4.0), mesh)
  rows_since(counted_network)
  n = 8
  generator.generate_all(params, 0, np.arange(n, dtype=np.int32) % 10, n)
  ran = rows_since(counted_network) / n
  cost = generator.last_cost
  if generator.grid_evaluations is None:
    assert cost["evaluations_counted"] == "measured"
    assert ran == cost["evaluations_per_image_max"] >= cost["evaluations_per_image"]
  else:
    assert cost == cost_lib.grid_record(generator.grid_evaluations)
    assert ran == generator.grid_evaluations
    if "cfg_interval" in settings:
      steps = settings["steps"]
      assert steps < ran < 2 * steps
