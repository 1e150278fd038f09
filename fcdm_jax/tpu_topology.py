"""Cloud TPU slices by name -> abstract TPU devices to compile for, and each chip's facts.

Two forms of name are accepted:
  accelerator types, as `gcloud compute tpus tpu-vm create --accelerator-type` takes them:
    `v4-8`, `v5p-64` (the number counts TensorCores, 2 per chip: v5p-64 = 32 chips),
    `v5e-16`, `v6e-8` (the number counts chips; `v5litepod-16` is the same as `v5e-16`);
    they get the slice's standard chip grid and its host layout (4 chips per host, except
    the single-host 8-chip v5e/v6e machines);
  raw topologies, `v5e:4x4`, `v4:2x2x1`: the chip grid as given, libtpu's default host
    layout (4 chips per host).
The devices come from `jax.experimental.topologies.get_topology_desc`, which needs the
`libtpu` package (`pip install -e ".[tpu]"`) but no TPU. JAX runs v4 and v5p chips as one
device each (megacore), so there is one abstract device per chip.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from jax.experimental import topologies

INSTALL_HINT = 'pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Chip:
  """Vendor figures per chip: HBM capacity and bandwidth (dense bf16 peak: `perf.machine`)."""
  family: str          # 'v5e'
  device_kind: str     # what JAX reports, e.g. 'TPU v5 lite'
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  cores_per_chip: int  # TensorCores counted by the accelerator-type name
  dims: int            # 2-D (v5e, v6e) or 3-D (v4, v5p) chip grid


GiB = 2**30
CHIPS = {c.family: c for c in (
    Chip("v4", "TPU v4", 32 * GiB, 1.2e12, 2, 3),
    Chip("v5e", "TPU v5 lite", 16 * GiB, 819e9, 1, 2),
    Chip("v5p", "TPU v5", 95 * GiB, 2.76e12, 2, 3),
    Chip("v6e", "TPU v6 lite", 32 * GiB, 1.64e12, 1, 2),
)}
ALIASES = {"v5litepod": "v5e"}
ACCEPTED = ("accelerator types v4-N, v5p-N (N TensorCores = 2 x chips, N >= 8), "
            "v5e-N / v5litepod-N, v6e-N (N chips: 1, 4, 8, 16, ... a power of two); "
            "or raw topologies FAMILY:AxB (v5e, v6e) / FAMILY:AxBxC (v4, v5p), e.g. v5e:4x4, "
            "v4:2x2x1")


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its chip, grid and host layout, and the arguments that describe it."""
  name: str                  # as given
  chip: Chip
  grid: tuple[int, ...]      # chips along each axis
  chips_per_host: tuple[int, int, int] | None  # None: libtpu's default

  @property
  def num_chips(self) -> int:
    return math.prod(self.grid)

  @property
  def topology_name(self) -> str:
    return f"{self.chip.family}:" + "x".join(str(d) for d in self.grid)

  def topology_kwargs(self) -> dict:
    kwargs = {}
    if self.chips_per_host is not None:
      kwargs["chips_per_host_bounds"] = self.chips_per_host
    if self.chip.family == "v4":
      kwargs["chip_config_name"] = "megacore"  # one device per chip, as JAX runs v4
    return kwargs


def _standard_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The grid Cloud TPU gives a power-of-two slice: start from 2x2(x1) and double the last
  of the smallest axes (v5p-64 = 2x4x4, v5e-16 = 4x4, v5e-32 = 4x8)."""
  if chips == 1:
    return (1,) * dims
  grid = [2, 2] + [1] * (dims - 2)
  while math.prod(grid) < chips:
    smallest = min(grid)
    i = max(j for j, d in enumerate(grid) if d == smallest)
    grid[i] *= 2
  return tuple(grid)


def parse(name: str) -> Slice:
  """A slice from an accelerator type or a raw topology; ValueError listing the forms."""
  text = name.strip().lower()
  raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
  typed = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  family = (raw or typed).group(1) if (raw or typed) else None
  family = ALIASES.get(family, family)
  if family not in CHIPS:
    raise ValueError(f"unknown TPU topology {name!r}; accepted: {ACCEPTED}")
  chip = CHIPS[family]
  if raw:
    grid = tuple(int(d) for d in raw.group(2).split("x"))
    if len(grid) != chip.dims or min(grid) < 1:
      raise ValueError(f"{family} topologies have {chip.dims} axes, got {name!r}; "
                       f"accepted: {ACCEPTED}")
    return Slice(name, chip, grid, None)
  count = int(typed.group(2))
  chips, rem = divmod(count, chip.cores_per_chip)
  power_of_two = chips >= 1 and chips & (chips - 1) == 0
  if rem or not power_of_two or chips == 2 or (chip.dims == 3 and chips < 4):
    raise ValueError(f"{name!r} is not a standard slice size; accepted: {ACCEPTED} "
                     f"(other shapes: give the raw topology)")
  grid = _standard_grid(chips, chip.dims)
  # v5e/v6e up to 8 chips are one host; every larger slice (and every v4/v5p one) has
  # 4 chips per host.
  single_host = chip.dims == 2 and chips <= 8
  per_host = tuple(grid) + (1,) * (3 - len(grid)) if single_host else (2, 2, 1)
  return Slice(name, chip, grid, per_host)


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def abstract_devices(tpu_slice: Slice):
  """The slice's abstract TPU devices (compile-only: nothing runs on them)."""
  if not libtpu_available():
    raise ModuleNotFoundError(f"compiling for a TPU needs libtpu: {INSTALL_HINT}")
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) unless told otherwise; a
  # compile-only client touches no TPU, so several preflights (or a test run beside one)
  # may share the machine.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  desc = topologies.get_topology_desc(topology_name=tpu_slice.topology_name, platform="tpu",
                                      **tpu_slice.topology_kwargs())
  devices = list(desc.devices)
  if len(devices) != tpu_slice.num_chips:
    raise RuntimeError(f"libtpu described {tpu_slice.topology_name} with {len(devices)} "
                       f"devices, expected one per chip ({tpu_slice.num_chips})")
  return devices
