"""One benchmark of a config (`run`: compile, warm-up, A/B-timed steps) and its report.

Measured the same way every time: compile seconds (trace + lower + XLA compile), warm-up
steps, then `repeats` timed steps (median, min and max), images/s, peak memory, FLOPs and
MFU, for the training step and the sampling forward that `fcdm_jax.programs` builds.

FLOPs, two ways:
  model FLOPs  = 2 x MACs per forward x batch (sample) or 3 x 2 x MACs x batch (train),
                 MACs from XLA per convolution/matmul (`fcdm_jax.flops`, the paper's count).
                 MFU uses these.
  XLA FLOPs    = XLA's cost analysis of the whole step, elementwise ops, recomputation
                 (remat) and the optimizer included, from the step lowered with the block
                 scans unrolled (XLA counts the body of a loop once; lowering only).

With `vs_torch`, the published-structure PyTorch module (`fcdm_jax.torch_fcdm`) runs at
the same batch, precision (bf16 = autocast) and remat (any remat other than 'none' = the
published per-block checkpointing), one JAX step alternating with one PyTorch step so that
both see the same machine load; each step also records how busy other processes kept the
machine, and ratios over quiet steps are reported.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax

from fcdm_jax.models.layers import resolve_dwconv_impl
from fcdm_jax.perf.jax_bench import JaxBench
from fcdm_jax.perf.machine import chip_peak_tflops, load_average, machine_info
from fcdm_jax.perf.measure import jax_memory, summarize, timed_with_load
from fcdm_jax.perf.torch_bench import TorchBench
from fcdm_jax.programs import Programs

MODES = ("train", "sample")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def apply_overrides(config, dtype: str | None, remat: str | None, dwconv_impl: str | None,
                    scan_unroll: bool | None = None):
  """A copy of `config` with these config.model fields overridden (None: the config's)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if dtype is not None:
      if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
      config.model.dtype = DTYPES[dtype]
    if remat is not None:
      config.model.remat = remat
    if dwconv_impl is not None:
      config.model.dwconv_impl = dwconv_impl
    if scan_unroll is not None:
      config.model.scan_unroll = scan_unroll
  return config


def run(config, *, batch: int = 8, modes=MODES, dtype: str | None = None,
        remat: str | None = None, dwconv_impl: str | None = None,
        scan_unroll: bool | None = None, repeats: int = 5, warmup: int = 3,
        vs_torch: bool = False, peak_tflops: float | None = None,
        compile_only: bool = False, count_flops: bool = True, num_devices: int = 0,
        torch_threads: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark and returns its report (a JSON-able dict)."""
  modes = tuple(modes)
  bad = [m for m in modes if m not in MODES]
  if bad or not modes:
    raise ValueError(f"unknown mode(s) {bad or modes}; expected some of {MODES}")
  if repeats < 1 or warmup < 0 or batch < 1:
    raise ValueError(f"need repeats >= 1, warmup >= 0, batch >= 1; got {repeats}, {warmup}, "
                     f"{batch}")
  config = apply_overrides(config, dtype, remat, dwconv_impl, scan_unroll)
  devices = jax.devices()
  if not 0 <= num_devices <= len(devices):
    raise ValueError(f"--num_devices={num_devices}: this machine has {len(devices)} "
                     f"{devices[0].platform} devices; pass 1 to {len(devices)}, or 0 for all")
  if num_devices:
    devices = devices[:num_devices]
  machine = machine_info(devices)
  mdtype = str(config.model.dtype)
  peak = peak_tflops
  peak_source = "--peak_tflops" if peak else None
  if peak is None and machine["backend"] == "cpu":
    peak, peak_source = machine["cpu"]["peak_tflops"], "cores x FMA width x clock"
  elif peak is None:
    peak = chip_peak_tflops(machine["device_kind"], mdtype)
    peak_source = "vendor table" if peak else None
  programs = Programs(config, batch, devices)
  shape = "x".join(str(d) for d in programs.input_shape)
  report: dict[str, Any] = dict(
      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine,
      config=str(config.get("name", "")),
      model={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()},
      dwconv_impl_resolved=resolve_dwconv_impl(config.model.dwconv_impl),
      batch=batch, grad_accum_steps=int(config.get("grad_accum_steps", 1) or 1),
      latent_shape=list(programs.input_shape),
      dtype=mdtype, remat=config.model.remat, peak_tflops=peak, peak_source=peak_source,
      repeats=repeats, warmup=warmup, compile_only=compile_only,
      load_average_start=load_average(), results={})

  log(f"FCDM bench: {report['config']} batch {batch} {shape} {mdtype} remat={config.model.remat} "
      f"dwconv={report['dwconv_impl_resolved']} on {machine['device_kind']} x{len(devices)}")
  jb = JaxBench(programs)
  macs = programs.forward_macs() if count_flops else None
  report["forward_gmacs_per_image"] = macs / 1e9 if macs else None

  tb = None
  if vs_torch and not compile_only:
    import torch   # optional: only the PyTorch comparison needs it
    if torch_threads:
      torch.set_num_threads(torch_threads)
    device = "cuda" if machine["backend"] == "gpu" and torch.cuda.is_available() else "cpu"
    tb = TorchBench(config, batch, mdtype, config.model.remat, device, log)
    report["torch"] = dict(version=torch.__version__, device=device,
                           threads=torch.get_num_threads(),
                           checkpoint_blocks=config.model.remat != "none")

  # Sampling first: device peak memory only grows, and sampling needs less.
  for mode in [m for m in ("sample", "train") if m in modes]:
    res: dict[str, Any] = {}
    compile_fn = jb.compile_sample if mode == "sample" else jb.compile_train
    res.update(compile_fn(compile_only))
    log(f"[{mode}] compiled in {res['compile_s']:.1f} s (lowering {res['lower_s']:.1f} s)")
    if count_flops:
      res["xla_flops_per_step"] = (jb.sample_xla_flops() if mode == "sample"
                                   else jb.train_xla_flops())
      factor = 2 if mode == "sample" else 6
      res["model_flops_per_step"] = factor * macs * batch
    if not compile_only:
      jax_step = jb.sample_step if mode == "sample" else jb.train_step
      torch_step = None if tb is None else (tb.sample_step if mode == "sample" else tb.train_step)
      compiled = lambda: jb.sample_compiled if mode == "sample" else jb.train_compiled
      res.update(time_steps(jax_step, torch_step, lambda: jax_memory(devices[0], compiled()),
                            batch, repeats, warmup))
      med = res["step_s"]["median"]
      if count_flops:
        res["achieved_tflops"] = res["model_flops_per_step"] / med / 1e12
        res["xla_achieved_tflops"] = (res["xla_flops_per_step"] / med / 1e12
                                      if res["xla_flops_per_step"] else None)
        res["mfu"] = res["achieved_tflops"] / peak if peak else None
      if torch_step:
        res["torch"]["memory"] = tb.peak_memory()
    report["results"][mode] = res
  report["load_average_end"] = load_average()
  log(format_report(report))
  return report


def time_steps(jax_step, torch_step, jax_memory_fn, batch: int, repeats: int,
               warmup: int) -> dict[str, Any]:
  """Warm-up, then `repeats` timed JAX steps alternating with PyTorch steps (when given)
  so that both sides see the same machine load; summaries and the JAX/PyTorch ratios."""
  for _ in range(warmup):
    jax_step()
  # Before PyTorch runs in this mode, so a CPU's process peak RSS is JAX's alone.
  memory = jax_memory_fn()
  for _ in range(warmup if torch_step else 0):
    torch_step()
  jt, jo, tt, to = [], [], [], []
  for _ in range(repeats):
    dt, other = timed_with_load(jax_step)
    jt.append(dt)
    jo.append(other)
    if torch_step:
      dt, other = timed_with_load(torch_step)
      tt.append(dt)
      to.append(other)
  res = summarize(jt, batch, jo)
  res["memory"] = memory
  if torch_step:
    res["torch"] = summarize(tt, batch, to)
    res["speedup_vs_torch"] = res["torch"]["step_s"]["median"] / res["step_s"]["median"]
    res["speedup_vs_torch_best"] = res["torch"]["step_s"]["min"] / res["step_s"]["min"]
    tq, jq = res["torch"].get("quiet_step_s_median"), res.get("quiet_step_s_median")
    res["speedup_vs_torch_quiet"] = tq / jq if tq and jq else None
  return res


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def format_report(report: dict[str, Any]) -> str:
  """A human-readable table of a report."""
  lines = []
  m = report["machine"]
  dev = m["device_kind"] + (f" ({m['cpu']['model']}, {m['cpu']['cores']} cores)"
                            if "cpu" in m else "")
  lines.append(f"device: {dev}; jax {m['jax']}; peak {_fmt(report['peak_tflops'], '.3f')} "
               f"TFLOP/s ({report['peak_source']})")
  lines.append(f"forward GMACs/image: {_fmt(report.get('forward_gmacs_per_image'), '.2f')}; "
               f"load average {report.get('load_average_start')} -> "
               f"{report.get('load_average_end')}")
  head = (f"{'mode':<7}{'compile s':>10}{'step s med':>11}{'min':>8}{'max':>8}{'img/s':>9}"
          f"{'model TF/s':>11}{'XLA GF/step':>12}{'MFU':>7}{'peak MiB':>10}")
  lines.append(head)
  for mode, r in report["results"].items():
    st = r.get("step_s", {})
    mem = r.get("memory", {}).get("peak_bytes")
    lines.append(
        f"{mode:<7}{r['compile_s']:>10.1f}{_fmt(st.get('median'), '.3f'):>11}"
        f"{_fmt(st.get('min'), '.3f'):>8}{_fmt(st.get('max'), '.3f'):>8}"
        f"{_fmt(r.get('img_per_s', {}).get('median'), '.2f'):>9}"
        f"{_fmt(r.get('achieved_tflops'), '.4f'):>11}"
        f"{_fmt(r['xla_flops_per_step'] / 1e9 if r.get('xla_flops_per_step') else None, '.1f'):>12}"
        f"{_fmt(r['mfu'] * 100 if r.get('mfu') is not None else None, '.1f'):>6}%"
        f"{_fmt(mem / 2**20 if mem else None, '.0f'):>10}")
    if "torch" in r:
      t = r["torch"]["step_s"]
      lines.append(f"  torch: step s med {t['median']:.3f} (min {t['min']:.3f}, "
                   f"max {t['max']:.3f}), {r['torch']['img_per_s']['median']:.2f} img/s; "
                   f"JAX/PyTorch speed {r['speedup_vs_torch']:.2f}x (medians), "
                   f"{r['speedup_vs_torch_best']:.2f}x (best steps), "
                   f"{_fmt(r.get('speedup_vs_torch_quiet'), '.2f')}x (quiet steps: "
                   f"JAX {r.get('quiet_steps', '-')}, torch {r['torch'].get('quiet_steps', '-')})")
  return "\n".join(lines)
