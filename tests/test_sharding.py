"""The one mesh builder: config axes (or all devices on 'data'), any device list, laid out
by `mesh_utils` on the topology, and clear errors for axes that do not fit."""

import jax
import numpy as np
import pytest

from fcdm_jax import config_base
from fcdm_jax import sharding


def test_mesh_from_config_or_devices():
  config = config_base.get_config("XL", 256)
  assert dict(sharding.create_mesh(config).shape) == {"data": 1, "fsdp": 8}   # the FSDP policy
  config.mesh.axes = (("data", 2), ("fsdp", -1))
  mesh = sharding.create_mesh(config, jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
  assert set(mesh.devices.flat) == set(jax.devices()[:4])
  local = sharding.create_mesh(devices=jax.devices()[2:6])   # e.g. one host's devices
  assert dict(local.shape) == {"data": 4, "fsdp": 1}
  assert list(local.devices.flat) == jax.devices()[2:6]
  config.mesh.axes = (("data", 3), ("fsdp", -1))
  with pytest.raises(ValueError, match="do not fit 8 devices"):
    sharding.create_mesh(config)


def test_mesh_follows_the_topology_layout(monkeypatch):
  """The grid is the one mesh_utils lays out (on TPUs: along the chips' links), not a
  reshape of the device list; a shape it cannot lay out falls back to the list's order."""
  devices = jax.devices()
  calls = []

  def topology(shape, devices, **kwargs):
    calls.append((shape, kwargs))
    return np.asarray(devices[::-1]).reshape(shape)

  monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", topology)
  mesh = sharding.create_mesh(devices=devices)
  assert calls == [((8, 1), {"allow_split_physical_axes": True})]
  assert list(mesh.devices.flat) == devices[::-1]

  def refuse(shape, devices, **kwargs):
    raise ValueError("no such physical layout")

  monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", refuse)
  assert list(sharding.create_mesh(devices=devices).devices.flat) == devices


@pytest.mark.parametrize("name", ["s_256", "b_512", "l_256", "l_512", "xl_256", "xl_512",
                                  "t2i_l_256", "t2i_xl_256"])
def test_configs_run_with_the_layout_of_their_size(name):
  """Each config, text-to-image ones too, takes its size's remat and parameter layout
  (config_base.RUN_LAYOUTS, held to the TPU table by test_preflight_table) and the mesh
  that layout runs on."""
  from helpers.training import TESTS, load_config
  config = load_config(TESTS.parent / "configs" / f"{name}.py", "flow")
  variant, resolution = name.removeprefix("t2i_").split("_")
  remat, params = config_base.RUN_LAYOUTS[(variant.upper(), int(resolution))]
  assert (config.model.remat, config.sharding.params) == (remat, params)
  expected = {"data": 1, "fsdp": 8} if params == "fsdp" else {"data": 8, "fsdp": 1}
  assert dict(sharding.create_mesh(config).shape) == expected
  assert config.objective == "flow"


def test_run_layout_refuses_an_unknown_layout():
  with pytest.raises(ValueError, match="unknown parameter layout 'zero3'"):
    config_base.run_layout(config_base.get_config("S", 256), "none", "zero3")
