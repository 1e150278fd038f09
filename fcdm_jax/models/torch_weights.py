"""PyTorch tensors -> nested Flax variables, for the networks loaded from PyTorch files."""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from fcdm_jax import fileio


def check_state_dict(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                     what: str) -> None:
  """One ValueError naming every missing, unexpected and misshapen key, so that weights of
  another model or config are recognised as such at once; `what` starts the message."""
  missing = set(shapes) - set(given)
  unexpected = set(given) - set(shapes)
  wrong = [f"{k} {tuple(np.shape(given[k]))} (expected {tuple(shapes[k])})"
           for k in set(shapes) & set(given) if tuple(np.shape(given[k])) != tuple(shapes[k])]
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing keys: {_describe(missing)}")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected keys: {_describe(unexpected)}")
  if wrong:
    parts.append(f"{len(wrong)} keys of the wrong shape: {_describe(wrong)}")
  if parts:
    raise ValueError(f"{what}: " + "; ".join(parts))


def _describe(keys: Sequence[str], limit: int = 8) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def nest_from_torch(layout: Mapping[str, tuple[tuple[str, ...], Any]],
                    given: Mapping[str, Any]) -> dict:
  """`layout` maps each PyTorch key to (Flax path, shape). Kernels change layout (conv
  OIHW -> HWIO, linear transposed); everything else, embedding tables included (Flax's
  `embedding` is PyTorch's (num, dim) weight), is copied as is; float32."""
  tree: dict = {}
  for key, (names, _) in layout.items():
    a = np.asarray(given[key], np.float32)
    if names[-1] == "kernel" and a.ndim == 4:
      a = a.transpose(2, 3, 1, 0)
    elif names[-1] == "kernel" and a.ndim == 2:
      a = a.T
    node = tree
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = jnp.asarray(a)
  return tree


def model_folder(path: str, what: str, marker: str, other: str, subfolder: str) -> str:
  """`path`, or its `subfolder` when only that holds `marker` (a pipeline folder); a clear
  FileNotFoundError when `path` is no folder at all."""
  if not fileio.isdir(path):
    raise FileNotFoundError(f"{what} not found: {path} (expected a folder with {marker} and "
                            f"{other}; nothing is downloaded)")
  sub = fileio.join(path, subfolder)
  if not fileio.isfile(fileio.join(path, marker)) and fileio.isfile(fileio.join(sub, marker)):
    return sub
  return path


def find_model_files(path: str, what: str, config_name: str, weight_names: Sequence[str],
                     subfolder: str) -> tuple[str, str]:
  """(config file, first weights file present) of a local Hugging Face-format folder, or of
  its `subfolder` when `path` is a pipeline folder; nothing is downloaded, so each missing
  piece gets a FileNotFoundError naming what was looked for and where."""
  path = model_folder(path, f"{what} directory", config_name, weight_names[0], subfolder)
  config = fileio.join(path, config_name)
  if not fileio.isfile(config):
    raise FileNotFoundError(f"{config} not found: the {what} directory needs its {config_name}")
  for name in weight_names:
    if fileio.isfile(fileio.join(path, name)):
      return config, fileio.join(path, name)
  sharded = [n for n in fileio.listdir(path) if n.endswith(".index.json")]
  more = f" ({sharded[0]} lists sharded weights, which are not read)" if sharded else ""
  raise FileNotFoundError(f"no {what} weights in {path}: expected "
                          f"{' or '.join(weight_names)}{more}")


def params_from_layout(state_dict: Mapping[str, Any], layout, what: str) -> dict:
  """Flax {'params': ...} of `state_dict` under `layout` (PyTorch key -> (Flax path, shape)),
  after one ValueError naming every missing, unexpected and misshapen key (`what` says
  which weights were expected)."""
  check_state_dict(state_dict, {k: shape for k, (_, shape) in layout.items()}, what)
  return {"params": nest_from_torch(layout, state_dict)}


def read_config(config_path: str, what: str = "config") -> dict:
  """A JSON mapping from a model folder (config.json, a tokenizer's vocab.json); ValueError
  naming the file and `what` it should hold otherwise."""
  import json
  try:
    raw = json.loads(fileio.read_text(config_path))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path} is not a readable JSON {what}: {e}") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{config_path} holds a {type(raw).__name__}, not a {what} mapping")
  return raw


# ----------------------------------------------------------------------------- files

def as_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    v = v.numpy()
  return np.asarray(v)


def import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading or writing .pt files needs PyTorch (pip install torch); "
                      ".safetensors files do not") from e
  return torch


def _tree_to_numpy(v):
  """Tensors anywhere in a loaded checkpoint (state_dicts, optimizer state) as numpy."""
  if hasattr(v, "detach"):
    return as_numpy(v)
  if isinstance(v, Mapping):
    return {k: _tree_to_numpy(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return type(v)(_tree_to_numpy(x) for x in v)
  return v


def read_torch_file(path: str) -> dict:
  """The whole content of a `.pt` (read with `weights_only=True`: no pickled code runs) or
  `.safetensors` file, tensors as numpy. A `.safetensors` file is one flat state_dict.

  A damaged file, a pickle holding arbitrary Python objects and a file of another kind
  each get their own error naming the file.
  """
  path = os.fspath(path)
  if not fileio.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  with fileio.local_file(path) as local:
    return _read_local_torch_file(local, path)


def _read_local_torch_file(local: str, path: str) -> dict:
  """`read_torch_file` of a local copy `local`; errors name `path`."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(local))
    except Exception as e:  # safetensors raises its own SafetensorError
      raise ValueError(f"{path} is damaged (truncated?) or not a safetensors file: {e}") from e
  torch = import_torch()
  with torch.serialization.safe_globals([argparse.Namespace]):
    try:
      ckpt = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:
      if "Weights only load failed" in str(e):
        reason = next((line.strip() for line in str(e).splitlines()
                       if "WeightsUnpickler error" in line), "")
        raise ValueError(
            f"refusing to load {path}: it is a pickle holding Python objects other than "
            "tensors and plain containers, which torch.load(weights_only=True) does not "
            f"execute ({reason or 'rejected by torch'}). Re-save it as a plain state_dict, or "
            "as .safetensors.") from e
      raise ValueError(f"{path} is damaged (truncated?) or not a PyTorch checkpoint: {e}") from e
  if not isinstance(ckpt, Mapping):
    raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state_dict or "
                     "{'model', 'ema', ...} checkpoint")
  return _tree_to_numpy(dict(ckpt))


def load_torch_state_dict(path: str, which: str = "ema") -> dict[str, np.ndarray]:
  """One state_dict of a published-style checkpoint: `.pt` ({"model", "ema", ...} or a bare
  state_dict) or `.safetensors`. `which` picks "ema" or "model" (falling back to "model"
  when the file has no "ema").
  """
  if which not in ("ema", "model"):
    raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
  ckpt = read_torch_file(path)
  if which in ckpt and isinstance(ckpt[which], Mapping):
    ckpt = ckpt[which]
  elif "model" in ckpt and isinstance(ckpt["model"], Mapping):
    ckpt = ckpt["model"]
  return dict(ckpt)
