"""The whole train state <-> a training checkpoint of the published PyTorch code.

The published `train.py` saves `{"model": state_dict, "ema": state_dict, "opt":
AdamW(model.parameters()).state_dict(), "args": ...}` and resumes with `load_state_dict`
on all three. Our AdamW (optax `scale_by_adam` inside `adamw`) keeps the same first and
second moments and bias-corrects them the same way, so a run moves between the two code
bases without losing its optimizer: moment `i` of torch's `state` is the moment of the
`i`-th published parameter (`convert.torch_layout` order, which is `model.parameters()`
order), in the parameter's own layout, and torch's `step` is optax's `count`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
import optax
from absl import logging

from fcdm_jax import checkpoint as ckpt_lib
from fcdm_jax import convert, fileio, sharding
from fcdm_jax.models import FCDM, torch_weights
from fcdm_jax.train.state import TrainState, learning_rate_fn, make_optimizer, state_layout

_COUNTED = (optax.ScaleByAdamState, optax.ScaleByScheduleState)


def _adam_state(opt_state) -> optax.ScaleByAdamState:
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _COUNTED))
           if isinstance(s, optax.ScaleByAdamState)]
  if len(found) != 1:
    raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
  return found[0]


def _with_adam_state(opt_state, count, mu, nu):
  """`opt_state` with the Adam moments replaced and every step counter (Adam's bias
  correction, the learning-rate schedule's position) set to `count`."""
  def replace(s):
    if isinstance(s, optax.ScaleByAdamState):
      return s._replace(count=count, mu=mu, nu=nu)
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=count)
    return s
  return jax.tree.map(replace, opt_state, is_leaf=lambda x: isinstance(x, _COUNTED))


def _param_groups(config, step: int, num_params: int) -> list[dict]:
  """torch's own AdamW param group (every field its `load_state_dict` expects, in the
  installed torch's spelling) with our hyper-parameters and the current learning rate."""
  import torch
  opt = config.optimizer
  dummies = [torch.nn.Parameter(torch.zeros(1)) for _ in range(num_params)]
  lr = float(learning_rate_fn(config)(step))
  return torch.optim.AdamW(dummies, lr=lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                           weight_decay=opt.weight_decay).state_dict()["param_groups"]


def torch_optimizer_state(state: TrainState, config) -> dict[str, Any]:
  """torch `AdamW.state_dict()` (arrays as numpy) of a host-side train state."""
  adam = _adam_state(state.opt_state)
  step = int(np.asarray(adam.count))
  mu, nu = convert.params_to_torch(adam.mu), convert.params_to_torch(adam.nu)
  per_param = {}
  if step > 0:  # torch has no state for a parameter before its first step
    per_param = {i: {"step": np.asarray(step, np.float32),
                     "exp_avg": np.asarray(mu[key], np.float32),
                     "exp_avg_sq": np.asarray(nu[key], np.float32)}
                 for i, key in enumerate(mu)}
  return {"state": per_param, "param_groups": _param_groups(config, step, len(mu))}


def run_args(config, step: int) -> dict[str, Any]:
  """The run's settings under the published `train.py` argument names where it has them.
  A plain dict (not argparse.Namespace) so that `torch.load(weights_only=True)` reads it
  with any torch version."""
  m = config.model
  return {"model": config.get("name", "fcdm"), "image_size": int(config.image_size),
          "num_classes": int(m.num_classes), "global_batch_size": int(config.batch_size),
          "global_seed": int(config.seed), "lr": float(config.optimizer.learning_rate),
          "train_steps": int(step), "objective": config.objective,
          "hidden_size": int(m.hidden_size), "depth": [int(d) for d in m.depth],
          "mlp_ratio": float(m.mlp_ratio), "learn_sigma": bool(m.learn_sigma),
          "exported_by": "fcdm_jax.export_torch"}


def training_checkpoint(state: TrainState, config) -> dict[str, Any]:
  """`{"model", "ema", "opt", "args"}` content for `convert.save_torch_checkpoint`."""
  step = int(np.asarray(state.step))
  return dict(params=state.params, ema_params=state.ema_params,
              opt=torch_optimizer_state(state, config), args=run_args(config, step))


# ----------------------------------------------------------------------------- import


def _moments_from_torch(opt: Mapping, model: FCDM) -> tuple[int, Any, Any]:
  """(step, mu, nu) in Flax layout from a torch AdamW state_dict; checks it fits `model`."""
  if not isinstance(opt, Mapping) or "state" not in opt or "param_groups" not in opt:
    raise ValueError("the checkpoint's 'opt' is not a torch optimizer state_dict "
                     "(no 'state' / 'param_groups')")
  groups = opt["param_groups"]
  keys = [e.torch_key for e in convert.torch_layout(
      model.depth, model.condition_kind.torch_text_embedder(model))]
  indices = [i for g in groups for i in g["params"]]
  if len(groups) != 1 or sorted(indices) != list(range(len(keys))):
    raise ValueError(f"the checkpoint's optimizer has {len(groups)} param group(s) over "
                     f"{len(indices)} parameters; expected one group over the model's "
                     f"{len(keys)} parameters in model.parameters() order")
  per_param = {int(k): v for k, v in opt["state"].items()}
  if not per_param:
    return 0, None, None
  missing = [keys[i] for i in range(len(keys)) if i not in per_param]
  if missing:
    raise ValueError(f"the checkpoint's optimizer has no moments for {len(missing)} "
                     f"parameters, e.g. {missing[:3]}")
  steps = {float(np.asarray(per_param[i]["step"])) for i in range(len(keys))}
  if len(steps) != 1:
    raise ValueError(f"the checkpoint's parameters were stepped unequally: steps {sorted(steps)}")
  mu = {keys[i]: per_param[i]["exp_avg"] for i in range(len(keys))}
  nu = {keys[i]: per_param[i]["exp_avg_sq"] for i in range(len(keys))}
  try:
    mu, nu = convert.params_from_torch(mu, model), convert.params_from_torch(nu, model)
  except ValueError as e:
    raise ValueError(f"the checkpoint's AdamW moments do not fit the model: {e}") from e
  return int(steps.pop()), mu, nu


def _check_hyperparameters(opt: Mapping, config) -> None:
  group = opt["param_groups"][0]
  ours = config.optimizer
  theirs = {"betas": tuple(group.get("betas", ())), "eps": group.get("eps"),
            "weight_decay": group.get("weight_decay")}
  mine = {"betas": (ours.b1, ours.b2), "eps": ours.eps, "weight_decay": ours.weight_decay}
  for key, value in theirs.items():
    if value is not None and not np.allclose(value, mine[key]):
      logging.warning("init_from: the PyTorch run used %s=%s; continuing with the config's %s",
                      key, value, mine[key])


def _by_path(tree) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(p.key) for p in path): v for path, v in flat}


def _as_tree_of(abstract_params, values) -> Any:
  """`values` (nested dicts from `convert`) in the structure and dtypes of `abstract_params`."""
  lookup = _by_path(values)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: np.asarray(lookup[tuple(str(p.key) for p in path)], a.dtype),
      abstract_params)


def host_state_from_torch(path: str, config, abstract: TrainState) -> TrainState:
  """A host-side (numpy) train state from a PyTorch checkpoint file.

  Weights come from "model" (or the file's only state_dict); EMA from "ema" if present,
  else the weights; AdamW moments and step from "opt" if present, else fresh (step 0).
  """
  model = FCDM(**config.model)
  ckpt = torch_weights.read_torch_file(path)
  nested = any(isinstance(ckpt.get(k), Mapping) for k in ("model", "ema"))
  weights = ckpt.get("model", ckpt.get("ema")) if nested else ckpt
  try:
    params = convert.params_from_torch(weights, model)
    ema = convert.params_from_torch(ckpt["ema"], model) if "ema" in ckpt else params
  except ValueError as e:
    raise ValueError(f"init_from={path} does not fit the config's model: {e}") from e
  step, mu, nu = 0, None, None
  if nested and "opt" in ckpt:
    step, mu, nu = _moments_from_torch(ckpt["opt"], model)
    _check_hyperparameters(ckpt["opt"], config)
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  opt_state = zeros.opt_state
  if mu is not None:
    opt_state = _with_adam_state(opt_state, np.asarray(step, np.int32),
                                 _as_tree_of(abstract.params, mu),
                                 _as_tree_of(abstract.params, nu))
  # The same state key a fresh run of this seed gets (state.create_train_state).
  state_rng = np.asarray(jax.random.split(jax.random.PRNGKey(config.seed))[1])
  logging.info("init_from %s: weights%s%s", path, ", EMA" if "ema" in ckpt else "",
               f", AdamW moments at step {step}" if mu is not None else " (fresh optimizer)")
  return TrainState(step=np.asarray(step, np.int32), params=_as_tree_of(abstract.params, params),
                    opt_state=opt_state, ema_params=_as_tree_of(abstract.params, ema),
                    rng=state_rng.astype(abstract.rng.dtype))


def place(host_tree, abstract):
  """Host arrays -> global arrays in the shardings attached to `abstract`'s leaves. Each
  device gets only its slice; works with several processes (each holds the whole value)."""
  return jax.tree.map(
      lambda v, a: jax.make_array_from_callback(a.shape, a.sharding, lambda idx: v[idx]),
      host_tree, abstract)


def state_from_torch(path: str, config, abstract: TrainState) -> TrainState:
  """`host_state_from_torch`, placed in the run's shardings."""
  return place(host_state_from_torch(path, config, abstract), abstract)


def restore_on_host(workdir: str, step: int | None = None):
  """The whole train state of a run's checkpoint as numpy arrays in host memory (no device
  memory used), with the run's config. Returns (state, config, step).

  For tools that move a checkpoint elsewhere (`fcdm_jax.export_torch`); a damaged
  checkpoint is reported with its step and folder.
  """
  config, step = ckpt_lib.saved_config(workdir, step)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=1000, async_save=False, read_only=True)
  mesh = sharding.create_mesh(devices=jax.devices()[:1])  # shapes only: nothing is placed
  size = config.latent_size
  abstract, _ = state_layout(config, FCDM(**config.model), make_optimizer(config), mesh,
                             (size, size, config.model.in_channels))
  target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  try:
    state, _ = ckpt.restore(step, target)
  except Exception as e:
    raise ValueError(f"checkpoint at step {step} in {ckpt.directory} cannot be read "
                     f"(damaged or written by an incompatible version): {e}") from e
  finally:
    ckpt.close()
  return state, config, step


EXTENSIONS = (".pt", ".safetensors")


def export_checkpoint(workdir: str, out: str, step: int | None = None, overwrite: bool = False
                      ) -> dict:
  """Writes `out` (.pt: what the published train.py saves and resumes; .safetensors: the EMA
  weights) from `workdir`'s checkpoint (latest, or `step`). Returns a summary."""
  if not out.endswith(EXTENSIONS):
    raise ValueError(f"--out must end in .pt (full training checkpoint) or .safetensors (EMA "
                     f"weights), got {out!r}")
  fileio.check_output(out, overwrite=overwrite, inputs=(workdir,))
  if out.endswith(".safetensors"):  # the EMA alone is read, in the run's shardings
    ema, _, step = ckpt_lib.load_ema_params(workdir, step=step)
    convert.save_torch_checkpoint(out, jax.device_get(ema))
    content = "EMA weights"
  else:
    state, config, step = restore_on_host(workdir, step)
    convert.save_torch_checkpoint(out, **training_checkpoint(state, config))
    content = "model, EMA, AdamW state, args"
  return {"out": out, "step": step, "content": content, "bytes": fileio.path(out).stat().length}
