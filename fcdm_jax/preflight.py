"""Will this config fit, and how fast can it at best go, on a TPU slice? Compiled here, no TPU.

  python -m fcdm_jax.preflight --config=configs/xl_512.py --topology=v5p-64
  python -m fcdm_jax.preflight --config=configs/s_256.py --topology=v5e-8 --batch=512 \\
      --config.model.remat=dots --json=/tmp/s256.json

Needs libtpu (`pip install -e ".[tpu]"`), not a TPU: the real TPU compiler runs on this
machine for the abstract devices of the slice (`fcdm_jax.tpu_topology`: accelerator types
such as v4-8, v5e-16, v5p-64 (v4/v5p count TensorCores, 2 per chip), v6e-8, or raw
topologies such as v5e:4x4, v4:2x2x1), multi-host slices included.

The programs compiled are the run's own, over the run's mesh (`config.mesh`) and
shardings (`config.sharding`):
  train    the training step of `fcdm_jax.main` (`make_train_step`, `state_layout`,
           `jit_train_step`) at the global batch (`--batch`, default config.batch_size);
  sample   the sampling forward, classifier-free guided at config.sample.cfg_scale, at the
           batch `fcdm_jax.sample` uses (`--sample_batch`, rounded up to the device count);
  preview  the training preview sampler (its whole loop), when config.preview.every_steps > 0.

Per program and per chip it prints XLA's memory plan (arguments, outputs, temporaries,
code; total against the chip's HBM: FITS / DOES NOT FIT and the margin) and the compile
time. For train and sample it also prints the FLOPs per step (every loop counted as often
as it runs) and the HBM bytes accessed (loops counted once: a lower figure, see below), and
the roofline lower bound of the step time, max(FLOPs / peak, bytes / bandwidth): which of
the two binds, the images/s and MFU that the bound allows. These time figures are derived from compiler counts and vendor peaks: bounds,
not measurements.

Counting through loops: XLA's cost analysis of the compiled TPU program (post-fusion, per
chip) counts the body of every loop once: the model's block scans, and also the loops the
TPU compiler makes itself (under FSDP it splits matmuls with sharded weights into
collective-matmul loops: XL/512 on v5p-64 reports 1/9 of its training FLOPs). So FLOPs per
chip are the whole step's, from the step lowered for the CPU with the block scans unrolled
(lowering only, nothing compiled), divided by the chips (exact for data-parallel and FSDP
work; replicated optimizer updates are a rounding error). Bytes have no such exact source:
the HBM bytes are the compiled program's count, every loop counted once, which falls short
of what the step really moves by the iterations it misses. Both are therefore at most the
real work, and the bound max(FLOPs / peak, bytes / bandwidth) stays a lower bound; when it says compute binds, HBM
traffic may still bind in truth. (The bytes of the step lowered for the CPU scanned and
unrolled, before fusion, are in the JSON for comparison.)

Exit status: 0 when every program fits, 1 when one does not, 2 for bad input or no libtpu.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Callable

from fcdm_jax import fileio, tpu_topology

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
  from fcdm_jax.flops import cost_analysis
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
  from fcdm_jax import bench
  out: dict[str, Any] = dict(compile_s=seconds, compiled=compiled is not None)
  if compiled is None:
    oom = parse_oom(error)
    required, available = oom["required_bytes"], oom["available_bytes"] or hbm
    out.update(memory=None, fits=False, compiler_error=error.strip().splitlines()[0][:500],
               required_bytes=required, available_bytes=available,
               margin_bytes=None if required is None else available - required,
               margin_fraction=None if required is None else (available - required) / available)
    return out
  memory = bench.xla_memory(compiled)
  out.update(memory=memory, **fit(memory["total"], hbm))
  return out


# ----------------------------------------------------------------------------- run


def run(config, topology: str, *, batch: int | None = None, sample_batch: int = SAMPLE_BATCH,
        programs=PROGRAMS, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the run's programs for `topology` and returns the report (JSON-able)."""
  import jax
  from fcdm_jax import bench
  from fcdm_jax.flops import cost_analysis
  from fcdm_jax.models.layers import resolve_dwconv_impl
  from fcdm_jax import sharding
  from fcdm_jax import sampling
  from fcdm_jax.train.preview import sample_settings

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
  peak = bench.chip_peak_tflops(chip.device_kind, dtype)
  mesh = sharding.create_mesh(config, devices)
  n = len(devices)
  report: dict[str, Any] = dict(
      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), jax=jax.__version__,
      topology=dict(name=topology, topology_name=tpu_slice.topology_name, family=chip.family,
                    device_kind=devices[0].device_kind, chips=n, hosts=hosts,
                    chips_per_host=n // hosts, kwargs=tpu_slice.topology_kwargs()),
      chip=dict(hbm_bytes=chip.hbm_bytes, hbm_bandwidth=chip.hbm_bandwidth, peak_tflops=peak,
                peak_source="vendor table (fcdm_jax.bench.PEAK_TFLOPS)"),
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
      jb = bench.JaxBench(config, n, devices, log)
      abstract, _ = jb.layout()  # the mesh and EMA layout (batch n: any multiple fits)
      # The preview's own program: the one generator with config.preview's sampler.
      generator = sampling.Generator(config, sample_settings(config), jb.mesh)
      shown = min(config.preview.num_classes_shown, config.model.num_classes)
      count = generator.padded_size(shown * config.preview.per_class)

      def lower(generator=generator, count=count, params=abstract.ema_params):
        return generator.lower(params, count)   # as the training loop calls it
      compiled, seconds, error = _compile(lower)
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
      jb = bench.JaxBench(config, b, devices, log, cfg_scale=scale)
      lower = jb.lower_train if name == "train" else jb.lower_sample
      compiled, seconds, error = _compile(lower)
      res = _program_report(compiled, seconds, error, chip.hbm_bytes)
      res["batch"] = b
      if name == "sample":
        res.update(cfg_scale=scale, forward_batch=2 * b if scale != 1.0 else b,
                   sampling_steps=int(config.sample.steps))
      if compiled is not None:
        if macs is None:
          macs = jb.forward_macs()
          report["forward_gmacs_per_image"] = macs / 1e9
        cj = bench.JaxBench(cpu_config, b, cpu, log, cfg_scale=scale)
        counts = _cpu_counts(cj.lower_train if name == "train" else cj.lower_sample)
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


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
  # Only the CPU backend is needed (the TPU devices are abstract); without this, JAX with
  # libtpu installed first probes for a TPU on this machine.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      "config", None, "config file (configs/*.py); fields overridable as --config.x=y")
  flags.DEFINE_string("topology", None, f"TPU slice: {tpu_topology.ACCEPTED}")
  flags.DEFINE_integer("batch", None, "global training batch (default: config.batch_size)")
  flags.DEFINE_integer("sample_batch", SAMPLE_BATCH, "sampling batch (fcdm_jax.sample's "
                       "--batch_size), rounded up to a multiple of the chips")
  flags.DEFINE_list("programs", list(PROGRAMS), f"which of {PROGRAMS} to compile")
  flags.DEFINE_string("json", None, "write the report here as JSON")
  FLAGS = flags.FLAGS

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config_flag.value is None or not FLAGS.topology:
      raise app.UsageError("--config and --topology are required")
    try:
      tpu_topology.parse(FLAGS.topology)
    except ValueError as e:
      print(f"preflight: {e}", file=sys.stderr)
      sys.exit(2)
    if not tpu_topology.libtpu_available():
      print(f"preflight: compiling for a TPU needs libtpu, which is not installed: "
            f"{tpu_topology.INSTALL_HINT}", file=sys.stderr)
      sys.exit(2)
    try:
      report = run(config_flag.value, FLAGS.topology, batch=FLAGS.batch,
                   sample_batch=FLAGS.sample_batch, programs=tuple(FLAGS.programs),
                   log=lambda s: print(s, flush=True))
    except ValueError as e:
      print(f"preflight: {e}", file=sys.stderr)
      sys.exit(2)
    report["command"] = " ".join(["python -m fcdm_jax.preflight"] + sys.argv[1:])
    if FLAGS.json:
      fileio.atomic_write_bytes(FLAGS.json, json.dumps(report, indent=1, default=str).encode())
    sys.exit(0 if report["fits"] else 1)

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
