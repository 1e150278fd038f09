"""NVIDIA GPUs by name -> abstract GPU devices to compile for, and each GPU's facts.

Names: `GxNAME` (G GPUs on one host: `4x4090`, `8xh100`, `8xa100-80gb`) or `HxGxNAME` (H
hosts of G GPUs each: `2x8xh100`); NAME is a row of `gpu_targets/gpus.csv` (`GPU_NAMES`) or
one of its aliases. Each GPU is XLA's target description in `gpu_targets/NAME.txtpb`
(a GpuTargetConfigProto: compute capability, SMs, memory, bandwidth, each number with its
vendor source) plus the vendor's dense tensor-core peaks from the table.

The devices come from `jax.experimental.topologies.get_topology_desc(platform="cuda",
topology="1xHxG", target_config=...)`, which needs JAX's CUDA plugin and ptxas
(`pip install -e ".[gpu]"`) but no GPU, driver or CUDA install: JAX must start on the CPU
(`JAX_PLATFORMS=cpu`, which `fcdm_jax.preflight` sets), and XLA's GPU compiler then runs here.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import pathlib
import re
import shutil

from jax.experimental import topologies

INSTALL_HINT = 'pip install -e ".[gpu]"'
TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "gpu_targets"


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One GPU model: its XLA target and the figures the preflight divides by."""
  name: str               # '4090'
  aliases: tuple[str, ...]
  target_file: str        # 'rtx4090.txtpb'
  target_config: str = dataclasses.field(repr=False)   # the GpuTargetConfigProto text
  device_kind: str        # what JAX reports ('NVIDIA GeForce RTX 4090')
  compute_capability: str  # '8.9'
  memory_bytes: int       # device memory (vendor capacity)
  bandwidth: float        # bytes/s
  peak_tflops: dict       # {'bfloat16': dense bf16, 'float32': dense TF32}


def _field(text: str, name: str) -> str:
  """A scalar field of the target text (comments stripped); ValueError if absent."""
  m = re.search(rf"^\s*{name}\s*:\s*(\"[^\"]*\"|[\w.]+)", text, re.MULTILINE)
  if not m:
    raise ValueError(f"GPU target has no {name}")
  return m.group(1).strip('"')


def _load(directory: pathlib.Path = TARGETS_DIR) -> dict[str, Gpu]:
  rows = [line for line in (directory / "gpus.csv").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
  gpus = {}
  for row in csv.DictReader(rows):
    text = (directory / row["target"]).read_text()
    cc = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)\s+minor:\s*(\d+)", text)
    gpus[row["name"]] = Gpu(
        name=row["name"], aliases=tuple(row["aliases"].split()), target_file=row["target"],
        target_config=text, device_kind=_field(text, "device_description_str"),
        compute_capability=f"{cc.group(1)}.{cc.group(2)}",
        memory_bytes=int(_field(text, "device_memory_size")),
        bandwidth=float(_field(text, "memory_bandwidth")),
        peak_tflops={"bfloat16": float(row["bf16_dense_tflops"]),
                     "float32": float(row["tf32_dense_tflops"])})
  return gpus


GPUS = _load()
GPU_NAMES = tuple(GPUS)
_BY_NAME = {alias: gpu for gpu in GPUS.values() for alias in (gpu.name, *gpu.aliases)}
ACCEPTED = ("GxNAME (G GPUs on one host) or HxGxNAME (H hosts of G GPUs), NAME one of "
            f"{', '.join(GPU_NAMES)}; e.g. 4x4090, 8xh100, 8xa100-80gb, 2x8xh100")


@dataclasses.dataclass(frozen=True)
class GpuTopology:
  """GPUs of one model on one or more hosts."""
  name: str          # as given
  gpu: Gpu
  hosts: int
  gpus_per_host: int

  @property
  def num_gpus(self) -> int:
    return self.hosts * self.gpus_per_host

  @property
  def topology_name(self) -> str:
    """The topology string of JAX's GPU topology: slices x hosts x GPUs per host."""
    return f"1x{self.hosts}x{self.gpus_per_host}"


def parse(name: str) -> GpuTopology:
  """GPUs from `GxNAME` / `HxGxNAME`; ValueError listing the accepted forms and GPUs."""
  m = re.fullmatch(r"(?:(\d+)x)?(\d+)x([a-z0-9_-]+)", name.strip().lower())
  gpu = _BY_NAME.get(m.group(3)) if m else None
  if gpu is None:
    raise ValueError(f"unknown GPU topology {name!r}; accepted: {ACCEPTED}")
  hosts, per_host = int(m.group(1) or 1), int(m.group(2))
  if hosts < 1 or per_host < 1:
    raise ValueError(f"{name!r} has no GPUs; accepted: {ACCEPTED}")
  return GpuTopology(name, gpu, hosts, per_host)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:   # its parent package is not there either
    return False


# JAX's CUDA plugins (the `.[gpu]` extra installs the CUDA 12 one; a machine set up for
# CUDA 13 has `jax-cuda13-plugin`): either compiles for every target here.
CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
# Where ptxas comes from without a toolkit on PATH: nvcc's wheel for CUDA 12 or 13.
PTXAS_PACKAGES = ("nvidia.cuda_nvcc", "nvidia.cu13")


def missing_packages() -> str | None:
  """What is missing to compile for a GPU here (None: nothing): JAX's CUDA plugin, and
  ptxas (nvcc's wheel or a CUDA toolkit on PATH), which turns XLA's PTX into GPU code."""
  if not any(_installed(m) for m in CUDA_PLUGINS):
    return "JAX's CUDA plugin (jax-cuda12-plugin)"
  if not any(_installed(m) for m in PTXAS_PACKAGES) and shutil.which("ptxas") is None:
    return "ptxas (nvidia-cuda-nvcc-cu12)"
  return None


def abstract_devices(topology: GpuTopology):
  """The topology's abstract GPUs (compile-only: nothing runs on them)."""
  missing = missing_packages()
  if missing:
    raise ModuleNotFoundError(f"compiling for a GPU needs {missing}: {INSTALL_HINT}")
  desc = topologies.get_topology_desc(platform="cuda", topology=topology.topology_name,
                                      target_config=topology.gpu.target_config)
  devices = list(desc.devices)
  if len(devices) != topology.num_gpus:
    raise RuntimeError(f"JAX described {topology.topology_name} with {len(devices)} devices, "
                       f"expected {topology.num_gpus}")
  return devices
