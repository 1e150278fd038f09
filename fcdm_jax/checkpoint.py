"""Asynchronous Orbax checkpoints of the whole train state, its data position and config.

A checkpoint holds two items: 'state' (params, AdamW state, EMA, step, PRNG key data)
and 'meta' (JSON: the data position, the config, versions). Orbax writes each step into
a temporary folder and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact and the partial one is ignored. Restoring takes an abstract
state whose leaves carry the target shardings: a checkpoint written on 8 devices
restores onto 1 or 4, or another mesh. Sampling, evaluation and export restore the params
alone (`load_ema_params`): orbax's partial restore reads only those arrays, each device
only its shards.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from fcdm_jax import distributed, fileio, provenance, sharding
from fcdm_jax.models import FCDM

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"  # beside CHECKPOINT_DIR: damaged steps, set aside


def checkpoint_dir(workdir: str) -> str:
  """Orbax needs absolute paths; gs:// and other URLs are kept as given."""
  return fileio.absolute(fileio.join(workdir, CHECKPOINT_DIR))


class Checkpointer:
  """The run's CheckpointManager: save every `checkpoint_every_steps`, keep the last N."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True, read_only: bool = False):
    if not read_only and keep < 1:   # orbax's max_to_keep=0 deletes every checkpoint
      raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        create=not read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save; `wait()` before relying on it or exiting."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(json.loads(json.dumps(meta)))), force=True)

  def restore_meta(self, step: int) -> dict:
    """Only the JSON item (cheap): config and data position of a checkpoint."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores onto the shardings attached to `abstract_state`'s leaves."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def restore_newest_intact(self, abstract_state, check_meta: Callable[[dict], None]):
    """(state, meta, step) of the newest checkpoint that can be read, or None if there are
    no checkpoints.

    A checkpoint whose settings or arrays cannot be read (truncated, half-copied) is
    reported with its step and folder, moved aside to `<workdir>/checkpoints_damaged/`
    (never deleted) and the next older one is tried. `check_meta(meta)` may refuse a
    readable checkpoint (another model): that error stops the run, nothing is moved. A
    readable checkpoint whose arrays do not fit `abstract_state` (changed optimizer
    settings) is refused the same way. If every checkpoint is damaged, the error names them.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # orbax/json raise many kinds: all mean "cannot read"
        damaged.append(self._set_aside(step, e))
        continue
      check_meta(meta)
      try:
        state, _ = self.restore(step, abstract_state)
      except Exception as e:
        if not self._stored_shapes_fit(step, abstract_state):
          raise ValueError(f"checkpoint at step {step} in {self.directory} holds a train "
                           "state of other shapes than this config's (changed optimizer or "
                           "model settings?); use a new --workdir") from e
        damaged.append(self._set_aside(step, e))
        continue
      return state, meta, step
    if damaged:
      raise RuntimeError(f"every checkpoint in {self.directory} is damaged; moved aside: "
                         f"{damaged}. Start a new --workdir, or restore a copy of one of them.")
    return None

  def _stored_shapes_fit(self, step: int, abstract_state) -> bool:
    """Whether the checkpoint's recorded arrays (tree paths and shapes) are those of
    `abstract_state`: then a failed restore means damage. An unreadable record counts as
    fitting (damage too)."""
    try:
      stored = _paths_and_shapes(self.manager.item_metadata(step)["state"])
    except Exception:
      return True
    return stored == _paths_and_shapes(abstract_state)

  def _set_aside(self, step: int, error: Exception) -> str:
    """Moves a damaged step folder out of orbax's view (host 0; every host then re-reads)."""
    source = fileio.join(self.directory, str(step))
    target = fileio.join(fileio.path(self.directory).parent, DAMAGED_DIR,
                         f"{step}-{int(time.time())}")
    logging.error("checkpoint at step %d (%s) cannot be read: %s: %s. Moving it aside to %s "
                  "and trying the previous one.", step, source, type(error).__name__,
                  str(error).splitlines()[0][:300] if str(error) else "", target)
    if jax.process_index() == 0 and fileio.exists(source):
      fileio.move(source, target)
    distributed.barrier(f"checkpoint_set_aside_{step}")
    self.manager.reload()
    return target

  def restore_parts(self, step: int, abstract_parts: dict[str, Any]) -> dict[str, Any]:
    """Only the named fields of the saved state (e.g. {'ema_params': tree}), each leaf read
    straight into the sharding its abstract leaf carries; the other fields are not read."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_parts)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract_parts, restore_args=restore_args,
                                     partial_restore=True)))
    return dict(restored["state"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    # orbax starts removing stale temporary directories in a thread when the manager is made
    # and awaits it only in save() (orbax-checkpoint 0.12.8): a command that stops before its
    # first save (bad input) must wait for it here, or the thread can outlive the
    # interpreter's executors and print a traceback at exit. Private, hence looked up.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.wait_until_finished()
    self.manager.close()


def _paths_and_shapes(tree) -> list[tuple[str, tuple[int, ...]]]:
  def name(entry):
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return sorted(("/".join(name(e) for e in path), tuple(leaf.shape))
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0])


def saved_config(workdir: str, step: int | None = None):
  """The config a run was trained with (from its checkpoint's meta), as a ConfigDict."""
  ckpt = Checkpointer(workdir, keep=1000, async_save=False, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt.directory}; it has steps "
                            f"{sorted(steps)}")
  try:
    meta = ckpt.restore_meta(step)
  except Exception as e:
    raise ValueError(f"checkpoint at step {step} in {ckpt.directory} cannot be read: its "
                     f"settings (meta) are damaged: {e}") from e
  return _config_dict(meta["config"]), step


def _config_dict(saved: dict):
  config = ml_collections.ConfigDict(saved)
  config.model.depth = tuple(config.model.depth)
  return config


PARAM_FIELDS = ("ema", "params")
# The config fields that decide the params' tree and shapes (the rest is how they run).
ARCHITECTURE = ("in_channels", "hidden_size", "depth", "mlp_ratio", "num_classes", "learn_sigma",
                "class_dropout_prob", "condition", "text_dim", "text_embedder")


def check_same_model(saved_config: dict, config, advice: str) -> None:
  """Refuses, naming the differing fields, a config whose network is not the checkpoint's."""
  # Fields a config saved before they existed holds the defaults of.
  defaults = {f.name: f.default for f in dataclasses.fields(FCDM) if f.name in ARCHITECTURE}
  arch = lambda c, model: dict({k: model.get(k, defaults.get(k)) for k in ARCHITECTURE},
                               objective=c.get("objective"))
  now = provenance.as_json(config)
  provenance.refuse_changes(arch(saved_config, saved_config.get("model", {})),
                          arch(now, now["model"]),
                          "the workdir's checkpoint was trained with other model fields", advice)


def load_params(workdir: str, config=None, step: int | None = None, which: str = "ema",
                mesh=None):
  """The EMA (or raw) params of a run's checkpoint, and nothing else of its state.

  They are read straight into the shardings `config` asks for on `mesh` (default: the
  config's mesh over all devices), so an FSDP model (L/XL) arrives sharded: each device
  reads its shard only, and neither the AdamW moments nor the other params are read.
  Returns (params, config, step). The config defaults to the one saved with the run.
  """
  if which not in PARAM_FIELDS:
    raise ValueError(f"which must be one of {PARAM_FIELDS}, got {which!r}")
  ckpt = Checkpointer(workdir, keep=1000, async_save=False, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    saved = ckpt.restore_meta(step)["config"]
    if config is None:
      config = _config_dict(saved)
    else:
      check_same_model(saved, config, "pass a config with the run's own model fields")
    if mesh is None:
      mesh = sharding.create_mesh(config)
    field = "ema_params" if which == "ema" else "params"
    try:
      params = ckpt.restore_parts(step, {field: params_layout(config, mesh)})[field]
    except ValueError as e:   # e.g. a model field this check does not know
      raise ValueError(f"the checkpoint at step {step} in {ckpt.directory} does not hold "
                       f"{field} of the config's model: {e}") from e
  finally:
    ckpt.close()
  return params, config, step


def load_ema_params(workdir: str, config=None, step: int | None = None, mesh=None):
  """(EMA params in the config's shardings, config, step): what sampling and export need."""
  return load_params(workdir, config=config, step=step, which="ema", mesh=mesh)


def params_layout(config, mesh: Mesh):
  """Abstract params (and so EMA) of the config's model with the config's shardings
  attached: where sampling and export place weights, whatever their source. The same
  shardings as the params and EMA of the train state (`sharding.state_shardings`)."""
  model = FCDM(**config.model)
  size = int(config.latent_size)
  x = jnp.zeros((1, size, size, int(config.model.in_channels)), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  boxed = jax.eval_shape(lambda r: model.init({"params": r}, x, t, model.example_y(1))["params"],
                         jax.random.PRNGKey(0))
  shardings = sharding.state_shardings(boxed, config, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(boxed), shardings)
