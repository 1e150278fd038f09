"""The training system: sharded steps, checkpoints that survive crashes, restores onto other
meshes, clean stops, and clear errors before any work starts.

Runs on the 8 fake CPU devices of conftest.py; the crash tests run the real command in
subprocesses.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fcdm_jax import data as data_lib
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.models import FCDM
from fcdm_jax import checkpoint as ckpt_lib
from fcdm_jax import sharding
from fcdm_jax.train import loop
from fcdm_jax.train.state import create_train_state, make_optimizer, state_layout
from fcdm_jax.train.step import jit_train_step, make_train_step

from helpers.runs import (REPO, mesh_of, restore_final, run_main, two_processes,
                          wait_for_checkpoint)
from helpers.training import TINY_CONFIG, load_config, make_latent_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_latent_dataset(tmp_path_factory.mktemp("latents"))


def build(config, mesh):
  model = FCDM(**config.model)
  tx = make_optimizer(config)
  objective = make_objective(config)
  shape = (config.latent_size, config.latent_size, config.model.in_channels)
  state, abstract, shardings = create_train_state(config, model, tx, mesh, shape)
  step = jit_train_step(make_train_step(config, model, objective, tx), mesh, shardings, config)
  return state, abstract, shardings, step


def first_batch(config, dataset):
  with config.unlocked():
    config.data.path = dataset
  source = data_lib.make_source(config, process_index=0, process_count=1)
  return source.batch(0)


@pytest.mark.slow
def test_fsdp_step_equals_single_device_step(dataset):
  config = load_config(**{"sharding.params": "fsdp"})
  batch = first_batch(config, dataset)
  results = {}
  for name, mesh in (("one", mesh_of(1, 1, 1)), ("fsdp", mesh_of(8, 2, 4))):
    state, _, shardings, step = build(config, mesh)
    new_state, metrics = step(state, sharding.global_batch(batch, mesh))
    results[name] = (jax.device_get(new_state), jax.device_get(metrics), new_state)
  one, fsdp = results["one"], results["fsdp"]
  np.testing.assert_allclose(one[1]["loss"], fsdp[1]["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(fsdp[0].params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one[0].ema_params), jax.tree.leaves(fsdp[0].ema_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # The large parameters really are split over 'fsdp' (params, EMA and Adam moments).
  live = fsdp[2]
  kernel = live.params["latent"]["pwconv1"]["kernel"]  # (layers, 32, 96): 'embed' -> fsdp
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (1, 8, 96)
  assert live.ema_params["latent"]["pwconv1"]["kernel"].sharding.spec == kernel.sharding.spec
  adam = [s for s in jax.tree.leaves(live.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")][0]
  mu = adam.mu["latent"]["pwconv1"]["kernel"]
  assert mu.sharding.spec == kernel.sharding.spec


@pytest.mark.slow
def test_replicated_mode_keeps_params_whole(dataset):
  config = load_config()
  state, _, _, _ = build(config, mesh_of(8, 8, 1))
  kernel = state.params["latent"]["pwconv1"]["kernel"]
  assert kernel.sharding.is_fully_replicated


@pytest.mark.slow
def test_checkpoint_restores_on_other_device_counts(tmp_path, dataset):
  config = load_config(**{"sharding.params": "fsdp"})
  batch = first_batch(config, dataset)
  mesh8 = mesh_of(8, 2, 4)
  state, _, _, step = build(config, mesh8)
  state, _ = step(state, sharding.global_batch(batch, mesh8))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, state, {"data_position": 1})
  ckpt.wait()
  expected = jax.device_get(state)
  model, tx = FCDM(**config.model), make_optimizer(config)
  for n, data, fsdp in ((1, 1, 1), (4, 1, 4), (4, 4, 1)):
    mesh = mesh_of(n, data, fsdp)
    abstract, _ = state_layout(config, model, tx, mesh, (8, 8, 4))
    restored, meta = ckpt.restore(1, abstract)
    assert meta["data_position"] == 1
    kernel = restored.params["latent"]["pwconv1"]["kernel"]
    assert len(kernel.sharding.device_set) == n
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(restored))):
      np.testing.assert_array_equal(a, b)
  ckpt.close()


# ---------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, dataset):
  steps = "--config.num_train_steps=8"
  code, out = run_main(tmp_path / "straight", dataset, steps)
  assert code == 0, out[-3000:]
  # Each step slowed (in the test process only) so the kill lands mid-run, after checkpoint 4.
  proc = run_main(tmp_path / "killed", dataset, steps, "--config.checkpoint_every_steps=4",
                  wait=False, step_delay=0.5)
  wait_for_checkpoint(tmp_path / "killed", 4, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _, _, steps_after_kill = restore_final(tmp_path / "killed")
  assert max(steps_after_kill) < 8
  code, out = run_main(tmp_path / "killed", dataset, steps, "--config.checkpoint_every_steps=4")
  assert code == 0, out[-3000:]
  assert "resumed from checkpoint" in out
  a, meta_a, _ = restore_final(tmp_path / "straight")
  b, meta_b, _ = restore_final(tmp_path / "killed")
  assert int(a.step) == int(b.step) == 8 and meta_b["data_position"] == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_leaves_a_checkpoint_at_that_step(tmp_path, dataset):
  proc = run_main(tmp_path, dataset, "--config.num_train_steps=1000",
                  "--config.checkpoint_every_steps=1000", wait=False,
                  step_delay=0.3)
  log = pathlib.Path(tmp_path)
  deadline = time.time() + 300
  while not list(log.glob("events.out.tfevents*")) and time.time() < deadline:
    time.sleep(0.2)
  time.sleep(3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM received" in out
  state, meta, steps = restore_final(tmp_path)
  assert steps == [int(state.step)] and 0 < int(state.step) < 1000
  assert meta["data_position"] == int(state.step)
  assert f"'end_step': {int(state.step)}" in out and "'stopped_by': 'SIGTERM'" in out


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, dataset, monkeypatch):
  config = load_config(**{"data.path": dataset, "num_train_steps": 10,
                          "checkpoint_every_steps": 2})
  real_make_source = data_lib.make_source

  def poisoned(*args, **kwargs):
    source = real_make_source(*args, **kwargs)
    clean_batch = source.batch

    def batch(step):
      b = clean_batch(step)
      if step == 4:  # the 5th step sees a NaN input
        b["x"] = np.full_like(b["x"], np.nan)
      return b
    source.batch = batch
    return source

  monkeypatch.setattr(data_lib, "make_source", poisoned)
  with pytest.raises(loop.NonFiniteLossError, match="non-finite at step 5.*step 4"):
    loop.train_and_evaluate(config, str(tmp_path))
  state, meta, steps = restore_final(tmp_path)
  assert steps == [2, 4] and int(state.step) == 4
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state.params))


# ------------------------------------------------------------------------------ bad input


def _expect_setup_error(tmp_path, match, **overrides):
  config = load_config(**overrides)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


def test_batch_not_divisible_by_data_parallel_size(tmp_path, dataset):
  _expect_setup_error(tmp_path, "batch_size 6 is not divisible by the data-parallel size 8",
                      **{"data.path": dataset, "batch_size": 6})


def test_unknown_objective(tmp_path, dataset):
  _expect_setup_error(tmp_path, r"config\.objective='edm' is not one of ddpm, flow",
                      **{"data.path": dataset, "objective": "edm"})


def test_missing_dataset_and_data_dir(tmp_path):
  _expect_setup_error(tmp_path, "latent", **{"data.path": str(tmp_path / "nowhere")})
  _expect_setup_error(tmp_path, "data_dir", **{"data.source": "tfds",
                                               "data.tfds_name": "mnist"})


def test_latent_shape_that_does_not_fit_the_config(tmp_path):
  wrong = make_latent_dataset(tmp_path / "big", count=8, shape=(16, 16, 4))
  _expect_setup_error(tmp_path, r"\(16, 16, 4\).*\(8, 8, 4\)|\(8, 8, 4\).*\(16, 16, 4\)",
                      **{"data.path": wrong})


def test_unwritable_workdir(tmp_path, dataset):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  config = load_config(**{"data.path": dataset})
  with pytest.raises(ValueError, match="is not writable"):
    loop.train_and_evaluate(config, str(blocker / "run"))


@pytest.mark.slow
def test_unknown_variant_in_a_config_file(tmp_path):
  bad = tmp_path / "bad_config.py"
  bad.write_text("from fcdm_jax import config_base\n"
                 "def get_config():\n  return config_base.get_config('M', 256)\n")
  proc = subprocess.run([sys.executable, "-m", "fcdm_jax.main", f"--config={bad}",
                         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
  assert proc.returncode != 0
  assert "unknown FCDM variant 'M'" in proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resuming_with_another_model_is_refused(tmp_path, dataset):
  config = load_config(**{"data.path": dataset, "num_train_steps": 2})
  loop.train_and_evaluate(config, str(tmp_path))
  other = load_config(**{"data.path": dataset, "num_train_steps": 4, "model.hidden_size": 16})
  with pytest.raises(ValueError, match="other model fields"):
    loop.train_and_evaluate(other, str(tmp_path))


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path, dataset):
  """jax.distributed on localhost: 2 processes x 2 CPU devices train, save, then resume."""
  def launch(steps):
    results = two_processes(["-m", "fcdm_jax.main", f"--config={TINY_CONFIG}",
                             f"--workdir={tmp_path}", f"--config.data.path={dataset}",
                             f"--config.num_train_steps={steps}"])
    for status, out in results:
      assert status == 0, out[-3000:]
    return [out for _, out in results]

  first = launch(4)
  assert "process 0 of 2, 2 local / 4 global devices" in first[0]
  assert "process 1 of 2" in first[1]
  second = launch(6)
  assert "resumed from checkpoint at step 4" in second[0]
  state, meta, steps = restore_final(tmp_path)
  assert int(state.step) == 6 and steps[-1] == 6 and meta["data_position"] == 6
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state.params))

  # One process on 8 devices, without the break, from the same seed: the same losses
  # (each latent's posterior sample is drawn on the device by step and global position,
  # not by host) and the same weights.
  one = tmp_path / "one_process"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  proc = subprocess.run([sys.executable, "-m", "fcdm_jax.main", f"--config={TINY_CONFIG}",
                         f"--workdir={one}", f"--config.data.path={dataset}",
                         "--config.num_train_steps=6"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stdout + proc.stderr
  assert "mesh {'data': 8, 'fsdp': 1}" in log
  assert "mesh {'data': 4, 'fsdp': 1}" in first[0]
  two_hosts = {**logged_losses(first[0]), **logged_losses(second[0])}
  one_host = logged_losses(log)
  assert sorted(two_hosts) == sorted(one_host) == [2, 4, 6]
  for step in one_host:
    assert two_hosts[step] == pytest.approx(one_host[step], rel=1e-4), step
  alone, _, _ = restore_final(one)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(alone.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def logged_losses(log: str) -> dict[int, float]:
  """{step: loss} from a run's metric lines ('... [4] grad_norm=..., loss=0.51, ...')."""
  import re
  return {int(step): float(loss) for step, loss in
          re.findall(r"\[(\d+)\] [^\n]*?\bloss=([-+0-9.eE]+)", log)}


@pytest.mark.slow
def test_hosts_starting_40_s_apart_and_ending_10_s_apart_exit_0_everywhere(tmp_path, dataset):
  """Host 1 reaches its first step 40 s after host 0 (a slower compile on a loaded host:
  on CPU the cross-process collectives give up after 30 s unless the first step starts
  together) and host 0 reaches the end 10 s after host 1 (the agreed exit barrier and
  explicit jax.distributed.shutdown of fcdm_jax.cli: no race with the other's teardown)."""
  results = two_processes(
      [str(REPO / "tests/helpers/slow_main.py"), f"--config={TINY_CONFIG}",
       f"--workdir={tmp_path}", f"--config.data.path={dataset}",
       "--config.num_train_steps=2"],
      env_extra=dict(STEP_DELAY="0", START_DELAY="40", START_DELAY_PROCESS="1",
                     END_DELAY="10", END_DELAY_PROCESS="0"))
  for status, out in results:
    assert status == 0, out[-3000:]
  assert "done: " in results[0][1] and "done: " in results[1][1]


@pytest.mark.slow
def test_two_hosts_with_the_same_bad_input_both_exit_1_with_one_line(tmp_path, dataset):
  """The error path ends the same agreed way: each host prints its one error line, waits
  for the other at the exit barrier and shuts down; neither hangs or aborts."""
  missing = tmp_path / "no_such_dataset"   # found missing after jax.distributed started
  results = two_processes(["-m", "fcdm_jax.main", f"--config={TINY_CONFIG}",
                           f"--workdir={tmp_path / 'run'}", f"--config.data.path={missing}"],
                          timeout=300)
  for status, out in results:
    assert status == 1, out[-3000:]
    assert "jax.distributed: process" in out, out[-3000:]
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "no_such_dataset" in errors[0], out[-3000:]
    assert "Traceback" not in out and "Check failure" not in out
