"""Training runs for the tests: the training command on the tiny config in a subprocess,
what a run leaves behind (its final checkpoint, its TensorBoard scalars), and a workdir
holding an untrained model's checkpoint, laid out as the training loop writes it."""

import glob
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

from fcdm_jax import checkpoint as ckpt_lib
from fcdm_jax import sharding
from fcdm_jax.models import FCDM
from fcdm_jax.train.state import TrainState, make_optimizer, state_layout

from helpers.training import TESTS, TINY_CONFIG, load_config

REPO = TESTS.parent
STEP = 7   # the step of make_workdir's checkpoint


def mesh_of(n, data, fsdp):
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]).reshape(data, fsdp), ("data", "fsdp"))


def run_main(workdir, dataset, *extra, wait=True, step_delay=None):
  """The training command in a subprocess with 2 fake devices (slowed for signal tests)."""
  entry = ["-m", "fcdm_jax.main"] if step_delay is None else [str(REPO / "tests/helpers/slow_main.py")]
  cmd = [sys.executable, *entry, f"--config={TINY_CONFIG}",
         f"--workdir={workdir}", f"--config.data.path={dataset}", *extra]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
             STEP_DELAY=str(step_delay or 0))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def two_processes(argv, env_extra=None, timeout=600):
  """Runs `python argv...` as 2 jax.distributed processes x 2 CPU devices on localhost;
  returns [(exit status, output)] of process 0 and 1."""
  port, procs = free_port(), []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), **(env_extra or {}))
    procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [(p.returncode, out) for p, out in zip(procs, outs)]


def restore_final(workdir, config_overrides=None):
  config = load_config(**(config_overrides or {}))
  mesh = mesh_of(1, 1, 1)
  abstract, _ = state_layout(config, FCDM(**config.model), make_optimizer(config), mesh,
                             (8, 8, 4))
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=100)
  state, meta = ckpt.restore(ckpt.latest_step(), abstract)
  steps = ckpt.all_steps()
  ckpt.close()
  return jax.device_get(state), meta, steps


def wait_for_checkpoint(workdir, step, proc, timeout=300):
  target = pathlib.Path(workdir) / "checkpoints" / str(step)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if target.is_dir() and (target / "_CHECKPOINT_METADATA").exists():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended before checkpoint {step}: {proc.stdout.read()[-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"checkpoint {step} did not appear")


def scalars(workdir: str) -> dict:
  """{tag: {step: value}} from the run's TensorBoard event files."""
  import tensorflow as tf
  out = {}
  for path in glob.glob(f"{workdir}/events.out.tfevents*"):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith("eval/"):
          out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def make_workdir(path, config, seed=0):
  """A training checkpoint of an untrained model, as the training loop lays it out.

  The state is built on `state_layout` (the layout `create_train_state` initialises into)
  with random numpy values rather than by compiling the initialiser (about 25 s on two CPU
  cores), and with non-zero output layers, so that samples depend on weights and labels.
  """
  model = FCDM(**config.model)
  # One device: saving replicated arrays from 8 fake devices costs orbax a slice per copy.
  mesh = sharding.create_mesh(config, jax.devices()[:1])
  size = config.latent_size
  abstract, _ = state_layout(config, model, make_optimizer(config), mesh,
                             (size, size, config.model.in_channels))
  rng = np.random.default_rng(seed)

  def weights(a):
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 10
    return (rng.normal(size=a.shape) / np.sqrt(fan_in)).astype(a.dtype)

  put = lambda values, ref: jax.tree.map(lambda v, r: jax.device_put(v, r.sharding), values, ref)
  zeros = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)
  params = jax.tree.map(weights, abstract.params)
  ema = jax.tree.map(weights, abstract.ema_params)
  state = TrainState(step=put(np.int32(STEP), abstract.step), params=put(params, abstract.params),
                     opt_state=put(zeros(abstract.opt_state), abstract.opt_state),
                     ema_params=put(ema, abstract.ema_params),
                     rng=put(np.arange(2, dtype=np.uint32), abstract.rng))
  ckpt = ckpt_lib.Checkpointer(str(path), keep=2)
  ckpt.save(STEP, state, {"data_position": STEP,
                          "config": json.loads(config.to_json_best_effort())})
  ckpt.close()
  return str(path), ema


def run_without_module(module: str, argv, tmp_path, timeout=300):
  """Runs `python argv...` from the repository on the CPU with `module` hidden from
  importlib's finder (a sitecustomize stub): a machine without an optional extra."""
  hide = tmp_path / "sitecustomize.py"
  hide.write_text("import importlib.util as u\n_f = u.find_spec\n"
                  f"u.find_spec = lambda n, *a, **k: None if n == {module!r} "
                  "else _f(n, *a, **k)\n")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, env=env)
