"""PyTorch state_dict <-> Flax params for FCDM, and checkpoint files in the published layout.

The walk is mechanical: `torch_layout(depth)` lists every published key in the
published order with the Flax path it maps to and the layout change it needs
(conv OIHW <-> HWIO, linear transposed, GRN (1,C,1,1) <-> (C,), the blocks of a level
stacked on a leading axis). Files are read without executing pickled code.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from fcdm_jax import fileio
from fcdm_jax.models import torch_weights
from fcdm_jax.models.fcdm import FCDM, LEVEL_NAMES

BLOCK_PARAMS = (
    ("dwconv.weight", ("dwconv", "kernel"), "dwconv"),
    ("dwconv.bias", ("dwconv", "bias"), "vector"),
    ("pwconv1.weight", ("pwconv1", "kernel"), "conv1x1"),
    ("pwconv1.bias", ("pwconv1", "bias"), "vector"),
    ("grn.gamma", ("grn", "gamma"), "grn"),
    ("grn.beta", ("grn", "beta"), "grn"),
    ("pwconv2.weight", ("pwconv2", "kernel"), "conv1x1"),
    ("pwconv2.bias", ("pwconv2", "bias"), "vector"),
    ("adaLN_modulation.1.weight", ("adaLN_modulation_1", "kernel"), "linear"),
    ("adaLN_modulation.1.bias", ("adaLN_modulation_1", "bias"), "vector"),
)


class Entry(NamedTuple):
  torch_key: str
  flax_path: tuple[str, ...]
  kind: str            # how the layout changes, see `to_flax` / `to_torch`
  layer: int | None    # index on the stacked 'layers' axis, None for unstacked params


def _linear_entries(key: str, path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f"{key}.weight", path + ("kernel",), "linear", None),
          Entry(f"{key}.bias", path + ("bias",), "vector", None)]


def condition_entries(k: int, text_embedder: str | None) -> list[Entry]:
  """Level k's condition embedder: the published label table, or for a text-conditioned
  model (ours; the published code has none) `text_embedder_{k}.proj.*` ('linear') or
  `text_embedder_{k}.mlp.0.*` / `.mlp.2.*` ('mlp'), nn.Linear layouts."""
  if text_embedder is None:
    return [Entry(f"y_embedder_{k}.embedding_table.weight", (f"y_embedder_{k}", "embedding_table"),
                  "table", None)]
  name = f"text_embedder_{k}"
  if text_embedder == "linear":
    return _linear_entries(f"{name}.proj", (name, "proj"))
  return _linear_entries(f"{name}.mlp.0", (name, "mlp_0")) + \
      _linear_entries(f"{name}.mlp.2", (name, "mlp_2"))


def torch_layout(depth: Sequence[int], text_embedder: str | None = None) -> list[Entry]:
  """Every published state_dict key, in the published order, with its Flax location
  (`text_embedder` 'linear' / 'mlp': a text-conditioned model's keys instead of the tables)."""
  entries: list[Entry] = []
  for k in (1, 2, 3):
    entries += [
        Entry(f"t_embedder_{k}.mlp.0.weight", (f"t_embedder_{k}", "mlp_0", "kernel"), "linear", None),
        Entry(f"t_embedder_{k}.mlp.0.bias", (f"t_embedder_{k}", "mlp_0", "bias"), "vector", None),
        Entry(f"t_embedder_{k}.mlp.2.weight", (f"t_embedder_{k}", "mlp_2", "kernel"), "linear", None),
        Entry(f"t_embedder_{k}.mlp.2.bias", (f"t_embedder_{k}", "mlp_2", "bias"), "vector", None),
    ] + condition_entries(k, text_embedder)
  entries += [Entry("x_embedder.weight", ("x_embedder", "kernel"), "conv", None),
              Entry("x_embedder.bias", ("x_embedder", "bias"), "vector", None)]

  def blocks(stage: int):
    level = LEVEL_NAMES[stage]
    return [Entry(f"{level}.{i}.{suffix}", (level,) + path, kind, i)
            for i in range(depth[stage]) for suffix, path, kind in BLOCK_PARAMS]

  def resample(name):
    return [Entry(f"{name}.conv.0.weight", (name, "conv_0", "kernel"), "conv", None)]

  def reduce(name):
    return [Entry(f"{name}.weight", (name, "kernel"), "conv1x1", None),
            Entry(f"{name}.bias", (name, "bias"), "vector", None)]

  entries += blocks(0) + resample("down1_2") + blocks(1) + resample("down2_3") + blocks(2)
  entries += resample("up3_2") + reduce("reduce_chans_2") + blocks(3)
  entries += resample("up2_1") + reduce("reduce_chans_1") + blocks(4)
  entries += [
      Entry("output_layer.weight", ("output_layer", "kernel"), "conv", None),
      Entry("output_layer.bias", ("output_layer", "bias"), "vector", None),
      Entry("final_layer.adaLN_modulation.1.weight", ("final_layer", "adaLN_modulation_1", "kernel"),
            "linear", None),
      Entry("final_layer.adaLN_modulation.1.bias", ("final_layer", "adaLN_modulation_1", "bias"),
            "vector", None),
      Entry("final_layer.conv.weight", ("final_layer", "conv", "kernel"), "conv", None),
      Entry("final_layer.conv.bias", ("final_layer", "conv", "bias"), "vector", None),
  ]
  return entries


def to_flax(kind: str, a: np.ndarray) -> np.ndarray:
  """One published tensor in Flax layout."""
  if kind == "linear":
    return a.T
  if kind in ("conv", "dwconv"):          # OIHW -> HWIO ((C,1,7,7) -> (7,7,1,C))
    return a.transpose(2, 3, 1, 0)
  if kind == "conv1x1":                   # (out, in, 1, 1) -> Dense (in, out)
    return a[:, :, 0, 0].T
  if kind == "grn":
    return a.reshape(-1)
  return a


def to_torch(kind: str, a: np.ndarray) -> np.ndarray:
  """Inverse of `to_flax`."""
  if kind == "linear":
    return a.T
  if kind in ("conv", "dwconv"):
    return a.transpose(3, 2, 0, 1)
  if kind == "conv1x1":
    return a.T[:, :, None, None]
  if kind == "grn":
    return a.reshape(1, -1, 1, 1)
  return a


def infer_depth(keys) -> tuple[int, ...]:
  """Stage depths from the block indices present in a published state_dict."""
  depth = []
  for level in LEVEL_NAMES:
    idx = [int(m.group(1)) for k in keys if (m := re.match(rf"{level}\.(\d+)\.", k))]
    depth.append(max(idx) + 1 if idx else 0)
  return tuple(depth)


def infer_model(state_dict: Mapping[str, Any], **overrides) -> FCDM:
  """The FCDM (published fields) whose parameters have these shapes."""
  text = {}
  for kind, key in (("linear", "text_embedder_1.proj.weight"), ("mlp", "text_embedder_1.mlp.0.weight")):
    if key in state_dict:
      text = dict(condition="text", text_embedder=kind,
                  text_dim=int(torch_weights.as_numpy(state_dict[key]).shape[1]))
  need = ("x_embedder.weight", "encoder_level_1.0.pwconv1.weight", "final_layer.conv.weight")
  if not text:
    need += ("y_embedder_1.embedding_table.weight",)
  missing = [k for k in need if k not in state_dict]
  if missing:
    raise ValueError(f"not an FCDM state_dict: missing keys {missing}")
  x_w = torch_weights.as_numpy(state_dict[need[0]])
  hidden, in_ch = x_w.shape[0], x_w.shape[1]
  mlp = torch_weights.as_numpy(state_dict[need[1]]).shape[0]
  out_ch = torch_weights.as_numpy(state_dict[need[2]]).shape[0]
  fields = dict(in_channels=in_ch, hidden_size=hidden, depth=infer_depth(state_dict.keys()),
                mlp_ratio=mlp / hidden, learn_sigma=out_ch == 2 * in_ch, **text)
  if not text:
    rows = torch_weights.as_numpy(state_dict[need[3]]).shape[0]
    fields.update(class_dropout_prob=0.1, num_classes=rows - 1)
  fields.update(overrides)
  return FCDM(**fields)


def expected_shapes(model: FCDM) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax parameter shapes of `model`, from an abstract init (no memory used)."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  x = jnp.zeros((1, 8, 8, model.in_channels))
  t = jnp.zeros((1,), jnp.float32)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x, t,
                                                      model.example_y(1))["params"]))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(p.key for p in path): tuple(s.shape) for path, s in flat}


def _torch_shape(entry: Entry, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  shape = flax_shape[1:] if entry.layer is not None else flax_shape
  return tuple(to_torch(entry.kind, np.empty(shape, np.uint8)).shape)


def params_from_torch(state_dict: Mapping[str, Any], model: FCDM | None = None) -> dict:
  """Published state_dict (NCHW tensors or arrays) -> nested Flax params (numpy).

  The model is inferred from the shapes unless given. Missing, extra and mis-shaped
  keys are all listed in one error.
  """
  model = model or infer_model(state_dict)
  layout = torch_layout(model.depth, model.condition_kind.torch_text_embedder(model))
  shapes = expected_shapes(model)
  torch_weights.check_state_dict(
      state_dict, {e.torch_key: _torch_shape(e, shapes[e.flax_path]) for e in layout},
      "state_dict does not fit FCDM(depth=%s, hidden_size=%d)"
      % (list(model.depth), model.hidden_size))

  stacked: dict[tuple[str, ...], list] = collections.defaultdict(list)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for entry in layout:
    value = to_flax(entry.kind, torch_weights.as_numpy(state_dict[entry.torch_key]))
    if entry.layer is None:
      flat[entry.flax_path] = value
    else:
      stacked[entry.flax_path].append(value)
  for path, values in stacked.items():
    flat[path] = np.stack(values)
  return _unflatten(flat)


def params_to_torch(params: Mapping[str, Any]) -> "collections.OrderedDict[str, np.ndarray]":
  """Flax params -> published state_dict (numpy arrays, published key order).

  Values may be transposed views of the params; the file writers copy them.
  """
  depth = tuple(_get(params, (level, "dwconv", "bias")).shape[0] for level in LEVEL_NAMES)
  text = params.get("text_embedder_1")
  text_embedder = None if text is None else ("linear" if "proj" in text else "mlp")
  out = collections.OrderedDict()
  for entry in torch_layout(depth, text_embedder):
    value = np.asarray(_get(params, entry.flax_path))
    if entry.layer is not None:
      value = value[entry.layer]
    out[entry.torch_key] = to_torch(entry.kind, value)
  return out


def _get(tree, path):
  for key in path:
    try:
      tree = tree[key]
    except KeyError:
      raise ValueError(f"params have no entry {'/'.join(path)}: not FCDM params") from None
  return tree


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


# ----------------------------------------------------------------------------- files
# Reading any PyTorch weights file (safely) is `models.torch_weights.read_torch_file`.


def _to_torch_tree(torch, v):
  """numpy arrays anywhere in a checkpoint tree as (contiguous, owned) torch tensors."""
  if isinstance(v, np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(v))
  if isinstance(v, Mapping):
    return type(v)((k, _to_torch_tree(torch, x)) for k, x in v.items())
  if isinstance(v, (list, tuple)):
    return type(v)(_to_torch_tree(torch, x) for x in v)
  return v


def save_torch_checkpoint(path: str, params, ema_params=None, opt=None, args=None) -> None:
  """Writes `.pt` in the published layout, `{"model": sd, "ema": sd}` plus `"opt"` (a torch
  optimizer state_dict, arrays as numpy) and `"args"` when given; or `.safetensors` with the
  EMA weights when given, else the params. Atomic: a reader never sees a partial file."""
  model_sd = params_to_torch(params)
  ema_sd = params_to_torch(ema_params) if ema_params is not None else model_sd
  if path.endswith(".safetensors"):
    if opt is not None or args is not None:
      raise ValueError(".safetensors holds one set of weights: write optimizer state to .pt")
    from safetensors.numpy import save_file
    contiguous = {k: np.ascontiguousarray(v, np.float32) for k, v in ema_sd.items()}
    fileio.atomic_write(path, lambda p: save_file(contiguous, p))
    return
  if not path.endswith(".pt"):
    raise ValueError(f"unknown checkpoint extension for {path}: use .pt or .safetensors")
  torch = torch_weights.import_torch()
  as_f32 = lambda sd: collections.OrderedDict((k, np.asarray(v, np.float32)) for k, v in sd.items())
  content = {"model": as_f32(model_sd), "ema": as_f32(ema_sd)}
  if opt is not None:
    content["opt"] = opt
  if args is not None:
    content["args"] = args
  content = _to_torch_tree(torch, content)
  fileio.atomic_write(path, lambda p: torch.save(content, p))
