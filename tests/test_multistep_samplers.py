"""The multistep solvers (dpmpp_2m, unipc) against diffusers' schedulers, the exact answer, and
the guidance interval's saving.

Parity. Both sides run the same analytic model on the same x_T and time steps: data
x0 ~ N(0, S^2 I) has the exact eps*(x, abar) = sqrt(1 - abar) x / (S^2 abar + 1 - abar) and,
on the flow path x = (1 - sigma) x0 + sigma noise (diffusers' convention; SiT's t = 1 - sigma),
the exact velocity v_diffusers = E[noise - x0 | x] = (sigma - (1 - sigma) S^2) x / var(sigma),
var(sigma) = (1 - sigma)^2 S^2 + sigma^2, which our samplers get as SiT's v = -v_diffusers at
t = 1 - sigma. diffusers' scheduler loop (set_timesteps(n), then step() per timestep) runs in
float32 torch, ours in float32 jax; the finals agree to 1e-5 of their largest magnitude.
Tested with diffusers 0.42.1 (the test extra's minimum; flow UniPC's last step needs its
PR 10267).

Convergence. For this data the probability-flow ODE is linear: x(sigma) = x_T std(sigma) /
std(sigma_0), std = sqrt(var). Both solvers end with a first-order step to sigma = 0 from the
last grid point, which returns the data prediction there, so the exact answer of the same
procedure is E[x0 | x(sigma_last)] = S^2 alpha x / var at the exact ODE state; the solvers'
error to it falls at better than first order as steps grow, and the samples approach the
ODE's own end point x_T S / std(sigma_0).

Guidance interval. A host callback in the model records, when it runs, its rows, its t and
whether its labels are the null class: an untaken `lax.cond` branch records nothing and a
cond batched into a select would record both, so the counts are the rows the network really
ran on (directly and under the generator's per-sample vmap); the real generator's compiled
program is checked to keep the branch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcdm_jax import config_base
from fcdm_jax.diffusion import guidance, objectives, samplers
from fcdm_jax.diffusion.samplers import dpmpp_2m, multistep, unipc
from helpers.torch_compat import import_torchvision

S = 0.5                 # the data's standard deviation
C = 4                   # channels
NULL = 10               # the null class of the guidance tests
PARITY_RTOL = 1e-5
SOLVERS = ("dpmpp_2m", "unipc")
FLOW_GRIDS = {"dpmpp_2m": dpmpp_2m.FLOW_GRID, "unipc": unipc.FLOW_GRID}


@pytest.fixture(scope="module")
def schedulers():
  pytest.importorskip("torch")
  import_torchvision()   # diffusers imports torchvision when it is installed
  diffusers = pytest.importorskip("diffusers")
  return {"dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
          "unipc": diffusers.UniPCMultistepScheduler}


def ddpm_objective():
  return objectives.make_objective(ml_collections.ConfigDict(dict(
      objective="ddpm", diffusion=dict(noise_schedule="linear", diffusion_steps=1000),
      model=dict(learn_sigma=True, in_channels=C))))


def flow_objective():
  return objectives.make_objective(ml_collections.ConfigDict(dict(
      objective="flow", flow=dict(train_eps=0.0, sample_eps=0.0),
      model=dict(learn_sigma=False, in_channels=C))))


def make_objective(name):
  return ddpm_objective() if name == "ddpm" else flow_objective()


def x_T(n=2, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 4, 4, C)).astype(np.float32)


def variance(alpha, sigma):
  return S ** 2 * alpha ** 2 + sigma ** 2


# --- the analytic models, jax side (t is what the network is called with) -------------------
def ddpm_model(objective, y_scale=0.0):
  """eps*(x, t) (plus 0.1 * y * y_scale, for guidance tests) and 4 learned-variance channels
  that the solvers must ignore."""
  abar = jnp.asarray(objective.diffusion.alphas_cumprod, jnp.float32)

  def model(x, t, y):
    ab = abar[t.astype(jnp.int32)][:, None, None, None]
    eps = jnp.sqrt(1 - ab) * x / (S ** 2 * ab + 1 - ab) + y_scale * 0.1 * y[:, None, None, None]
    return jnp.concatenate([eps, jnp.full_like(x, 7.0)], axis=-1)

  return model


def flow_model(y_scale=0.0):
  """SiT's exact velocity v(x, t) = E[x0 - noise | x_t] (plus 0.1 * y * y_scale)."""
  def model(x, t, y):
    t = t[:, None, None, None]
    v = (t * S ** 2 - (1 - t)) * x / (t ** 2 * S ** 2 + (1 - t) ** 2)
    return v + y_scale * 0.1 * y[:, None, None, None]

  return model


def analytic_model(objective, y_scale=0.0):
  return ddpm_model(objective, y_scale) if objective.name == "ddpm" else flow_model(y_scale)


def run(objective, settings, model, x, labels=None, null_label=None):
  sample_fn = objective.make_sampler(settings, null_label)
  labels = jnp.zeros((x.shape[0],), jnp.int32) if labels is None else labels
  return np.asarray(jax.jit(lambda x, y: sample_fn(model, x, y, None))(jnp.asarray(x), labels))


# --- diffusers' loop -----------------------------------------------------------------------
def diffusers_sample(scheduler, objective_name, steps, x):
  """diffusers' scheduler loop on the analytic model (float64 model, float32 scheduler)."""
  import torch
  scheduler.set_timesteps(steps)
  sample = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  for i, t in enumerate(scheduler.timesteps):
    xs = sample.double().numpy()
    if objective_name == "ddpm":
      abar = float(scheduler.alphas_cumprod[int(t)])
      out = np.sqrt(1 - abar) * xs / (S ** 2 * abar + 1 - abar)
    else:
      sigma = float(scheduler.sigmas[i])
      out = (sigma - (1 - sigma) * S ** 2) * xs / variance(1 - sigma, sigma)
    sample = scheduler.step(torch.from_numpy(out).float(), t, sample).prev_sample
  return sample.numpy().transpose(0, 2, 3, 1)


def new_scheduler(schedulers, solver, objective_name, shift):
  if objective_name == "ddpm":   # diffusers' defaults: DiT's linear 1e-4..0.02, 1000, epsilon
    return schedulers[solver](num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              beta_schedule="linear", prediction_type="epsilon")
  return schedulers[solver](use_flow_sigmas=True, prediction_type="flow_prediction",
                            flow_shift=shift)


def relative_error(ours, reference):
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


CASES = [("ddpm", 1.0), ("flow", 1.0), ("flow", 3.0)]


# --- time grids ----------------------------------------------------------------------------
def test_ddpm_grid_is_diffusers_linspace_spacing(schedulers):
  objective = ddpm_objective()
  settings = lambda n: dict(steps=n, time_shift=1.0)
  times = multistep.model_times(objective, settings(25), "dpmsolver", "dpmpp_2m").tolist()
  assert len(times) == 25 and times[:3] == [999, 959, 919] and times[-2:] == [80, 40]
  assert multistep.model_times(objective, settings(10), "unipc", "unipc").tolist() == (
      [999, 899, 799, 699, 599, 500, 400, 300, 200, 100])   # 499.5 rounds to even
  for solver in SOLVERS:
    for steps in (2, 5, 7, 10, 25, 50, 250):
      scheduler = new_scheduler(schedulers, solver, "ddpm", 1.0)
      scheduler.set_timesteps(steps)
      ours = multistep.model_times(objective, settings(steps), FLOW_GRIDS[solver], solver)
      np.testing.assert_array_equal(ours, scheduler.timesteps.numpy().astype(np.float32))


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.4])
def test_flow_grid_is_diffusers_flow_sigmas(schedulers, shift):
  objective = flow_objective()
  for solver in SOLVERS:
    for steps in (2, 5, 10, 25, 50):
      scheduler = new_scheduler(schedulers, solver, "flow", shift)
      scheduler.set_timesteps(steps)
      grid = multistep.make_grid(objective, steps, shift, FLOW_GRIDS[solver], solver)
      np.testing.assert_array_equal(grid.sigmas.astype(np.float32), scheduler.sigmas.numpy())
      np.testing.assert_array_equal(grid.times, (1.0 - grid.sigmas[:-1]).astype(np.float32))
  first = lambda solver: multistep.make_grid(objective, 10, 1.0, FLOW_GRIDS[solver], solver)
  assert first("dpmpp_2m").sigmas[0] == np.float32(0.999)
  assert first("unipc").sigmas[0] == np.float32(1.0 - 1e-6)


def test_time_shift_in_sigt_time():
  """The documented SiT-time form t' = t / (s - (s - 1) t) is 1 - shift(1 - t)."""
  t = np.linspace(0.0, 1.0, 11)
  for s in (0.5, 1.0, 3.0):
    np.testing.assert_allclose(1.0 - multistep.shift_sigma(1.0 - t, s), t / (s - (s - 1) * t),
                               rtol=0, atol=1e-15)
  assert multistep.shift_sigma(0.5, 3.0) == 0.75   # more steps near noise for s > 1


# --- parity with diffusers ---------------------------------------------------------------------
@pytest.mark.parametrize("objective_name, shift", CASES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_matches_diffusers_scheduler_loop(schedulers, objective_name, shift, solver):
  objective = make_objective(objective_name)
  model = analytic_model(objective)
  x = x_T()
  for steps in (5, 10, 25):
    theirs = diffusers_sample(new_scheduler(schedulers, solver, objective_name, shift),
                              objective_name, steps, x)
    ours = run(objective, dict(sampler=solver, steps=steps, time_shift=shift), model, x)
    assert relative_error(ours, theirs) < PARITY_RTOL, (solver, objective_name, shift, steps)


@pytest.mark.parametrize("objective_name, shift", CASES)
def test_the_two_solvers_differ_by_far_more_than_the_parity_tolerance(objective_name, shift):
  """So the parity test tells the corrector (and the flow grids' starts) apart."""
  objective = make_objective(objective_name)
  results = [run(objective, dict(sampler=s, steps=5, time_shift=shift),
                 analytic_model(objective), x_T()) for s in SOLVERS]
  assert relative_error(*results) > 100 * PARITY_RTOL


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_vmap_equals_the_batch(solver):
  """The generator's shape of call: each sample alone (batch 1) under vmap, jitted."""
  for objective in (ddpm_objective(), flow_objective()):
    model = analytic_model(objective)
    sample_fn = objective.make_sampler(dict(sampler=solver, steps=10, time_shift=2.0
                                            if objective.name == "flow" else 1.0), None)
    x = x_T(n=3)
    one = lambda x1, y1: sample_fn(model, x1[None], y1[None], None)[0]
    vmapped = jax.jit(jax.vmap(one))(jnp.asarray(x), jnp.zeros((3,), jnp.int32))
    batched = jax.jit(lambda x: sample_fn(model, x, jnp.zeros((3,), jnp.int32), None))(
        jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(batched), rtol=1e-6, atol=1e-6)


def test_unipc_predictor_is_dpmpp_2m():
  """UniP-2 with B(h) = e^{-h} - 1 is DPM-Solver++(2M): same coefficients on the same grid."""
  for objective, shift in ((ddpm_objective(), 1.0), (flow_objective(), 3.0)):
    grid = multistep.make_grid(objective, 12, shift, "unipc", "unipc")
    for ours, theirs in zip(unipc.predictor_coefficients(grid), dpmpp_2m.coefficients(grid)):
      np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)


# --- convergence to the exact solution -------------------------------------------------------
@pytest.mark.parametrize("objective_name, shift", CASES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_converges_to_the_probability_flow_solution(objective_name, shift, solver):
  objective = make_objective(objective_name)
  model = analytic_model(objective)
  x = x_T(n=4)
  errors, end_errors = [], []
  for steps in (25, 50, 100, 200, 400):
    grid = multistep.make_grid(objective, steps, shift, FLOW_GRIDS[solver], solver)
    (a0, s0), (a1, s1) = (grid.alphas[0], grid.sigmas[0]), (grid.alphas[-2], grid.sigmas[-2])
    ode_state = x * np.sqrt(variance(a1, s1) / variance(a0, s0))
    exact = S ** 2 * a1 * ode_state / variance(a1, s1)   # the final step's x0 at that state
    ours = run(objective, dict(sampler=solver, steps=steps, time_shift=shift), model, x)
    errors.append(relative_error(ours, exact))
    end_errors.append(relative_error(ours, x * S / np.sqrt(variance(a0, s0))))
  assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[2] / 8, errors   # 4x the steps: better than first order
  assert errors[0] < 0.05 and end_errors[-1] < 1e-3, (errors, end_errors)


# --- settings errors -------------------------------------------------------------------------
class OtherObjective:
  name = "edm"


@pytest.mark.parametrize("make, match", [
    (lambda: ddpm_objective().make_sampler(dict(sampler="dpmpp_2m", steps=1), None),
     "dpmpp_2m is a multistep solver: steps must be an integer >= 2"),
    (lambda: flow_objective().make_sampler(dict(sampler="unipc", steps=1), None),
     "unipc is a multistep solver: steps must be an integer >= 2"),
    (lambda: flow_objective().make_sampler(dict(sampler="unipc", steps=2.5), None),
     "steps must be an integer >= 2"),
    (lambda: flow_objective().make_sampler(dict(sampler="dpmpp_2m", steps=10, time_shift=0.0),
                                           None), "time_shift must be a finite number > 0"),
    (lambda: flow_objective().make_sampler(dict(sampler="unipc", steps=10, time_shift=-3.0),
                                           None), "time_shift must be a finite number > 0"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="unipc", steps=10, time_shift=3.0),
                                           None), "applies to the flow objective only"),
    (lambda: ddpm_objective().make_sampler(dict(sampler="dpmpp_2m", steps=2000), None),
     "repeats time steps of a 1000-step process"),
    (lambda: samplers.get("unipc", "edm"), "sampler 'unipc' does not serve the 'edm' objective"),
    (lambda: dpmpp_2m.SAMPLER.make(OtherObjective(), dict(steps=10, time_shift=1.0), {}),
     r"dpmpp_2m serves the \('ddpm', 'flow'\) objectives, not 'edm'"),
    (lambda: flow_objective().make_sampler(dict(sampler="dpmpp_2m", steps=10), None)(
        flow_model(), jnp.zeros((1, 4, 4, C)), jnp.zeros((1,), jnp.int32), None,
        step_noise=jnp.zeros((10, 1, 4, 4, C))), "dpmpp_2m is deterministic"),
])
def test_bad_settings_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_registered_and_declared_for_both_objectives():
  for objective in ("ddpm", "flow"):
    assert {"dpmpp_2m", "unipc"} <= set(samplers.names(objective))
    config = config_base.get_config("S", 256, objective)
    assert config.sample.time_shift == 1.0 and config.preview.time_shift == 1.0


# --- the guidance interval's saving ----------------------------------------------------------
def counting(model, calls):
  """`model` that records, when it runs (a host callback, so an untaken branch records
  nothing), its rows, its time and whether its labels are the null class."""
  def counted(x, t, y):
    jax.debug.callback(lambda x, t, y: calls.append((x.shape[0], float(t[0]),
                                                     bool(np.all(y == NULL)))), x, t, y)
    return model(x, t, y)
  return counted


def rows_per_time(calls):
  out = {}
  for rows, t, null in calls:
    cond, uncond = out.get(t, (0, 0))
    out[t] = (cond + (0 if null else rows), uncond + (rows if null else 0))
  return out


INTERVAL_CASES = [("ddpm", (150.0, 650.0)), ("flow", (0.3, 0.7))]


@pytest.mark.parametrize("objective_name, interval", INTERVAL_CASES)
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("per_sample_vmap", [False, True])
def test_guidance_interval_runs_the_null_rows_only_inside(objective_name, interval, solver,
                                                          per_sample_vmap):
  """Outside the interval each step runs the network on the N conditional rows only, inside
  on N conditional + N null rows; also under the generator's per-sample vmap."""
  objective = make_objective(objective_name)
  n, steps = 3, 10
  settings = dict(sampler=solver, steps=steps, cfg_scale=4.0, cfg_interval=interval)
  sample_fn = objective.make_sampler(settings, NULL)
  calls = []
  model = counting(analytic_model(objective, y_scale=1.0), calls)
  x, y = jnp.asarray(x_T(n=n)), jnp.array([1, 2, 3])
  if per_sample_vmap:
    one = lambda x1, y1: sample_fn(model, x1[None], y1[None], None)[0]
    jax.block_until_ready(jax.jit(jax.vmap(one))(x, y))
  else:
    jax.block_until_ready(jax.jit(lambda x, y: sample_fn(model, x, y, None))(x, y))
  jax.effects_barrier()
  times = multistep.model_times(objective, dict(steps=steps, time_shift=1.0),
                                FLOW_GRIDS[solver], solver)
  inside = [(interval[0] <= t <= interval[1]) for t in times.tolist()]
  assert 0 < sum(inside) < steps
  expected = {float(t): (n, n if i else 0) for t, i in zip(times.tolist(), inside)}
  assert rows_per_time(calls) == expected


def test_the_generators_compiled_program_keeps_the_interval_a_branch():
  """The real generator (per-sample vmap, batch split over 8 devices): with an interval its
  compiled program holds a conditional (the null rows' network), without one none; a
  conditional batched into a select would leave none."""
  from fcdm_jax import sampling, sharding
  from fcdm_jax.models import FCDM
  from helpers.training import tiny_demo_config
  config = tiny_demo_config("flow", seed=11)
  mesh = sharding.create_mesh(config)
  shapes = jax.eval_shape(lambda: FCDM(**config.model).init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), np.zeros((1,), np.float32),
      np.zeros((1,), np.int32)))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                         sharding=sharding.replicated(mesh)),
                          nn.unbox(shapes)["params"])
  for cfg_interval, conditionals in ((None, 0), ((0.3, 0.7), 1)):
    generator = sampling.Generator(config, dict(sampler="unipc", steps=4, cfg_scale=4.0,
                                                cfg_interval=cfg_interval), mesh)
    hlo = generator.lower(abstract, 16).compile().as_text()
    assert hlo.count("conditional(") == conditionals, cfg_interval


@pytest.mark.parametrize("objective_name, interval", INTERVAL_CASES)
def test_guidance_interval_equals_full_guidance_inside_and_none_outside(objective_name,
                                                                        interval):
  objective = make_objective(objective_name)
  model = analytic_model(objective, y_scale=1.0)
  x, y = x_T(n=3), jnp.array([1, 2, 3])
  everywhere = objective.time_range
  outside = {"ddpm": (0.0, 50.0), "flow": (0.95, 1.0)}[objective_name]   # no grid time in it
  for solver in SOLVERS:
    base = dict(sampler=solver, steps=10, cfg_scale=4.0)
    times = multistep.model_times(objective, dict(steps=10, time_shift=1.0),
                                  FLOW_GRIDS[solver], solver)
    assert not np.any((times >= outside[0]) & (times <= outside[1]))
    full = run(objective, base, model, x, y, NULL)
    whole_interval = run(objective, dict(base, cfg_interval=everywhere), model, x, y, NULL)
    np.testing.assert_allclose(whole_interval, full, rtol=1e-6, atol=1e-6)
    nowhere = run(objective, dict(base, cfg_interval=outside), model, x, y, NULL)
    unguided = run(objective, dict(base, cfg_scale=1.0), model, x, y, NULL)
    np.testing.assert_allclose(nowhere, unguided, rtol=1e-6, atol=1e-6)
    partial = run(objective, dict(base, cfg_interval=interval), model, x, y, NULL)
    assert relative_error(partial, full) > 1e-3 and relative_error(partial, unguided) > 1e-3


def test_guided_model_inside_the_interval_is_full_guidance():
  """Inside: full guidance (the conditional and null rows run as two calls of N rows instead
  of one of 2N, so equal up to the float effects of the call's batch size); outside: the
  conditional output."""
  objective = ddpm_objective()
  model = analytic_model(objective, y_scale=1.0)
  x, y = jnp.asarray(x_T(n=3)), jnp.array([1, 2, 3])
  plain = guidance.guided_model(model, y, cfg_scale=4.0, null_label=NULL)
  interval = guidance.guided_model(model, y, cfg_scale=4.0, null_label=NULL,
                                   interval=(100.0, 500.0))
  inside, outside = jnp.full((3,), 300.0), jnp.full((3,), 700.0)
  guided, conditional = np.asarray(plain(x, inside)), np.asarray(model(x, inside, y))
  assert np.abs(guided - conditional).max() > 0.1
  np.testing.assert_allclose(np.asarray(interval(x, inside)), guided, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(interval(x, outside)), np.asarray(model(x, outside, y)),
                             rtol=1e-6, atol=1e-6)
