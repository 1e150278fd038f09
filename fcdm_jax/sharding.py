"""The device mesh and where every array lives, from the config.

Parameters carry logical axis names (set in `fcdm_jax.models`); `config.sharding.rules`
maps them to mesh axes. `config.sharding.params` chooses 'replicated' (small models:
every device holds everything, data parallel) or 'fsdp' (large models: params, optimizer
state and EMA sharded by the rules). A dimension that the mesh axes do not divide stays
whole, so one rule set serves every variant and device count.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import flax.linen as nn
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PARAM_MODES = ("replicated", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel axis
DATA_ONLY = (("data", -1), ("fsdp", 1))  # data parallel over every device (the default)


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
  """Resolves one -1 to the devices left over; checks the product is the device count."""
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axis names repeat: {names}")
  for required in BATCH_AXES:
    if required not in names:
      raise ValueError(f"config.mesh.axes must name a {required!r} axis, got {names}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
    raise ValueError(f"mesh axes {dict(zip(names, sizes))} do not fit {num_devices} devices")
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh axes {dict(zip(names, sizes))} use {math.prod(sizes)} devices, "
                     f"but {num_devices} are present; set one axis to -1 to take the rest")
  return dict(zip(names, sizes))


def create_mesh(config=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `config.mesh.axes` (no config: every device on 'data') over `devices`
  (default: all), laid out on the physical topology by `mesh_utils` so that each axis
  follows the chips' links; devices without a topology (CPU) keep their order."""
  devices = list(devices if devices is not None else jax.devices())
  axes = DATA_ONLY if config is None else config.mesh.axes
  shape = mesh_shape(axes, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(tuple(shape.values()), devices,
                                         allow_split_physical_axes=True)
  except (AssertionError, NotImplementedError, ValueError) as e:
    # A shape the topology cannot hold as given: the plain order, which still works.
    logging.warning("mesh %s does not map onto the device topology (%s); using the device "
                    "order", shape, e)
    grid = np.asarray(devices).reshape(tuple(shape.values()))
  return Mesh(grid, tuple(shape))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over every data-parallel axis, the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
  """Logical -> mesh rules, as tuples (ConfigDicts hold lists)."""
  return tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t)
               for name, t in config.sharding.rules)


def _spec_for(shape: tuple[int, ...], names, mesh: Mesh, rules) -> P:
  """Mesh spec of one array: each logical name by the rules, dropped where it does not divide."""
  if names is None:
    return P()
  mesh_axes = nn.logical_to_mesh_axes(tuple(names), rules)
  used: set[str] = set()
  spec = []
  for dim, axes in zip(shape, mesh_axes):
    group = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    group = tuple(a for a in group if a not in used)
    size = math.prod(mesh.shape[a] for a in group)
    if group and size > 1 and dim % size == 0:
      used.update(group)
      spec.append(group if len(group) > 1 else group[0])
    else:
      spec.append(None)
  return P(*spec)


def state_shardings(abstract_boxed_tree, config, mesh: Mesh):
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes (from init)."""
  mode = config.sharding.params
  if mode not in PARAM_MODES:
    raise ValueError(f"unknown config.sharding.params {mode!r}; expected one of {PARAM_MODES}")
  rules = axis_rules(config)

  def leaf(x):
    if mode == "replicated":
      return replicated(mesh)
    if isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, _spec_for(x.value.shape, x.names, mesh, rules))
    return replicated(mesh)

  return jax.tree.map(leaf, abstract_boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def describe(shardings, abstract_tree) -> str:
  """One line: how many bytes of the state one device holds against the whole."""
  total = per_device = 0
  for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract_tree)):
    nbytes = math.prod(a.shape) * np.dtype(a.dtype).itemsize
    total += nbytes
    per_device += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
  return f"state {total / 2**20:.1f} MiB, {per_device / 2**20:.1f} MiB per device"


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's slice of the batch -> global arrays split over the data-parallel axes."""
  s = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in local.items()}


def sharding_context(mesh: Mesh, config):
  """Mesh + logical axis rules, under which steps are traced (activation constraints)."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(axis_rules(config)))
  return stack
