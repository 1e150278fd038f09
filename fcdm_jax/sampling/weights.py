"""The weights a sampling or evaluation run uses: a training run's EMA params (its latest
checkpoint or a given step, with the config saved there) or the 'ema' weights of a
published-layout PyTorch file (with a config given). Named first (`resolve_model`, cheap,
checked before any weights are read), then placed in the config's shardings on a mesh
(`load_model`: replicated, or FSDP for L/XL)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from fcdm_jax import checkpoint as ckpt_lib
from fcdm_jax import convert, fileio
from fcdm_jax.models import FCDM, torch_weights


def resolve_model(workdir: str | None, torch_checkpoint: str | None, config,
                  step: int | None):
  """(config, identity dict naming the weights), checked before any weights are read."""
  if bool(workdir) == bool(torch_checkpoint):
    raise ValueError("pass exactly one of --workdir (a training run) and --torch_checkpoint "
                     "(a published-layout .pt/.safetensors file, with --config)")
  if workdir:
    if not fileio.isdir(workdir):
      raise FileNotFoundError(f"workdir {workdir} does not exist")
    ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
    if not fileio.isdir(ckpt_dir) or not any(n.isdigit() for n in fileio.listdir(ckpt_dir)):
      raise FileNotFoundError(f"no checkpoint in {workdir}: expected {ckpt_dir}/STEP written "
                              "by `python -m fcdm_jax.main`")
    saved, step = ckpt_lib.saved_config(workdir, step)
    return (saved if config is None else config), {"workdir": fileio.absolute(workdir),
                                                   "step": int(step)}
  if config is None:
    raise ValueError("--torch_checkpoint needs --config (the run config the weights were "
                     "trained with, e.g. configs/xl_256.py)")
  if not fileio.isfile(torch_checkpoint):
    raise FileNotFoundError(f"checkpoint file not found: {torch_checkpoint}")
  return config, {"torch_checkpoint": fileio.absolute(torch_checkpoint),
                  "sha256": fileio.sha256_file(torch_checkpoint)}


def load_model(config, identity: dict, mesh: Mesh):
  """The EMA params named by `identity` (from `resolve_model`), in the config's shardings
  on `mesh` (replicated, or FSDP for L/XL)."""
  if "workdir" in identity:
    params, _, _ = ckpt_lib.load_ema_params(identity["workdir"], config=config,
                                            step=identity["step"], mesh=mesh)
    return params
  path = identity["torch_checkpoint"]
  state_dict = torch_weights.load_torch_state_dict(path, which="ema")
  try:
    params = convert.params_from_torch(state_dict, model=FCDM(**config.model))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  shardings = jax.tree.map(lambda a: a.sharding, ckpt_lib.params_layout(config, mesh))
  return jax.device_put(params, shardings)
