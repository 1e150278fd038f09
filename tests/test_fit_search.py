"""--fit's search (`perf.fit.run`) with the compiler replaced by a memory and time model:
which candidates it compiles, which it skips and why, and the choice. The real GPU compile
of --fit is tests/test_gpu_preflight.py."""

import importlib.util
import pathlib

import jax
import pytest

from fcdm_jax.perf import fit, preflight_run, targets

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30
# Per policy: activation bytes per example per GPU, and the step's FLOPs relative to none.
ACTIVATIONS = {"none": 1.0 * GIB, "dots": 0.9 * GIB, "dots_no_batch": 0.55 * GIB,
               "block": 0.2 * GIB}
RECOMPUTE = {"none": 1.0, "dots": 1.1, "dots_no_batch": 1.12, "block": 1.33}
# Per policy: seconds of activation traffic of the whole batch (stored in the forward pass,
# read back in the backward one), the same however it is split; zero unless a test sets it.
TRAFFIC = {"none": 0.0, "dots": 0.0, "dots_no_batch": 0.0, "block": 0.0}


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny", REPO / "tests" / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    config.batch_size = 256
  return config


@pytest.fixture
def compiler(monkeypatch):
  """A 4-GPU 4090 target over 4 CPU devices; a 'compile' plans 2 GiB of state plus each
  policy's activations per example of the micro-batch, and a bound of its FLOPs or of its
  memory time (0.2 s per pass over the weights plus the policy's `TRAFFIC`), the larger.
  Returns the list of (remat, accumulation) compiled."""
  target = targets.parse("4x4090")
  devices = jax.devices("cpu")[:4]

  def setup(config, topology, batch, fraction):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.batch_size = batch or config.batch_size
    return target, devices, config

  monkeypatch.setattr(preflight_run, "setup", setup)
  monkeypatch.setattr(preflight_run, "compute_seconds",
                      lambda config, batch, n, peak, cache: RECOMPUTE[config.model.remat])
  compiled = []

  def step_program(config, name, batch, devices, target, peak, flops_cache=None):
    remat, accum = config.model.remat, config.grad_accum_steps
    compiled.append((remat, accum))
    temp = int(ACTIVATIONS[remat] * batch // accum // len(devices))
    compute, memory = RECOMPUTE[remat], 0.2 * accum + TRAFFIC[remat]
    return dict(compiled=True, compile_s=1.0,
                memory=dict(total=2 * GIB + temp, temp=temp),
                roofline=dict(compute_s=compute, memory_s=memory,
                              step_s_bound=max(compute, memory),
                              binds="compute" if compute >= memory else "memory"))

  monkeypatch.setattr(preflight_run, "step_program", step_program)
  return compiled


def test_a_compute_bound_step_without_remat_ends_the_search(compiler):
  """On GPUs with room for everything, no remat at the full batch is bounded by its compute
  (1.0 s); every other policy's compute alone is higher: none is compiled."""
  result = fit.run(tiny_config(), "4x4090", batch=32, log=lambda s: None)
  assert compiler == [("none", 1)]
  assert result["choice"]["remat"] == "none" and result["choice"]["grad_accum_steps"] == 1
  skipped = [c for c in result["candidates"] if not c["compiled"]]
  assert [c["remat"] for c in skipped] == ["dots", "dots_no_batch", "block"]
  assert all("compute alone" in c["skipped"] for c in skipped)


def test_remat_that_cuts_memory_traffic_wins_at_as_many_micro_batches(compiler, monkeypatch):
  """No remat fits the full batch but is memory-bound (0.2 + 3.0 s of traffic): the other
  policies are compiled at one micro-batch (never more). dots, which stores a third of it,
  wins at max(1.1, 0.2 + 1.0) = 1.2 s; dots_no_batch is compiled after it (its compute,
  1.12 s, is below 1.2) and loses; block's compute alone (1.33 s) is not: not compiled."""
  monkeypatch.setitem(TRAFFIC, "none", 3.0)
  monkeypatch.setitem(TRAFFIC, "dots", 1.0)
  monkeypatch.setitem(TRAFFIC, "dots_no_batch", 1.2)
  monkeypatch.setitem(TRAFFIC, "block", 1.2)
  result = fit.run(tiny_config(), "4x4090", batch=32, log=lambda s: None)
  assert compiler == [("none", 1), ("dots", 1), ("dots_no_batch", 1)]
  choice = result["choice"]
  assert (choice["remat"], choice["grad_accum_steps"]) == ("dots", 1)
  assert choice["step_s_bound"] == pytest.approx(1.2) and choice["binds"] == "memory"
  assert "compute alone" in result["candidates"][-1]["skipped"]


def test_a_policy_is_tried_only_up_to_the_fewest_micro_batches_that_fit(compiler):
  """18 GiB usable, 16.2 with 10% free, 64 examples per GPU. No remat needs 8 micro-batches
  (bound 1.6 s, memory-bound). dots, sized from its plan at 1, needs 8 too: compiled there
  (it could move less memory), it ties. dots_no_batch fits in 4 (bound 1.12 s): the choice.
  block may then try up to 4 micro-batches, but its compute alone (1.33 s) cannot beat
  1.12: not compiled."""
  lines = []
  result = fit.run(tiny_config(), "4x4090", log=lines.append)
  assert compiler == [("none", 1), ("none", 8), ("dots", 1), ("dots", 8),
                      ("dots_no_batch", 1), ("dots_no_batch", 4)]
  choice = result["choice"]
  assert (choice["remat"], choice["grad_accum_steps"]) == ("dots_no_batch", 4)
  assert choice["step_s_bound"] == pytest.approx(1.12)
  assert result["overrides"] == ("--config.batch_size=256 --config.grad_accum_steps=4 "
                                 "--config.model.remat=dots_no_batch")
  block = [c for c in result["candidates"] if c["remat"] == "block"]
  assert len(block) == 1 and not block[0]["compiled"] and "compute alone" in block[0]["skipped"]


def test_a_policy_stops_where_it_would_need_more_micro_batches(compiler, monkeypatch):
  """As above, but dots stores as much as none: after its plan at 1 it would need 16
  micro-batches where none fits in 8, and stops there."""
  monkeypatch.setitem(ACTIVATIONS, "dots", 1.9 * GIB)
  lines = []
  result = fit.run(tiny_config(), "4x4090", log=lines.append)
  assert compiler[:4] == [("none", 1), ("none", 8), ("dots", 1), ("dots_no_batch", 1)]
  assert any("dots: stops, it would need 16 or more micro-batches where none fits in 8" in l
             for l in lines)
  assert result["choice"]["remat"] == "dots_no_batch"
