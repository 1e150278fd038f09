"""The training loop: set up, resume, step, log, checkpoint, preview, stop cleanly.

Where each step of training happens:
  set-up checks ........ `config_checks.check_config` (the config's values), then
                         `check_run_setup` (batch and mesh), `check_resumable` (steps)
  devices and mesh ..... `fcdm_jax.sharding.create_mesh`
  data ................. `fcdm_jax.data.make_source` (position = step)
  state / resume ....... `fcdm_jax.train.state.create_train_state`, `checkpoint.Checkpointer`,
                         or a PyTorch checkpoint (`config.init_from`, `torch_state`)
  one step ............. `fcdm_jax.train.step.make_train_step` (compiled once, then from
                         the persistent cache: `fcdm_jax.compilation_cache`)
  metrics .............. clu writers + `ReportProgress` (host 0 writes)
  previews ............. `fcdm_jax.train.preview.PreviewWriter`
  evaluation ........... the `make_evaluators` the entry point passes in (`fcdm_jax.main`:
                         `fcdm_jax.evaluation.make_evaluators`); the loop only calls them
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from fcdm_jax import data as data_lib
from fcdm_jax import compilation_cache, config_checks, distributed, fileio, provenance
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.models import FCDM
from fcdm_jax import checkpoint as ckpt_lib
from fcdm_jax import sharding
from fcdm_jax.train import torch_state
from fcdm_jax.train.state import create_train_state, make_optimizer, state_layout
from fcdm_jax.train.preview import PreviewWriter
from fcdm_jax.train.step import jit_train_step, make_train_step


class NonFiniteLossError(ValueError):
  """The loss or gradient became NaN/inf: the run stops before saving anything after it.
  A ValueError: the fix is the user's (a setting or the data), so a command says it in one
  line."""


class PreemptionFlag:
  """Whether to save and stop after this step (SIGTERM on any host), decided without a
  cross-host collective in the steps between.

  One process: a Python SIGTERM handler sets a flag. Several processes: JAX's preemption
  sync manager (started by `jax.distributed.initialize`) catches SIGTERM on any host, and
  the coordination service picks a step that every host reaches; `should_stop(step)` asks
  it locally each step (`multihost_utils.reached_preemption_sync_point`), so no step waits
  for another host's Python. Without that service (disabled by config), the hosts agree on
  their flags only every `fallback_every` steps, with one all-gather.
  """

  def __init__(self, fallback_every: int = 100):
    self.requested = False
    self.fallback_every = max(int(fallback_every), 1)
    self._previous = None
    self._sync_manager = None

  def __enter__(self):
    if jax.process_count() > 1:
      from jax._src import distributed as jax_distributed
      self._sync_manager = getattr(jax_distributed.global_state, "preemption_sync_manager", None)
    if self._sync_manager is not None:
      return self  # its own SIGTERM handler must stay installed: no Python one over it

    def handler(signum, frame):
      logging.warning("SIGTERM received: saving a checkpoint after this step and stopping")
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. under a test runner thread)
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    """All hosts return the same answer for the same step."""
    if jax.process_count() == 1:
      return self.requested
    if self._sync_manager is not None:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning("preemption notice (SIGTERM on a host): every host saves step %d and "
                        "stops", step)
        return True
      return False
    if step % self.fallback_every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
    return bool(np.any(flags))


def check_workdir(workdir: str) -> None:
  """A clear error now rather than a failed checkpoint hours later (local or gs:// alike)."""
  probe = fileio.join(workdir, f".write_test_{jax.process_index()}")
  try:
    fileio.atomic_write_bytes(probe, b"ok")
    fileio.remove(probe)
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not writable: {e}") from e


def check_run_setup(config, mesh) -> None:
  """The batch layout checks that need the mesh (the config's own values:
  `config_checks.check_config`)."""
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % dp:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the data-parallel "
                     f"size {dp} (mesh {dict(mesh.shape)}); use a multiple of {dp}")
  accum = int(config.grad_accum_steps)
  if config.batch_size % (accum * dp):
    # Each micro-batch is split over the same devices as the batch.
    raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum_steps "
                     f"{accum} x the data-parallel size {dp} (mesh {dict(mesh.shape)}); use "
                     f"a multiple of {accum * dp}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the number of "
                     f"processes {jax.process_count()}")


def check_resumable(checkpointer, config) -> None:
  """Refuses a run whose num_train_steps is below the step its workdir is already at
  (it would train nothing and end at the checkpoint's step)."""
  latest = checkpointer.latest_step()
  if latest is not None and latest > config.num_train_steps:
    checkpointer.close()
    raise ValueError(f"config.num_train_steps={config.num_train_steps} is below the step of "
                     f"this workdir's latest checkpoint ({latest} in {checkpointer.directory}): "
                     f"nothing would be trained; pass --config.num_train_steps above {latest}"
                     ", or use a new --workdir")


@dataclasses.dataclass
class MetricBuffer:
  """Per-step metrics stay on device until a log or checkpoint boundary (no per-step sync)."""
  pending: list = dataclasses.field(default_factory=list)

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def flush(self) -> tuple[dict[str, float], int | None]:
    """Means over the buffered steps and the first step whose loss was not finite."""
    if not self.pending:
      return {}, None
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    bad = next((s for s, m in zip(steps, fetched) if not bool(m["finite"])), None)
    keys = [k for k in fetched[0] if k != "finite"]
    means = {k: float(np.mean([float(m[k]) for m in fetched])) for k in keys}
    return means, bad


def train_and_evaluate(config, workdir: str, make_evaluators=None) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns a summary.

  `make_evaluators(config, mesh, workdir)` returns the evaluators of config.eval: objects
  with `every_steps` (0: only when training completes) and `__call__(step, ema_params,
  writer) -> dict`. Built before the first step, so that a bad evaluation setup fails then.
  """
  config_checks.check_config(config, training=True)   # before anything is written
  distributed.maybe_initialize(config.distributed)
  if jax.process_count() > 1:
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  check_workdir(workdir)
  compilation_cache.enable(config.compilation_cache_dir, workdir)
  compilation_cache.CacheStats.install()
  model = FCDM(**config.model)
  objective = make_objective(config)
  tx = make_optimizer(config)
  mesh = sharding.create_mesh(config)
  check_run_setup(config, mesh)
  evaluators = build_evaluators(config, mesh, workdir, make_evaluators)
  source = data_lib.make_source(config, process_index=jax.process_index(),
                                process_count=jax.process_count())
  input_shape = tuple(source.element_shape)
  is_host0 = jax.process_index() == 0
  logging.info("mesh %s; %s", dict(mesh.shape), source)

  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  check_resumable(checkpointer, config)
  abstract, shardings = state_layout(config, model, tx, mesh, input_shape)
  logging.info("%s", sharding.describe(shardings, abstract))
  restored = checkpointer.restore_newest_intact(
      abstract, lambda meta: ckpt_lib.check_same_model(meta.get("config", {}), config,
                                                       "use a new --workdir"))
  init_from = config.init_from
  if restored is not None:
    state, _, resumed_step = restored
    if init_from:
      logging.info("init_from=%s ignored: the workdir has checkpoints, resuming them", init_from)
    logging.info("resumed from checkpoint at step %d", resumed_step)
  elif init_from:
    state = torch_state.state_from_torch(init_from, config, abstract)
    torch_step = int(jax.device_get(state.step))
    if torch_step > config.num_train_steps:
      raise ValueError(f"config.num_train_steps={config.num_train_steps} is below the step of "
                       f"config.init_from={init_from} ({torch_step}): nothing would be "
                       f"trained; pass --config.num_train_steps above {torch_step}")
    logging.info("starting from the PyTorch checkpoint %s at step %d", init_from, torch_step)
  else:
    state, _, _ = create_train_state(config, model, tx, mesh, input_shape)
    logging.info("starting from scratch: %d parameters",
                 sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params)))
  start_step = int(jax.device_get(state.step))

  train_step = jit_train_step(make_train_step(config, model, objective, tx), mesh,
                              shardings, config)
  # TensorFlow (under clu's writers) is imported here, not with the module: it takes
  # seconds, which `--help` and an error found before this point need not wait for.
  from clu import periodic_actions
  from fcdm_jax.train import events  # imports clu's writers, so TensorFlow: deferred (above)
  writer = events.create_writer(workdir, is_host0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat_config(config).items()})
  hooks = [periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                           writer=writer, every_steps=config.log_every_steps)]
  if config.profile_steps > 0 and is_host0:
    hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                          logdir=workdir))
  preview = None
  if config.preview.every_steps > 0:
    preview = PreviewWriter(config, mesh, workdir, writer)

  buffer = MetricBuffer()
  summary = {"start_step": start_step, "end_step": start_step, "stopped_by": "completed"}
  first_step_seconds = None
  cache_before = compilation_cache.CacheStats.snapshot()
  previous_metrics = None
  step = start_step
  images_timer = (time.time(), step)
  # Closing the host iterator stops its prefetch thread (it would otherwise outlive the run).
  with PreemptionFlag(fallback_every=config.log_every_steps) as preemption, \
       source.iterate(start_step) as host_batches:
    batches = device_batches(host_batches, mesh)
    while step < config.num_train_steps:
      t0 = time.time()
      batch = next(batches)
      state, metrics = train_step(state, batch)
      step += 1
      buffer.add(step, metrics)
      if first_step_seconds is None:
        jax.block_until_ready(metrics)
        first_step_seconds = time.time() - t0
        hits, saved = compilation_cache.CacheStats.snapshot()
        hits, saved = hits - cache_before[0], saved - cache_before[1]
        logging.info("first step (with compilation) took %.1f s; compilation cache: %d hits, "
                     "%.1f s of compiling saved", first_step_seconds, hits, saved)
        summary["compilation_cache_hits"] = hits
        images_timer = (time.time(), step)
      elif previous_metrics is not None:
        # Keep one step in flight: the host never runs far ahead of the devices, so
        # the progress figures are real and queued batches do not pile up.
        jax.block_until_ready(previous_metrics)
      previous_metrics = metrics
      stop = preemption.should_stop(step)
      last = step == config.num_train_steps
      save = stop or last or step % config.checkpoint_every_steps == 0
      if save or step % config.log_every_steps == 0:
        means, bad_step = buffer.flush()
        if bad_step is not None:
          checkpointer.wait()
          latest = checkpointer.latest_step()
          kept = (f"the last checkpoint (step {latest}) in {checkpointer.directory} is "
                  "intact" if latest is not None else "no checkpoint had been written yet")
          raise NonFiniteLossError(
              f"loss or gradient became non-finite at step {bad_step}: stopping. Nothing "
              f"from that step on was saved; {kept}. "
              "Lower the learning rate, enable grad_clip_norm, or check the data.")
        if means and step % config.log_every_steps == 0:
          t_then, step_then = images_timer
          elapsed = max(time.time() - t_then, 1e-9)
          means["images_per_sec"] = (step - step_then) * config.batch_size / elapsed
          images_timer = (time.time(), step)
          writer.write_scalars(step, means)
      for hook in hooks:
        hook(step)
      if save:
        checkpointer.save(step, state, {"data_position": step, "config": provenance.as_json(config),
                                        "jax_version": jax.__version__})
        writer.flush()   # the events up to a checkpoint are in the workdir with it
      if preview is not None and (step % config.preview.every_steps == 0 or last):
        preview.write(step, state.ema_params)
      for evaluate in evaluators:
        if evaluate.every_steps and step % evaluate.every_steps == 0 and not last:
          evaluate(step, state.ema_params, writer)
      if stop:
        summary["stopped_by"] = "SIGTERM"
        break
  checkpointer.wait()
  if evaluators and summary["stopped_by"] == "completed":
    summary["eval"] = [evaluate(step, state.ema_params, writer) for evaluate in evaluators]
  writer.close()
  summary.update(end_step=step, first_step_seconds=first_step_seconds)
  if preview is not None:
    summary["last_preview"] = preview.last_path
  checkpointer.close()
  return dict(summary, state=state)


def build_evaluators(config, mesh, workdir: str, make_evaluators) -> list:
  if not config.eval.enabled:
    return []
  if make_evaluators is None:
    raise ValueError("config.eval.enabled is set but no evaluators were passed: train with "
                     "`python -m fcdm_jax.main`, or pass make_evaluators="
                     "fcdm_jax.evaluation.make_evaluators to train_and_evaluate")
  return list(make_evaluators(config, mesh, workdir))


def device_batches(host_batches, mesh, ahead: int = 2):
  """Global device arrays built `ahead` batches early, so the transfer to the devices
  overlaps the step in flight."""
  queue = collections.deque()
  for local in host_batches:
    queue.append(sharding.global_batch(local, mesh))
    if len(queue) > ahead:
      yield queue.popleft()


def _flat_config(config, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_flat_config(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
  return out
