"""The machine a benchmark runs on: vendor peak FLOP/s per chip, the CPU's estimated peak,
load and the busy time of other processes (Linux /proc), peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any

import jax

# Dense peak TFLOP/s per chip (vendor figures, no sparsity): {dtype: peak}. fp32 on
# NVIDIA is the non-tensor-core rate; TPUs run matmuls in bf16 passes, so only bf16 is listed.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 51.2}),
    ("H100", {"bfloat16": 989.4, "float32": 66.9}),       # SXM
    ("H200", {"bfloat16": 989.4, "float32": 66.9}),
    ("A100", {"bfloat16": 312.0, "float32": 19.5}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),                 # v5e
    ("TPU v5e", {"bfloat16": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v5", {"bfloat16": 459.0}),                      # v5p reports "TPU v5"
    ("TPU v6 lite", {"bfloat16": 918.0}),                 # v6e (Trillium)
    ("TPU v6e", {"bfloat16": 918.0}),
)


def _cpuinfo() -> dict[str, str]:
  """The first processor's /proc/cpuinfo fields; {} off Linux (the CPU peak is then
  unknown unless --peak_tflops gives it)."""
  info: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if ":" in line:
          k, v = line.split(":", 1)
          info.setdefault(k.strip(), v.strip())
  except OSError:
    return {}
  return info


def cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_peak(cores: int | None = None) -> dict[str, Any]:
  """fp32 peak of this CPU: cores x FMA units x vector lanes x 2 flops x clock.

  Vector width from the ISA flags; AMD family 25 (Zen 3/4) runs AVX-512 on 256-bit
  units. Two FMA units per core is assumed (true of recent server cores). The clock is
  the reported one, not the turbo clock: pass --peak_tflops for a measured figure.
  """
  info = _cpuinfo()
  flags = set(info.get("flags", "").split())
  cores = cores or cpu_count()
  mhz = float(info.get("cpu MHz", "0") or 0)
  bits = 512 if "avx512f" in flags else 256 if ("avx2" in flags or "avx" in flags) else 128
  if info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25":
    bits = min(bits, 256)
  fma_units = 2 if "fma" in flags or bits >= 256 else 1
  flops_per_cycle = 2 * fma_units * bits // 32
  return dict(model=info.get("model name", platform.processor()), cores=cores,
              clock_ghz=mhz / 1e3, vector_bits=bits, fma_units=fma_units,
              peak_tflops=cores * mhz * 1e6 * flops_per_cycle / 1e12 if mhz else None)


def chip_peak_tflops(device_kind: str, dtype: str) -> float | None:
  for name, peaks in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peaks.get(dtype, peaks.get("bfloat16") if "TPU" in name else None)
  return None


def machine_info(devices) -> dict[str, Any]:
  d = devices[0]
  info = dict(backend=jax.default_backend(), device_kind=d.device_kind, num_devices=len(devices),
              host=platform.node(), python=platform.python_version(), jax=jax.__version__,
              xla_flags=os.environ.get("XLA_FLAGS", ""))
  if d.platform == "cpu":
    info["cpu"] = cpu_peak()
  return info


def load_average() -> list[float] | None:
  """1/5/15-minute load averages: on a shared machine they say how much to trust a timing."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def peak_rss_bytes() -> int:
  """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r if sys.platform == "darwin" else r * 1024)


def busy_seconds() -> float | None:
  """CPU seconds spent busy on the cores this process may run on (Linux /proc/stat)."""
  try:
    cores = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    busy = 0
    with open("/proc/stat") as f:
      for line in f:
        parts = line.split()
        if parts and parts[0] in cores:
          fields = [int(v) for v in parts[1:9]]
          busy += sum(fields) - fields[3] - fields[4]  # minus idle and iowait
  except (OSError, ValueError, AttributeError):
    return None
  return busy / os.sysconf("SC_CLK_TCK")
