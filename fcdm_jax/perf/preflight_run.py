"""Will a config fit, and how fast can it at best go, on a TPU slice or on GPUs? Compiled
here, with neither.

`run(config, topology)` compiles the run's own programs (`fcdm_jax.programs`: the training
step at the global batch, with the config's remat and gradient accumulation; the sampling
forward, guided at config.sample.cfg_scale, at the sampling batch rounded up to the
devices; and the training preview's sampler when config.preview.every_steps > 0) for the
abstract devices of the target (`perf.targets`: a TPU slice, needing libtpu, or NVIDIA
GPUs, needing JAX's CUDA plugin and ptxas; neither needs the accelerator), over the run's
mesh and shardings, and returns the report: per program and per device XLA's memory plan
against the memory a program may take there (fits or not, and the margin) and the compile
time; for train and sample also the FLOPs and memory bytes per step and the roofline lower
bound of the step time, max(FLOPs / peak, bytes / bandwidth), with the images/s and MFU it
allows. These time figures are derived from compiler counts and vendor peaks: bounds, not
measurements.

Counting through loops: XLA's cost analysis of a compiled program (post-fusion, per
device) counts the body of every loop once: the model's block scans, the gradient
accumulation's micro-batch scan, and the loops a compiler makes itself (under FSDP the TPU
compiler splits matmuls with sharded weights into collective-matmul loops: XL/512 on v5p-64
reports 1/9 of its training FLOPs); for abstract GPUs `cost_analysis()` gives nothing, and
the optimized module's HLO cost analysis (`perf.measure.compiled_cost`) is used. So FLOPs
per device are the whole step's, from the step lowered for the CPU with the block scans
unrolled and without accumulation (the same arithmetic; lowering only, nothing compiled),
divided by the devices (exact for data-parallel and FSDP work; replicated optimizer updates
are a rounding error). Bytes have no such exact source: the memory bytes are the compiled
program's count, every loop counted once, which falls short of what the step really moves
by the iterations it misses. Both are therefore at most the real work, and the bound
max(FLOPs / peak, bytes / bandwidth) stays a lower bound; when it says compute binds, memory
traffic may still bind in truth. (The bytes of the step lowered for the CPU scanned and
unrolled, before fusion, are in the report for comparison.)

One loop is counted through by estimate, since it is what the candidates of --fit differ
in: gradient accumulation's micro-batch loop. With A micro-batches the bytes are the
counted bytes plus A - 1 more passes of the loop's body, the body taken as the counted
bytes less `STATE_PASSES` reads or writes of the training state (the optimizer and EMA
update after the loop; the state is the program's arguments). Without it a step split into
16 micro-batches would show a sixteenth of its activations' traffic and look faster than
the whole batch. The count as compiled is kept beside it (`bytes_accessed_loops_once`).

A TPU compiler refusal for lack of memory (`parse_oom`) is a verdict (does not fit), with
the compiler's own figures; any other compiler error is raised. The GPU compiler does not
refuse: its plan is compared with the usable memory (`perf.targets`).
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

import jax

from fcdm_jax import sharding
from fcdm_jax.flops import cost_analysis
from fcdm_jax.models.layers import resolve_dwconv_impl
from fcdm_jax.perf import targets
from fcdm_jax.perf.machine import chip_peak_tflops
from fcdm_jax.perf.measure import compiled_cost, xla_memory
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


# Reads and writes of the training state outside the micro-batch loop (the optimizer and
# EMA update: read the state and the gradients, write the state), in units of the state's
# bytes: what the loop's body is estimated without.
STATE_PASSES = 2


def fit(total: int, capacity: int) -> dict[str, Any]:
  """Whether `total` bytes fit in `capacity`, and the margin left (negative: over)."""
  margin = capacity - total
  return dict(fits=margin >= 0, margin_bytes=margin, margin_fraction=margin / capacity)


def roofline(flops: float, nbytes: float, peak_tflops: float | None, bandwidth: float,
             model_flops: float, images: int, memory: str = "HBM") -> dict[str, Any]:
  """Lower bound of one step's time per device from its FLOPs and memory bytes (`memory`
  names that memory in `binds`); the images/s and MFU that bound allows (upper bounds).
  MFU counts the nominal 6 x forward MACs per image, which is a little more than a step
  without remat does (no gradient for the input latents), so its bound is capped at 1."""
  memory_s = nbytes / bandwidth
  compute_s = flops / (peak_tflops * 1e12) if peak_tflops else None
  bound = max(memory_s, compute_s or 0.0)
  binds = f"{memory} bandwidth" if compute_s is None or memory_s >= compute_s else "compute"
  return dict(compute_s=compute_s, memory_s=memory_s, step_s_bound=bound, binds=binds,
              img_per_s_bound=images / bound if bound else None,
              mfu_bound=(min(1.0, model_flops / bound / (peak_tflops * 1e12))
                         if bound and peak_tflops else None))


def _cpu_config(config):
  """The config with every mesh axis 1 and no accumulation (the same arithmetic, without
  the micro-batch loop that XLA's counts would see once): the program lowered for one CPU
  device, for counts."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.axes = tuple((name, 1) for name, _ in config.mesh.axes)
    if "grad_accum_steps" in config:
      config.grad_accum_steps = 1
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


def _program_report(compiled, seconds: float, error: str | None, capacity: int
                    ) -> dict[str, Any]:
  """Memory plan and verdict of one compiled program against `capacity` bytes per device."""
  out: dict[str, Any] = dict(compile_s=seconds, compiled=compiled is not None)
  if compiled is None:
    oom = parse_oom(error)
    required, available = oom["required_bytes"], oom["available_bytes"] or capacity
    out.update(memory=None, fits=False, compiler_error=error.strip().splitlines()[0][:500],
               required_bytes=required, available_bytes=available,
               margin_bytes=None if required is None else available - required,
               margin_fraction=None if required is None else (available - required) / available)
    return out
  memory = xla_memory(compiled)
  out.update(memory=memory, **fit(memory["total"], capacity))
  return out


# ----------------------------------------------------------------------------- run


def step_program(config, name: str, batch: int, devices, target: targets.Target,
                 peak: float | None, cfg_scale: float = 1.0,
                 flops_cache: dict | None = None) -> dict[str, Any]:
  """One 'train' or 'sample' program of `config` compiled for `devices`: its memory plan
  and verdict against the target's usable memory, and, when it compiled, its counts per
  device and roofline bound. `flops_cache` (keyed by what changes the arithmetic: program,
  remat, batch) saves the CPU lowering of programs that differ only in accumulation."""
  n = len(devices)
  built = Programs(config, batch, devices, cfg_scale=cfg_scale)
  compiled, seconds, error = _compile(built.lower_train if name == "train"
                                      else built.lower_sample)
  res = _program_report(compiled, seconds, error, target.usable_bytes)
  res["batch"] = batch
  if name == "train":
    res["grad_accum_steps"] = int(config.get("grad_accum_steps", 1) or 1)
  else:
    res.update(cfg_scale=cfg_scale, forward_batch=2 * batch if cfg_scale != 1.0 else batch)
  if compiled is None:
    return res
  macs = built.forward_macs()
  key = (name, str(config.model.remat), batch, cfg_scale)
  counts = (flops_cache or {}).get(key)
  if counts is None:
    on_cpu = Programs(_cpu_config(config), batch, jax.devices("cpu")[:1], cfg_scale=cfg_scale)
    counts = _cpu_counts(on_cpu.lower_train if name == "train" else on_cpu.lower_sample)
    if flops_cache is not None:
      flops_cache[key] = counts
  ca = compiled_cost(compiled)
  flops = counts["unrolled"]["flops"] / n
  counted = ca.get("bytes accessed", 0.0)
  nbytes = counted
  accum = res.get("grad_accum_steps", 1)
  if accum > 1:   # the micro-batch loop's body counted through (the module's docstring)
    body = max(counted - STATE_PASSES * res["memory"]["argument"], 0.0)
    nbytes = counted + (accum - 1) * body
  model_flops = (6 if name == "train" else 2) * macs * res.get("forward_batch", batch) / n
  res["forward_gmacs_per_image"] = macs / 1e9
  res["per_chip"] = dict(
      flops=flops, bytes_accessed=nbytes, bytes_accessed_loops_once=counted,
      micro_batch_loop_estimated=accum > 1, model_flops=model_flops,
      compiled_flops_loops_once=ca.get("flops"),
      cpu_lowered_flops=dict(scanned=counts["scanned"]["flops"],
                             unrolled=counts["unrolled"]["flops"]),
      cpu_lowered_bytes_before_fusion=dict(scanned=counts["scanned"]["bytes accessed"],
                                           unrolled=counts["unrolled"]["bytes accessed"]))
  res["roofline"] = roofline(flops, nbytes, peak, target.bandwidth, model_flops, batch,
                             memory="HBM" if target.kind == "tpu" else "memory")
  return res


def compute_seconds(config, batch: int, n: int, peak: float | None,
                    flops_cache: dict | None = None) -> float | None:
  """The compute part of the training step's bound (FLOPs per device / peak), from the
  CPU lowering alone: what no accumulation or memory plan changes."""
  key = ("train", str(config.model.remat), batch, 1.0)
  counts = (flops_cache or {}).get(key)
  if counts is None:
    counts = _cpu_counts(Programs(_cpu_config(config), batch, jax.devices("cpu")[:1])
                         .lower_train)
    if flops_cache is not None:
      flops_cache[key] = counts
  return counts["unrolled"]["flops"] / n / (peak * 1e12) if peak else None


def peak_tflops(target: targets.Target, device_kind: str, dtype: str) -> float | None:
  """The dense peak of `dtype` on the target's devices."""
  if target.peaks is not None:
    return target.peaks.get(dtype)
  return chip_peak_tflops(device_kind, dtype)


def setup(config, topology: str, batch: int | None = None,
          memory_fraction: float | None = None):
  """(target, its abstract devices, the config at `batch` with dwconv_impl 'auto' resolved
  for the target). ValueError for a bad topology or batch; ImportError when what the
  target needs is not installed."""
  target = targets.parse(topology, memory_fraction)
  missing = target.missing()
  if missing:
    raise ImportError(f"compiling for {topology} needs {missing}, which is not installed: "
                      f"{target.install_hint}")
  devices = target.devices()
  hosts = len({d.process_index for d in devices})
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if batch is not None:
      config.batch_size = int(batch)
    # 'auto' means the target's formulation, not this CPU's.
    config.model.dwconv_impl = resolve_dwconv_impl(config.model.dwconv_impl,
                                                   backend=target.kind)
  if config.batch_size <= 0 or config.batch_size % hosts:
    raise ValueError(f"batch {config.batch_size} must be positive and divisible by the "
                     f"{hosts} hosts")
  return target, devices, config


def run(config, topology: str, *, batch: int | None = None, sample_batch: int = SAMPLE_BATCH,
        programs=PROGRAMS, log: Callable[[str], None] = print,
        memory_fraction: float | None = None) -> dict[str, Any]:
  """Compiles the run's programs for `topology` (a TPU slice or GPUs, `perf.targets`) and
  returns the report (JSON-able). ValueError for a bad topology, program name or batch;
  ImportError when what the target needs is not installed. `memory_fraction`: of a GPU's
  memory, what JAX's allocator takes (default: as the environment sets it, `perf.targets`)."""
  bad = [p for p in programs if p not in PROGRAMS]
  if bad or not programs:
    raise ValueError(f"unknown program(s) {bad or programs}; expected some of {PROGRAMS}")
  target, devices, config = setup(config, topology, batch, memory_fraction)
  hosts = len({d.process_index for d in devices})
  batch = int(config.batch_size)
  accum = int(config.get("grad_accum_steps", 1) or 1)
  dtype = str(config.model.dtype)
  device_kind = devices[0].device_kind
  peak = peak_tflops(target, device_kind, dtype)
  capacity = target.usable_bytes
  mesh = sharding.create_mesh(config, devices)
  n = len(devices)
  unit = target.unit
  report: dict[str, Any] = dict(
      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), jax=jax.__version__,
      topology=dict(name=topology, topology_name=target.topology_name, family=target.family,
                    device_kind=device_kind, chips=n, hosts=hosts, chips_per_host=n // hosts,
                    kwargs=target.kwargs, kind=target.kind, unit=unit, **target.details),
      chip=dict(hbm_bytes=target.memory_bytes, hbm_bandwidth=target.bandwidth,
                peak_tflops=peak, peak_source=target.peak_source, usable_bytes=capacity,
                usable_fraction=target.usable_fraction, memory_label=target.memory_label),
      config=str(config.get("name", "")),
      model={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()},
      batch=batch, grad_accum_steps=accum, dtype=dtype, remat=config.model.remat,
      dwconv_impl=config.model.dwconv_impl, mesh=dict(mesh.shape),
      params_sharding=config.sharding.params, note=NOTE, programs={})
  log(f"FCDM preflight: {report['config']} on {topology} ({target.topology_name}: {n} x "
      f"{device_kind}, {hosts} host{'s' if hosts > 1 else ''}); batch {batch}"
      + (f" in {accum} micro-batches of {batch // accum}" if accum > 1 else "")
      + f", {dtype}, remat={config.model.remat}, dwconv={config.model.dwconv_impl}, mesh "
      f"{dict(mesh.shape)}, params {config.sharding.params}")
  if target.kind == "gpu":
    log(f"per GPU: {target.memory_bytes / 2**30:.2f} GiB, of which JAX's allocator takes "
        f"{target.usable_fraction:g} ({capacity / 2**30:.2f} GiB; XLA_PYTHON_CLIENT_MEM_FRACTION, "
        f"--memory_fraction); {target.bandwidth / 1e9:.0f} GB/s; dense {dtype} peak "
        f"{peak} TFLOP/s{' (TF32 tensor cores)' if dtype == 'float32' else ''}; the GPU "
        "compiler does not refuse an oversize program: the verdicts compare its plan with "
        "the usable memory")

  cfg_scale = float(config.sample.cfg_scale)
  sample_batch = -(-int(sample_batch) // n) * n  # a multiple of the devices
  for name in [p for p in PROGRAMS if p in programs]:
    if name == "preview" and config.preview.every_steps <= 0:
      report["programs"][name] = dict(skipped="config.preview.every_steps <= 0: no previews")
      continue
    log(f"[{name}] compiling for {target.topology_name} ...")
    if name == "preview":
      # The mesh and EMA layout are the run's whatever the batch: n devices' worth will do.
      preview = Programs(config, n, devices)
      generator = preview.preview_generator()
      count = preview.preview_batch(generator)
      compiled, seconds, error = _compile(preview.lower_preview)
      res = _program_report(compiled, seconds, error, capacity)
      res.update(batch=count, sampler=str(config.preview.sampler),
                 steps=int(config.preview.steps))
      train_memory = (report["programs"].get("train") or {}).get("memory")
      if res["memory"] is not None and train_memory is not None:
        # The preview runs inside the training loop: the whole train state stays in device
        # memory (its EMA params are the preview's arguments), and so does the step's code.
        m = res["memory"]
        m["with_train_state"] = (train_memory["argument"] + train_memory["code"] + m["output"]
                                 + m["temp"] + m["code"])
        res.update(fit(m["with_train_state"], capacity))
    else:
      b = batch if name == "train" else sample_batch
      res = step_program(config, name, b, devices, target, peak,
                         cfg_scale=1.0 if name == "train" else cfg_scale)
      if "forward_gmacs_per_image" in res:
        report["forward_gmacs_per_image"] = res.pop("forward_gmacs_per_image")
      if name == "sample":
        res["sampling_steps"] = int(config.sample.steps)
    report["programs"][name] = res
    log(format_program(name, res, capacity, target.memory_label, unit))
  report["fits"] = all(r.get("fits", True) for r in report["programs"].values())
  log(format_summary(report))
  return report


# ----------------------------------------------------------------------------- text


def format_bytes(v) -> str:
  """Bytes as GiB, or MiB below 1 GiB (tiny test configs)."""
  if v is None:
    return "-"
  return f"{v / 2**30:.2f} GiB" if abs(v) >= 2**30 else f"{v / 2**20:.1f} MiB"


def _flop(v: float) -> str:
  return f"{v / 1e12:.3f} TFLOP" if v >= 1e11 else f"{v / 1e9:.3f} GFLOP"


def format_program(name: str, r: dict[str, Any], capacity: int, label: str = "HBM",
                   unit: str = "chip") -> str:
  """The lines of one program: memory and verdict against `capacity` bytes per device
  (`label` says what they are), then counts and the roofline bound."""
  if "skipped" in r:
    return f"[{name}] skipped: {r['skipped']}"
  lines = []
  if r["memory"] is not None:
    m = r["memory"]
    lines.append(
        f"[{name}] batch {r['batch']}, compiled in {r['compile_s']:.1f} s; per {unit}: arguments "
        f"{format_bytes(m['argument'])}, outputs {format_bytes(m['output'])} (donated/aliased "
        f"{format_bytes(m['alias'])}), temporaries {format_bytes(m['temp'])}, code "
        f"{format_bytes(m['code'])} -> total "
        f"{format_bytes(m['total'])}"
        + (f", {format_bytes(m['with_train_state'])} with the train state and step resident"
           if "with_train_state" in m else "")
        + f" of {format_bytes(capacity)} {label}: "
        + (f"FITS, margin {format_bytes(r['margin_bytes'])} ({100 * r['margin_fraction']:.1f}%)"
           if r["fits"] else
           f"DOES NOT FIT, over by {format_bytes(-r['margin_bytes'])}"))
  else:
    lines.append(
        f"[{name}] batch {r['batch']}: DOES NOT FIT, the compiler refused after "
        f"{r['compile_s']:.1f} s: needs {format_bytes(r['required_bytes'])} of "
        f"{format_bytes(r['available_bytes'])} available"
        + (f", over by {format_bytes(-r['margin_bytes'])}" if r["margin_bytes"] is not None else "")
        + f" ({r['compiler_error'][:200]})")
  if "per_chip" in r:
    mem = "HBM" if unit == "chip" else "memory"
    pc, rf = r["per_chip"], r["roofline"]
    comp = "-" if rf["compute_s"] is None else f"{1e3 * rf['compute_s']:.2f}"
    lines.append(
        f"[{name}] per {unit} per step, FLOPs (loops counted through) {_flop(pc['flops'])} "
        f"(model {_flop(pc['model_flops'])}); {mem} bytes >= {pc['bytes_accessed'] / 1e9:.2f} "
        + ("GB (the micro-batch loop counted through, estimated; other loops once: "
           f"{pc['bytes_accessed_loops_once'] / 1e9:.2f} GB as compiled)"
           if pc.get("micro_batch_loop_estimated") else "GB (loops counted once)"))
    lines.append(
        f"[{name}] roofline bound (derived, not measured): step >= {1e3 * rf['step_s_bound']:.2f}"
        f" ms, {rf['binds']}-bound (compute {comp} ms, {mem} {1e3 * rf['memory_s']:.2f} ms) -> "
        f"<= {rf['img_per_s_bound']:.0f} img/s"
        + (" per forward" if name == "sample" else "")
        + ("" if rf["mfu_bound"] is None else f", MFU <= {100 * rf['mfu_bound']:.1f}%"))
  return "\n".join(lines)


def format_summary(report: dict[str, Any]) -> str:
  verdicts = ", ".join(f"{k} {'-' if 'skipped' in r else ('FITS' if r['fits'] else 'DOES NOT FIT')}"
                       for k, r in report["programs"].items())
  return (f"preflight {report['config']} on {report['topology']['name']}: "
          f"{'FITS' if report['fits'] else 'DOES NOT FIT'} ({verdicts}). {NOTE}.")


