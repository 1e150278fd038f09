"""How a step is measured: timing with the other processes' load, summaries, XLA's memory
plan and FLOP count; and how a report is saved (`save_report`)."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import jax

from fcdm_jax import fileio
from fcdm_jax.flops import cost_analysis
from fcdm_jax.perf.machine import busy_seconds, cpu_count, peak_rss_bytes

QUIET = 0.1  # a step is quiet when other processes used under 10% of the cores


def summarize(times: list[float], batch: int, others: list | None = None) -> dict[str, Any]:
  """Median / min / max of step seconds and the images/s they give, and the same over
  the quiet steps (see `timed_with_load`)."""
  med = statistics.median(times)
  out = dict(step_s=dict(median=med, min=min(times), max=max(times)),
             img_per_s=dict(median=batch / med, min=batch / max(times), max=batch / min(times)),
             repeats=len(times))
  if others and all(o is not None for o in others):
    out["other_load"] = [round(o, 3) for o in others]   # quiet is judged on what is reported
    quiet = [t for t, o in zip(times, out["other_load"]) if o < QUIET]
    out["quiet_steps"] = len(quiet)
    out["quiet_step_s_median"] = statistics.median(quiet) if quiet else None
  return out


def xla_memory(compiled) -> dict[str, int] | None:
  """XLA's plan of the executable's memory per device (bytes), or None where the backend
  has no analysis. `total` = arguments + outputs - aliased (donated) + temporaries +
  generated code: what the device must hold while the program runs."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    ma = None
  if ma is None:
    return None
  out = dict(argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
             alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes),
             code=int(ma.generated_code_size_in_bytes))
  out["planned"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  out["total"] = out["planned"] + out["code"]
  return out


def jax_memory(device, compiled) -> dict[str, Any]:
  """Device peak where the runtime reports it; XLA's planned bytes of the executable; and,
  on a CPU, the process peak RSS (which is the memory the step really took there)."""
  out: dict[str, Any] = {}
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - not every backend implements it
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    out.update(peak_bytes=int(stats["peak_bytes_in_use"]), source="device memory_stats")
  else:
    out.update(peak_bytes=peak_rss_bytes(), source="process peak RSS")
  planned = xla_memory(compiled)
  out["xla_planned_bytes"] = planned["planned"] if planned else None
  out["xla_temp_bytes"] = planned["temp"] if planned else None  # None: the backend has no analysis
  out["xla_plan"] = planned   # every part, to compare with the preflight's plan
  return out


def compiled_cost(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program (flops, 'bytes accessed', ...; every loop
  body counted once). A program compiled for abstract GPUs has none of its own
  (`cost_analysis()` is None there): its optimized module is analysed instead, with XLA's
  HLO cost analysis through jaxlib's private entry (no public one exists); {} if that fails."""
  ca = cost_analysis(compiled)
  if ca:
    return ca
  try:
    from jax._src.lib import _jax  # private: imported here so that its absence costs only this
    module = compiled.runtime_executable().hlo_modules()[0]
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))
  except Exception:  # noqa: BLE001 - a private API: its absence only loses the counts
    return {}


def lowered_flops(lowered) -> float | None:
  """XLA's FLOP count of a lowered (or compiled) program, None where it has none."""
  ca = cost_analysis(lowered)
  return float(ca["flops"]) if "flops" in ca else None


def timed(fn: Callable[[], Any]) -> float:
  return timed_with_load(fn)[0]


def timed_with_load(fn: Callable[[], Any]) -> tuple[float, float | None]:
  """(seconds, share of this process's cores that other processes kept busy meanwhile).

  On a shared machine the second number says which steps ran undisturbed: thread
  pools that synchronise often (OpenMP) slow down far more than others when a core is
  taken, so ratios are only fair over quiet steps.
  """
  busy0, own0 = busy_seconds(), sum(os.times()[:2])
  t0 = time.perf_counter()
  fn()
  dt = time.perf_counter() - t0
  busy1, own1 = busy_seconds(), sum(os.times()[:2])
  if busy0 is None or busy1 is None:
    return dt, None
  others = (busy1 - busy0) - (own1 - own0)
  return dt, max(0.0, min(1.0, others / (dt * cpu_count())))


def save_report(report: dict[str, Any], command: list[str], path: str | None) -> None:
  """Records the command line that made `report` in it and, when `path` is given, writes it
  there as JSON (local or gs://, atomically)."""
  report["command"] = " ".join(command)
  if path:
    fileio.atomic_write_bytes(path, json.dumps(report, indent=1, default=str).encode())
