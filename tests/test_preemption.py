"""Preemption on a pod: SIGTERM on one host makes every host save the same step, and the
steps in between issue no cross-host collective for it."""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fcdm_jax.train import loop

from helpers.training import TINY_CONFIG, make_latent_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_on_one_host_saves_the_same_step_on_every_host(tmp_path):
  dataset = make_latent_dataset(tmp_path / "latents")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}", STEP_DELAY="0.3",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    cmd = [sys.executable, str(REPO / "tests/helpers/slow_main.py"), f"--config={TINY_CONFIG}",
           f"--workdir={tmp_path / 'run'}", f"--config.data.path={dataset}",
           "--config.num_train_steps=1000", "--config.checkpoint_every_steps=10",
           "--config.log_every_steps=5"]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  tenth = tmp_path / "run" / "checkpoints" / "10"
  deadline = time.time() + 400
  while not (tenth / "_CHECKPOINT_METADATA").exists() and time.time() < deadline:
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # one host only
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  saved = [re.search(r"every host saves step (\d+)", out) for out in outs]
  assert all(saved), [out[-2000:] for out in outs]
  steps = {int(m.group(1)) for m in saved}
  assert len(steps) == 1
  step = steps.pop()
  assert 10 < step < 1000
  assert (tmp_path / "run" / "checkpoints" / str(step)).is_dir()
  for out in outs:
    assert f"'end_step': {step}" in out and "'stopped_by': 'SIGTERM'" in out
    # The old per-step agreement issued one all-gather per step; now none at all.
    checks = re.search(r"preemption checks: (\d+) steps, (\d+) cross-host collectives", out)
    assert int(checks.group(1)) >= step - 1 and int(checks.group(2)) == 0, checks.group(0)


class _SyncManager:
  """Stands in for JAX's preemption sync manager: a sync point at one step."""

  def __init__(self, at):
    self.at, self.asked = at, []

  def reached_sync_point(self, step):
    self.asked.append(step)
    return step == self.at


def test_no_collective_between_sync_points(monkeypatch):
  from jax._src import distributed as jax_distributed
  from jax.experimental import multihost_utils

  def collective(*args, **kwargs):
    raise AssertionError("a cross-host collective was issued for preemption")

  manager = _SyncManager(at=7)
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax_distributed.global_state, "preemption_sync_manager", manager)
  monkeypatch.setattr(jax_distributed.global_state, "client", object())
  monkeypatch.setattr(multihost_utils, "process_allgather", collective)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", collective)
  with loop.PreemptionFlag(fallback_every=5) as flag:
    stops = [flag.should_stop(step) for step in range(1, 10)]
  assert stops == [step == 7 for step in range(1, 10)] and manager.asked == list(range(1, 10))


def test_without_the_sync_service_hosts_agree_every_n_steps(monkeypatch):
  from jax._src import distributed as jax_distributed
  from jax.experimental import multihost_utils
  gathered = []

  def allgather(value):
    gathered.append(int(value))
    return np.array([int(value), 0])

  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax_distributed.global_state, "preemption_sync_manager", None)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  with loop.PreemptionFlag(fallback_every=5) as flag:
    flag.requested = True
    stops = [flag.should_stop(step) for step in range(1, 11)]
  assert stops == [step in (5, 10) for step in range(1, 11)] and gathered == [1, 1]
