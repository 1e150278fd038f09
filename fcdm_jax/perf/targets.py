"""What the preflight compiles for, by name: a Cloud TPU slice or NVIDIA GPUs.

`parse(name)` gives a `Target`: TPU names (`v5e-8`, `v5p-64`, `v4:2x2x1`: `tpu_topology`) or
GPU names (`4x4090`, `8xh100`, `2x8xh100`: `gpu_topology`), with what the preflight needs of
either: its abstract devices, each device's memory and the part of it a program may take,
the memory bandwidth, the dense peak per dtype, the package that must be installed, and the
backend that resolves config.model.dwconv_impl='auto'.

A program may take all of a TPU chip's HBM (the TPU compiler refuses more). On a GPU, JAX's
allocator takes a fraction of the memory when it starts (`memory_fraction`: the
XLA_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_MEM_FRACTION the run sees, 0.75 by default, of
what is free after the CUDA context), whether it preallocates or not; a run that needs more
sets the variable. The GPU compiler does not refuse a program larger than the device, so
the preflight compares the plan with that usable part itself.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

from fcdm_jax import gpu_topology, tpu_topology

# JAX's GPU allocator default (jaxlib's GPU client options: memory_fraction 0.75).
DEFAULT_GPU_MEMORY_FRACTION = 0.75
ACCEPTED = f"TPU slices: {tpu_topology.ACCEPTED}. GPUs: {gpu_topology.ACCEPTED}"


@dataclasses.dataclass(frozen=True)
class Target:
  name: str              # as given
  kind: str              # 'tpu' or 'gpu': the backend of dwconv_impl='auto'
  unit: str              # 'chip' or 'GPU'
  family: str            # 'v5e', '4090', ...
  topology_name: str     # 'v5e:2x4', '1x1x4'
  count: int             # devices
  memory_bytes: int      # per device
  usable_fraction: float  # of memory_bytes a program may take
  bandwidth: float       # bytes/s per device
  peaks: dict[str, float] | None  # dense TFLOP/s per compute dtype (None: perf.machine's)
  peak_source: str
  kwargs: dict[str, Any]
  devices: Callable[[], list]
  missing: Callable[[], str | None]   # what must be installed first, or None
  install_hint: str
  details: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def usable_bytes(self) -> int:
    return int(self.memory_bytes * self.usable_fraction)

  @property
  def memory_label(self) -> str:
    """How the capacity a plan is compared with reads in the report."""
    if self.kind == "tpu":
      return "HBM"
    return (f"usable ({self.memory_bytes / 2**30:.2f} GiB x {self.usable_fraction:g}, "
            "JAX's GPU memory fraction)")


def gpu_memory_fraction(environ=os.environ) -> float:
  """The fraction of GPU memory JAX's allocator takes, as jaxlib reads it."""
  value = environ.get("XLA_CLIENT_MEM_FRACTION") or environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  return float(value) if value else DEFAULT_GPU_MEMORY_FRACTION


def is_gpu(name: str) -> bool:
  """GPU names start with a count ('4x4090'); TPU names with their family ('v5e-8')."""
  return re.match(r"\s*\d+x", name.lower()) is not None


def parse(name: str, memory_fraction: float | None = None) -> Target:
  """The target named `name`; ValueError naming the accepted forms of both kinds."""
  if is_gpu(name):
    try:
      topo = gpu_topology.parse(name)
    except ValueError as e:
      raise ValueError(f"{e}. TPU slices: {tpu_topology.ACCEPTED}") from None
    fraction = gpu_memory_fraction() if memory_fraction is None else float(memory_fraction)
    if not 0 < fraction <= 1:
      raise ValueError(f"GPU memory fraction must be in (0, 1], got {fraction}")
    gpu = topo.gpu
    return Target(
        name=name, kind="gpu", unit="GPU", family=gpu.name, topology_name=topo.topology_name,
        count=topo.num_gpus, memory_bytes=gpu.memory_bytes, usable_fraction=fraction,
        bandwidth=gpu.bandwidth, peaks=gpu.peak_tflops,
        peak_source="vendor table (fcdm_jax/gpu_targets/gpus.csv; float32: TF32 tensor cores)",
        kwargs=dict(topology=topo.topology_name, target_config=gpu.target_file),
        devices=lambda: gpu_topology.abstract_devices(topo),
        missing=gpu_topology.missing_packages, install_hint=gpu_topology.INSTALL_HINT,
        details=dict(gpu=gpu.name, compute_capability=gpu.compute_capability,
                     target_file=gpu.target_file))
  try:
    tpu_slice = tpu_topology.parse(name)
  except ValueError as e:
    raise ValueError(f"{e}. GPUs: {gpu_topology.ACCEPTED}") from None
  chip = tpu_slice.chip
  return Target(
      name=name, kind="tpu", unit="chip", family=chip.family,
      topology_name=tpu_slice.topology_name, count=tpu_slice.num_chips,
      memory_bytes=chip.hbm_bytes, usable_fraction=1.0, bandwidth=chip.hbm_bandwidth,
      peaks=None, peak_source="vendor table (fcdm_jax.perf.machine.PEAK_TFLOPS)",
      kwargs=tpu_slice.topology_kwargs(),
      devices=lambda: tpu_topology.abstract_devices(tpu_slice),
      missing=lambda: None if tpu_topology.libtpu_available() else "libtpu",
      install_hint=tpu_topology.INSTALL_HINT)
