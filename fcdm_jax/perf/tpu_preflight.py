"""Will a config fit, and how fast can it at best go, on a TPU slice? Compiled here, no TPU.

`run(config, topology)` compiles the run's own programs (`fcdm_jax.programs`: the training
step at the global batch, the sampling forward, guided at config.sample.cfg_scale, at the
sampling batch rounded up to the chips, and the training preview's sampler when
config.preview.every_steps > 0) for the abstract devices of the slice
(`fcdm_jax.tpu_topology`; needs libtpu, not a TPU), over the run's mesh and shardings, and
returns the report: per program and per chip XLA's memory plan against the chip's HBM
(fits or not, and the margin) and the compile time; for train and sample also the FLOPs
and HBM bytes per step and the roofline lower bound of the step time,
max(FLOPs / peak, bytes / bandwidth), with the images/s and MFU it allows. These time
figures are derived from compiler counts and vendor peaks: bounds, not measurements.

Counting through loops: XLA's cost analysis of the compiled TPU program (post-fusion, per
chip) counts the body of every loop once: the model's block scans, and also the loops the
TPU compiler makes itself (under FSDP it splits matmuls with sharded weights into
collective-matmul loops: XL/512 on v5p-64 reports 1/9 of its training FLOPs). So FLOPs per
chip are the whole step's, from the step lowered for the CPU with the block scans unrolled
(lowering only, nothing compiled), divided by the chips (exact for data-parallel and FSDP
work; replicated optimizer updates are a rounding error). Bytes have no such exact source:
the HBM bytes are the compiled program's count, every loop counted once, which falls short
of what the step really moves by the iterations it misses. Both are therefore at most the
real work, and the bound max(FLOPs / peak, bytes / bandwidth) stays a lower bound; when it
says compute binds, HBM traffic may still bind in truth. (The bytes of the step lowered for
the CPU scanned and unrolled, before fusion, are in the report for comparison.)

A compiler refusal for lack of memory (`parse_oom`) is a verdict (does not fit), with the
compiler's own figures; any other compiler error is raised.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

import jax

from fcdm_jax import sharding, tpu_topology
from fcdm_jax.flops import cost_analysis
from fcdm_jax.models.layers import resolve_dwconv_impl
from fcdm_jax.perf.machine import chip_peak_tflops
from fcdm_jax.perf.measure import xla_memory
from fcdm_jax.programs import Programs

PROGRAMS = ("train", "sample", "preview")
SAMPLE_BATCH = 64  # fcdm_jax.sample's default --batch_size
NOTE = ("step times, images/s and MFU are roofline bounds derived from compiler counts and "
        "vendor peak figures, not measurements")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


# ----------------------------------------------------------------------------- helpers


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit.upper()])


def parse_oom(message: str) -> dict[str, Any] | None:
  """The TPU compiler's out-of-memory refusal -> {required_bytes, available_bytes}, or
  None if the error is something else. Two wordings are known:
  'the total memory required for HLO temporaries (45.75G) exceeds available HBM (15.75G)'
  and 'Used 17.39G of 15.48G hbm'."""
  if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
    return None
  num = r"([\d.]+)\s*([KMGT]?)i?B?"
  m = re.search(r"required[^(]*\(" + num + r"\)\s*exceeds available HBM\s*\(" + num + r"\)",
                message)
  if not m:
    m = re.search(r"Used\s+" + num + r"\s+of\s+" + num + r"\s+hbm", message, re.IGNORECASE)
  out: dict[str, Any] = dict(required_bytes=None, available_bytes=None)
  if m:
    out.update(required_bytes=_bytes(m.group(1), m.group(2)),
               available_bytes=_bytes(m.group(3), m.group(4)))
  return out


def fit(total: int, capacity: int) -> dict[str, Any]:
  """Whether `total` bytes fit in `capacity`, and the margin left (negative: over)."""
  margin = capacity - total
  return dict(fits=margin >= 0, margin_bytes=margin, margin_fraction=margin / capacity)


def roofline(flops: float, nbytes: float, peak_tflops: float | None, bandwidth: float,
             model_flops: float, images: int) -> dict[str, Any]:
  """Lower bound of one step's time per chip from its FLOPs and HBM bytes; the images/s and
  MFU that bound allows (upper bounds). MFU counts the nominal 6 x forward MACs per image,
  which is a little more than a step without remat does (no gradient for the input
  latents), so its bound is capped at 1."""
  memory_s = nbytes / bandwidth
  compute_s = flops / (peak_tflops * 1e12) if peak_tflops else None
  bound = max(memory_s, compute_s or 0.0)
  binds = "HBM bandwidth" if compute_s is None or memory_s >= compute_s else "compute"
  return dict(compute_s=compute_s, memory_s=memory_s, step_s_bound=bound, binds=binds,
              img_per_s_bound=images / bound if bound else None,
              mfu_bound=(min(1.0, model_flops / bound / (peak_tflops * 1e12))
                         if bound and peak_tflops else None))


def _cpu_config(config):
  """The config with every mesh axis 1: the program lowered for one CPU device, for counts."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.axes = tuple((name, 1) for name, _ in config.mesh.axes)
  return config


def _cpu_counts(lower_fn: Callable[[bool], Any]) -> dict[str, dict[str, float]]:
  """XLA's (pre-fusion, whole-program) counts of one program lowered for the CPU, with the
  block scans and unrolled."""
  out = {}
  for name, unroll in (("scanned", False), ("unrolled", True)):
    ca = cost_analysis(lower_fn(unroll))
    out[name] = {key: float(ca[key]) for key in ("flops", "bytes accessed")}
  return out


def _compile(lowered_fn: Callable[[], Any]) -> tuple[Any, float, str | None]:
  """(compiled or None, seconds, the compiler's error message)."""
  t0 = time.perf_counter()
  try:
    return lowered_fn().compile(), time.perf_counter() - t0, None
  except Exception as e:  # noqa: BLE001 - the TPU compiler reports OOM as a runtime error
    if parse_oom(str(e)) is None:
      raise
    return None, time.perf_counter() - t0, str(e)


def _program_report(compiled, seconds: float, error: str | None, hbm: int) -> dict[str, Any]:
  out: dict[str, Any] = dict(compile_s=seconds, compiled=compiled is not None)
  if compiled is None:
    oom = parse_oom(error)
    required, available = oom["required_bytes"], oom["available_bytes"] or hbm
    out.update(memory=None, fits=False, compiler_error=error.strip().splitlines()[0][:500],
               required_bytes=required, available_bytes=available,
               margin_bytes=None if required is None else available - required,
               margin_fraction=None if required is None else (available - required) / available)
    return out
  memory = xla_memory(compiled)
  out.update(memory=memory, **fit(memory["total"], hbm))
  return out


# ----------------------------------------------------------------------------- run


def run(config, topology: str, *, batch: int | None = None, sample_batch: int = SAMPLE_BATCH,
        programs=PROGRAMS, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the run's programs for `topology` and returns the report (JSON-able).
  ValueError for a bad topology, program name or batch."""
  tpu_slice = tpu_topology.parse(topology)
  bad = [p for p in programs if p not in PROGRAMS]
  if bad or not programs:
    raise ValueError(f"unknown program(s) {bad or programs}; expected some of {PROGRAMS}")
  devices = tpu_topology.abstract_devices(tpu_slice)
  hosts = len({d.process_index for d in devices})
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if batch is not None:
      config.batch_size = int(batch)
    # 'auto' means the TPU's formulation, not this CPU's.
    config.model.dwconv_impl = resolve_dwconv_impl(config.model.dwconv_impl, backend="tpu")
  batch = int(config.batch_size)
  if batch <= 0 or batch % hosts:
    raise ValueError(f"batch {batch} must be positive and divisible by the {hosts} hosts")
  chip = tpu_slice.chip
  dtype = str(config.model.dtype)
  peak = chip_peak_tflops(chip.device_kind, dtype)
  mesh = sharding.create_mesh(config, devices)
  n = len(devices)
  report: dict[str, Any] = dict(
      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), jax=jax.__version__,
      topology=dict(name=topology, topology_name=tpu_slice.topology_name, family=chip.family,
                    device_kind=devices[0].device_kind, chips=n, hosts=hosts,
                    chips_per_host=n // hosts, kwargs=tpu_slice.topology_kwargs()),
      chip=dict(hbm_bytes=chip.hbm_bytes, hbm_bandwidth=chip.hbm_bandwidth, peak_tflops=peak,
                peak_source="vendor table (fcdm_jax.perf.machine.PEAK_TFLOPS)"),
      config=str(config.get("name", "")),
      model={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()},
      batch=batch, dtype=dtype, remat=config.model.remat, dwconv_impl=config.model.dwconv_impl,
      mesh=dict(mesh.shape), params_sharding=config.sharding.params, note=NOTE, programs={})
  log(f"FCDM preflight: {report['config']} on {topology} ({tpu_slice.topology_name}: {n} x "
      f"{devices[0].device_kind}, {hosts} host{'s' if hosts > 1 else ''}); batch {batch}, "
      f"{dtype}, remat={config.model.remat}, dwconv={config.model.dwconv_impl}, mesh "
      f"{dict(mesh.shape)}, params {config.sharding.params}")

  cpu_config = _cpu_config(config)
  cpu = jax.devices("cpu")[:1]
  macs = None
  cfg_scale = float(config.sample.cfg_scale)
  sample_batch = -(-int(sample_batch) // n) * n  # a multiple of the chips
  for name in [p for p in PROGRAMS if p in programs]:
    if name == "preview" and config.preview.every_steps <= 0:
      report["programs"][name] = dict(skipped="config.preview.every_steps <= 0: no previews")
      continue
    log(f"[{name}] compiling for {tpu_slice.topology_name} ...")
    if name == "preview":
      # The mesh and EMA layout are the run's whatever the batch: n chips' worth will do.
      preview = Programs(config, n, devices)
      generator = preview.preview_generator()
      count = preview.preview_batch(generator)
      compiled, seconds, error = _compile(preview.lower_preview)
      res = _program_report(compiled, seconds, error, chip.hbm_bytes)
      res.update(batch=count, sampler=str(config.preview.sampler),
                 steps=int(config.preview.steps))
      train_memory = (report["programs"].get("train") or {}).get("memory")
      if res["memory"] is not None and train_memory is not None:
        # The preview runs inside the training loop: the whole train state stays in HBM
        # (its EMA params are the preview's arguments), and so does the step's code.
        m = res["memory"]
        m["with_train_state"] = (train_memory["argument"] + train_memory["code"] + m["output"]
                                 + m["temp"] + m["code"])
        res.update(fit(m["with_train_state"], chip.hbm_bytes))
    else:
      b = batch if name == "train" else sample_batch
      scale = 1.0 if name == "train" else cfg_scale
      built = Programs(config, b, devices, cfg_scale=scale)
      compiled, seconds, error = _compile(built.lower_train if name == "train"
                                          else built.lower_sample)
      res = _program_report(compiled, seconds, error, chip.hbm_bytes)
      res["batch"] = b
      if name == "sample":
        res.update(cfg_scale=scale, forward_batch=2 * b if scale != 1.0 else b,
                   sampling_steps=int(config.sample.steps))
      if compiled is not None:
        if macs is None:
          macs = built.forward_macs()
          report["forward_gmacs_per_image"] = macs / 1e9
        on_cpu = Programs(cpu_config, b, cpu, cfg_scale=scale)
        counts = _cpu_counts(on_cpu.lower_train if name == "train" else on_cpu.lower_sample)
        ca = cost_analysis(compiled)
        flops = counts["unrolled"]["flops"] / n
        nbytes = ca.get("bytes accessed", 0.0)
        model_flops = (6 if name == "train" else 2) * macs * res.get("forward_batch", b) / n
        res["per_chip"] = dict(
            flops=flops, bytes_accessed=nbytes, model_flops=model_flops,
            compiled_flops_loops_once=ca.get("flops"),
            cpu_lowered_flops=dict(scanned=counts["scanned"]["flops"],
                                   unrolled=counts["unrolled"]["flops"]),
            cpu_lowered_bytes_before_fusion=dict(scanned=counts["scanned"]["bytes accessed"],
                                                 unrolled=counts["unrolled"]["bytes accessed"]))
        res["roofline"] = roofline(flops, nbytes, peak, chip.hbm_bandwidth, model_flops, b)
    report["programs"][name] = res
    log(format_program(name, res, chip.hbm_bytes))
  report["fits"] = all(r.get("fits", True) for r in report["programs"].values())
  log(format_summary(report))
  return report


# ----------------------------------------------------------------------------- text


def _gib(v) -> str:
  """Bytes as GiB, or MiB below 1 GiB (tiny test configs)."""
  if v is None:
    return "-"
  return f"{v / 2**30:.2f} GiB" if abs(v) >= 2**30 else f"{v / 2**20:.1f} MiB"


def _flop(v: float) -> str:
  return f"{v / 1e12:.3f} TFLOP" if v >= 1e11 else f"{v / 1e9:.3f} GFLOP"


def format_program(name: str, r: dict[str, Any], hbm: int) -> str:
  """The lines of one program: memory and verdict, then counts and the roofline bound."""
  if "skipped" in r:
    return f"[{name}] skipped: {r['skipped']}"
  lines = []
  if r["memory"] is not None:
    m = r["memory"]
    lines.append(
        f"[{name}] batch {r['batch']}, compiled in {r['compile_s']:.1f} s; per chip: arguments "
        f"{_gib(m['argument'])}, outputs {_gib(m['output'])} (donated/aliased "
        f"{_gib(m['alias'])}), temporaries {_gib(m['temp'])}, code {_gib(m['code'])} -> total "
        f"{_gib(m['total'])}"
        + (f", {_gib(m['with_train_state'])} with the train state and step resident"
           if "with_train_state" in m else "")
        + f" of {_gib(hbm)} HBM: "
        + (f"FITS, margin {_gib(r['margin_bytes'])} ({100 * r['margin_fraction']:.1f}%)"
           if r["fits"] else
           f"DOES NOT FIT, over by {_gib(-r['margin_bytes'])}"))
  else:
    lines.append(
        f"[{name}] batch {r['batch']}: DOES NOT FIT, the TPU compiler refused after "
        f"{r['compile_s']:.1f} s: needs {_gib(r['required_bytes'])} of "
        f"{_gib(r['available_bytes'])} available"
        + (f", over by {_gib(-r['margin_bytes'])}" if r["margin_bytes"] is not None else "")
        + f" ({r['compiler_error'][:200]})")
  if "per_chip" in r:
    pc, rf = r["per_chip"], r["roofline"]
    comp = "-" if rf["compute_s"] is None else f"{1e3 * rf['compute_s']:.2f}"
    lines.append(
        f"[{name}] per chip per step, FLOPs (loops counted through) {_flop(pc['flops'])} (model "
        f"{_flop(pc['model_flops'])}); HBM bytes >= {pc['bytes_accessed'] / 1e9:.2f} GB (loops "
        f"counted once)")
    lines.append(
        f"[{name}] roofline bound (derived, not measured): step >= {1e3 * rf['step_s_bound']:.2f}"
        f" ms, {rf['binds']}-bound (compute {comp} ms, HBM {1e3 * rf['memory_s']:.2f} ms) -> "
        f"<= {rf['img_per_s_bound']:.0f} img/s"
        + (" per forward" if name == "sample" else "")
        + ("" if rf["mfu_bound"] is None else f", MFU <= {100 * rf['mfu_bound']:.1f}%"))
  return "\n".join(lines)


def format_summary(report: dict[str, Any]) -> str:
  verdicts = ", ".join(f"{k} {'-' if 'skipped' in r else ('FITS' if r['fits'] else 'DOES NOT FIT')}"
                       for k, r in report["programs"].items())
  return (f"preflight {report['config']} on {report['topology']['name']}: "
          f"{'FITS' if report['fits'] else 'DOES NOT FIT'} ({verdicts}). {NOTE}.")


