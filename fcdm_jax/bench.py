"""Benchmark FCDM training steps and sampling forwards, optionally side by side with PyTorch.

  python -m fcdm_jax.bench --config=configs/s_256.py --batch=8 --mode=both --vs-torch

Measured the same way every time: compile seconds (trace + lower + XLA compile), warm-up
steps, then `--repeats` timed steps (median, min and max), images/s, peak memory, FLOPs
and MFU. The training step is the real one (`fcdm_jax.train.step`: objective loss,
AdamW, EMA) on a state with the training layout and shardings (`state_layout`), filled
with random values on the host: compiling the random initialiser would only add minutes.

FLOPs, two ways:
  model FLOPs  = 2 x MACs per forward x batch (sample) or 3 x 2 x MACs x batch (train),
                 MACs from XLA per convolution/matmul (`fcdm_jax.flops`, the paper's count).
                 MFU uses these.
  XLA FLOPs    = XLA's cost analysis of the whole step, elementwise ops, recomputation
                 (remat) and the optimizer included. XLA counts the body of a scanned
                 (while) loop once, so it is taken from the step lowered with the block
                 scans unrolled (lowering only: nothing extra is compiled).

`--vs-torch` runs the published-structure PyTorch module (`fcdm_jax.torch_fcdm`) at the
same batch, precision (bf16 = autocast) and remat (any remat other than 'none' = the
published per-block checkpointing), alternating one JAX step and one PyTorch step so that
both see the same machine load, and prints JAX speed / PyTorch speed. PyTorch runs the
whole batch on one device: compare chips with `--num_devices=1`.

On a shared machine, pin the process (`taskset -c 1 python -m fcdm_jax.bench ...`): both
frameworks then get the same core, and OpenMP's synchronisation does not collapse when
another process takes a core (docs/performance.md). Each step also records how busy
other processes kept the machine, and ratios over quiet steps are reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

MODES = ("train", "sample")
STUDY_IMPLS = ("xla", "shift", "shift_vjp")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}

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


# ----------------------------------------------------------------------------- machine


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
  import jax
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


# ----------------------------------------------------------------------------- helpers


QUIET = 0.1  # a step is quiet when other processes used under 10% of the cores


def summarize(times: list[float], batch: int, others: list | None = None) -> dict[str, Any]:
  """Median / min / max of step seconds and the images/s they give, and the same over
  the quiet steps (see `_timed_with_load`)."""
  med = statistics.median(times)
  out = dict(step_s=dict(median=med, min=min(times), max=max(times)),
             img_per_s=dict(median=batch / med, min=batch / max(times), max=batch / min(times)),
             repeats=len(times))
  if others and all(o is not None for o in others):
    out["other_load"] = [round(o, 3) for o in others]
    quiet = [t for t, o in zip(times, others) if o < QUIET]
    out["quiet_steps"] = len(quiet)
    out["quiet_step_s_median"] = statistics.median(quiet) if quiet else None
  return out


def peak_rss_bytes() -> int:
  """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r if sys.platform == "darwin" else r * 1024)


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
  return out


def lowered_flops(lowered) -> float | None:
  from fcdm_jax.flops import cost_analysis
  ca = cost_analysis(lowered)
  return float(ca["flops"]) if "flops" in ca else None


def _busy_seconds() -> float | None:
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


def _timed(fn: Callable[[], Any]) -> float:
  return _timed_with_load(fn)[0]


def _timed_with_load(fn: Callable[[], Any]) -> tuple[float, float | None]:
  """(seconds, share of this process's cores that other processes kept busy meanwhile).

  On a shared machine the second number says which steps ran undisturbed: thread
  pools that synchronise often (OpenMP) slow down far more than others when a core is
  taken, so ratios are only fair over quiet steps.
  """
  busy0, own0 = _busy_seconds(), sum(os.times()[:2])
  t0 = time.perf_counter()
  fn()
  dt = time.perf_counter() - t0
  busy1, own1 = _busy_seconds(), sum(os.times()[:2])
  if busy0 is None or busy1 is None:
    return dt, None
  others = (busy1 - busy0) - (own1 - own0)
  return dt, max(0.0, min(1.0, others / (dt * cpu_count())))


# ----------------------------------------------------------------------------- JAX side


class JaxBench:
  """Builds, compiles and steps the JAX training step and sampling forward.

  Programs are lowered against abstract inputs (shapes, dtypes, shardings), so the same
  object compiles for devices this process cannot run on (`fcdm_jax.preflight` hands it
  abstract TPU devices); host arrays are made only when a step is run. `cfg_scale` != 1
  makes the sampling forward the guided one (the batch [x; x] with [labels; null]).
  """

  def __init__(self, config, batch: int, devices, log, cfg_scale: float = 1.0):
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from fcdm_jax.diffusion.objectives import make_objective
    from fcdm_jax.models import FCDM
    from fcdm_jax.train import sharding
    from fcdm_jax.train.state import make_optimizer

    self.jax, self.jnp, self.nn = jax, jnp, nn
    self.config, self.batch, self.log = config, batch, log
    self.cfg_scale = float(cfg_scale)
    self.model = FCDM(**config.model)
    self.objective = make_objective(config)
    self.tx = make_optimizer(config)
    self.mesh = sharding.create_mesh(config, devices)
    dp = sharding.data_parallel_size(self.mesh)
    if batch % dp:
      raise ValueError(f"batch {batch} is not divisible by the {dp} data-parallel devices")
    self.input_shape = (config.latent_size, config.latent_size, config.model.in_channels)
    bs = sharding.batch_sharding(self.mesh)
    self.abstract_batch = dict(
        x=jax.ShapeDtypeStruct((batch,) + self.input_shape, jnp.float32, sharding=bs),
        y=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs))
    self.abstract_t = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=bs)
    self.batch_arrays = self.t = None
    self.state = None
    self.params = None
    self._rng = np.random.default_rng(0)
    self._shardings = None

  def _host_inputs(self) -> None:
    """The batch and timesteps as global arrays with random values (for timed steps)."""
    from fcdm_jax.train import sharding
    if self.batch_arrays is not None:
      return
    rng = np.random.default_rng(0)
    local = dict(x=rng.standard_normal((self.batch,) + self.input_shape).astype(np.float32),
                 y=rng.integers(0, self.config.model.num_classes, self.batch).astype(np.int32))
    self.batch_arrays = sharding.global_batch(local, self.mesh)
    self.t = sharding.global_batch(
        {"t": rng.uniform(0, 999, self.batch).astype(np.float32)}, self.mesh)["t"]

  def layout(self):
    """(abstract train state with shardings, its shardings tree), computed once."""
    from fcdm_jax.train.state import state_layout
    if self._shardings is None:
      self.abstract_state, self._shardings = state_layout(self.config, self.model, self.tx,
                                                          self.mesh, self.input_shape)
    return self.abstract_state, self._shardings

  def host_filled(self, abstract):
    """Arrays of `abstract`'s shapes, dtypes and shardings with small random values."""
    def fill(a):
      if np.issubdtype(a.dtype, np.floating):
        v = (0.02 * self._rng.standard_normal(a.shape)).astype(a.dtype)
      else:
        v = np.zeros(a.shape, a.dtype)
      return self.jax.device_put(v, a.sharding) if a.sharding is not None else self.jnp.asarray(v)
    return self.jax.tree.map(fill, abstract)

  # -- training step
  def lower_train(self, unroll: bool = False):
    """The training step lowered (not compiled); `unroll` lowers the block scans unrolled."""
    from fcdm_jax.train.step import jit_train_step, make_train_step
    abstract, shardings = self.layout()
    model = self.model.clone(scan_unroll=True) if unroll else self.model
    step = jit_train_step(make_train_step(self.config, model, self.objective, self.tx),
                          self.mesh, shardings, self.config)
    return step.lower(abstract, self.abstract_batch)

  def compile_train(self, compile_only: bool) -> dict[str, Any]:
    abstract, _ = self.layout()
    if not compile_only:
      self.state = self.host_filled(abstract)
      self._host_inputs()
    t0 = time.perf_counter()
    lowered = self.lower_train()
    lower_s = time.perf_counter() - t0
    self.train_compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    return dict(compile_s=compile_s, lower_s=lower_s)

  def train_step(self) -> None:
    self.state, metrics = self.train_compiled(self.state, self.batch_arrays)
    self.jax.block_until_ready((self.state, metrics))

  def train_xla_flops(self) -> float | None:
    return lowered_flops(self.lower_train(unroll=True))

  # -- sampling forward
  def lower_sample(self, unroll: bool = False):
    """The sampling forward (guided when `cfg_scale` != 1) lowered on the EMA params'
    layout; `unroll` lowers the block scans unrolled."""
    from fcdm_jax.diffusion.guidance import guided_model
    from fcdm_jax.train.sharding import batch_sharding
    from fcdm_jax.train.step import sharding_context
    abstract, shardings = self.layout()
    model = self.model.clone(scan_unroll=True) if unroll else self.model
    null_label = model.num_classes if model.has_null_class else None

    def forward(p, x, t, y):
      model_fn = lambda x, t, y: model.apply({"params": p}, x, t, y)
      return guided_model(model_fn, y, cfg_scale=self.cfg_scale, null_label=null_label)(x, t)

    bs = batch_sharding(self.mesh)
    fn = self.jax.jit(forward, in_shardings=(shardings.ema_params, bs, bs, bs),
                      out_shardings=bs)
    b = self.abstract_batch
    with sharding_context(self.mesh, self.config):
      return fn.lower(abstract.ema_params, b["x"], self.abstract_t, b["y"])

  def compile_sample(self, compile_only: bool) -> dict[str, Any]:
    abstract, _ = self.layout()
    if not compile_only:
      self.params = self.host_filled(abstract.ema_params)
      self._host_inputs()
    t0 = time.perf_counter()
    lowered = self.lower_sample()
    lower_s = time.perf_counter() - t0
    self.sample_compiled = lowered.compile()
    return dict(compile_s=time.perf_counter() - t0, lower_s=lower_s)

  def sample_step(self) -> None:
    b = self.batch_arrays
    self.jax.block_until_ready(self.sample_compiled(self.params, b["x"], self.t, b["y"]))

  def sample_xla_flops(self) -> float | None:
    return lowered_flops(self.lower_sample(unroll=True))

  def forward_macs(self) -> float:
    from fcdm_jax.flops import fcdm_forward_macs
    return fcdm_forward_macs(self.model, self.config.latent_size, batch=1)


# ----------------------------------------------------------------------------- PyTorch side


class TorchBench:
  """The published-structure PyTorch FCDM: its training step (network, label dropout, an
  epsilon/velocity MSE on every output channel, AdamW, EMA) and its sampling forward."""

  def __init__(self, config, batch: int, dtype: str, remat: str, device: str, log):
    import torch
    from fcdm_jax import torch_fcdm
    self.torch, self.log = torch, log
    self.device = torch.device(device)
    self.dtype = dtype
    self.model = torch_fcdm.from_config(config.model, checkpoint_blocks=remat != "none",
                                        device=self.device)
    opt = config.optimizer
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=opt.learning_rate,
                                 betas=(opt.b1, opt.b2), eps=opt.eps,
                                 weight_decay=opt.weight_decay)
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.decay = float(config.ema_decay)
    gen = torch.Generator().manual_seed(0)
    c, size = config.model.in_channels, config.latent_size
    self.x = torch.randn(batch, c, size, size, generator=gen).to(self.device)
    self.y = torch.randint(0, config.model.num_classes, (batch,), generator=gen).to(self.device)
    self.t = (torch.rand(batch, generator=gen) * 999).to(self.device)
    self.in_channels = c
    self.flow = config.objective == "flow"
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    self.alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(self.device)

  def _autocast(self):
    if self.dtype == "bfloat16":
      return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
    return contextlib.nullcontext()

  def _sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def train_step(self) -> None:
    torch = self.torch
    self.model.train()
    noise = torch.randn_like(self.x)
    if self.flow:
      t = torch.rand(self.x.shape[0], device=self.device)
      tb = t[:, None, None, None]
      x_t, target = tb * self.x + (1 - tb) * noise, self.x - noise
    else:
      t = torch.randint(0, 1000, (self.x.shape[0],), device=self.device)
      a = self.alphas_cumprod[t][:, None, None, None]
      x_t, target = a.sqrt() * self.x + (1 - a).sqrt() * noise, noise
      t = t.float()
    with self._autocast():
      out = self.model(x_t, t, self.y)
    out = out.float()
    c = self.in_channels
    loss = (out[:, :c] - target).square().mean()
    if out.shape[1] > c:  # the variance channels take part in the loss (and backward) too
      loss = loss + 1e-3 * out[:, c:].square().mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      torch._foreach_mul_(self.ema, self.decay)
      torch._foreach_add_(self.ema, self.params, alpha=1 - self.decay)
    self._sync()

  def sample_step(self) -> None:
    self.model.eval()
    with self.torch.inference_mode(), self._autocast():
      self.model(self.x, self.t, self.y)
    self._sync()

  def peak_memory(self) -> dict[str, Any]:
    if self.device.type == "cuda":
      return dict(peak_bytes=int(self.torch.cuda.max_memory_allocated()),
                  source="torch.cuda.max_memory_allocated")
    return dict(peak_bytes=None, source="not measured on CPU (shared process)")


# ----------------------------------------------------------------------------- run


def apply_overrides(config, dtype: str | None, remat: str | None, dwconv_impl: str | None,
                    scan_unroll: bool | None = None):
  config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
  with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
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
  import jax
  from fcdm_jax.models.layers import resolve_dwconv_impl

  modes = tuple(modes)
  bad = [m for m in modes if m not in MODES]
  if bad or not modes:
    raise ValueError(f"unknown mode(s) {bad or modes}; expected some of {MODES}")
  if repeats < 1 or warmup < 0 or batch < 1:
    raise ValueError(f"need repeats >= 1, warmup >= 0, batch >= 1; got {repeats}, {warmup}, {batch}")
  config = apply_overrides(config, dtype, remat, dwconv_impl, scan_unroll)
  devices = jax.devices()
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
  report: dict[str, Any] = dict(
      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine,
      config=str(config.get("name", "")),
      model={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()},
      dwconv_impl_resolved=resolve_dwconv_impl(config.model.dwconv_impl),
      batch=batch, latent_shape=[config.latent_size, config.latent_size,
                                 config.model.in_channels],
      dtype=mdtype, remat=config.model.remat, peak_tflops=peak, peak_source=peak_source,
      repeats=repeats, warmup=warmup, compile_only=compile_only,
      load_average_start=load_average(), results={})

  log(f"FCDM bench: {report['config']} batch {batch} {config.latent_size}x{config.latent_size}"
      f"x{config.model.in_channels} {mdtype} remat={config.model.remat} "
      f"dwconv={report['dwconv_impl_resolved']} on {machine['device_kind']} x{len(devices)}")
  jb = JaxBench(config, batch, devices, log)
  macs = jb.forward_macs() if count_flops else None
  report["forward_gmacs_per_image"] = macs / 1e9 if macs else None

  tb = None
  if vs_torch and not compile_only:
    import torch
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
      torch_step = None
      if tb is not None:
        torch_step = tb.sample_step if mode == "sample" else tb.train_step
      for _ in range(warmup):
        jax_step()
      # Before PyTorch runs in this mode, so a CPU's process peak RSS is JAX's alone.
      compiled = jb.sample_compiled if mode == "sample" else jb.train_compiled
      res["memory"] = jax_memory(devices[0], compiled)
      for _ in range(warmup if torch_step else 0):
        torch_step()
      jt, jo, tt, to = [], [], [], []
      for _ in range(repeats):  # A/B alternation: both sides see the same load
        dt, other = _timed_with_load(jax_step)
        jt.append(dt)
        jo.append(other)
        if torch_step:
          dt, other = _timed_with_load(torch_step)
          tt.append(dt)
          to.append(other)
      res.update(summarize(jt, batch, jo))
      med = res["step_s"]["median"]
      if count_flops:
        res["achieved_tflops"] = res["model_flops_per_step"] / med / 1e12
        res["xla_achieved_tflops"] = (res["xla_flops_per_step"] / med / 1e12
                                      if res["xla_flops_per_step"] else None)
        res["mfu"] = res["achieved_tflops"] / peak if peak else None
      if torch_step:
        res["torch"] = summarize(tt, batch, to)
        res["torch"]["memory"] = tb.peak_memory()
        res["speedup_vs_torch"] = res["torch"]["step_s"]["median"] / med
        res["speedup_vs_torch_best"] = res["torch"]["step_s"]["min"] / res["step_s"]["min"]
        tq, jq = res["torch"].get("quiet_step_s_median"), res.get("quiet_step_s_median")
        res["speedup_vs_torch_quiet"] = tq / jq if tq and jq else None
    report["results"][mode] = res
  report["load_average_end"] = load_average()
  log(format_report(report))
  return report


def dwconv_study(config, batch: int = 8, repeats: int = 5, impls=STUDY_IMPLS,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """The depthwise 7x7 conv formulations at the shapes of the config's three levels.

  Per formulation and level: the conv alone forward ('fwd'), its backward given the
  cotangent ('bwd': input and kernel gradients), and the block's first chain forward
  (dwconv -> LayerNorm -> adaLN modulate -> pwconv1, 'chain'), which shows how the
  formulation fuses with its consumers. Formulations alternate within each repeat.
  """
  import jax
  from fcdm_jax.models import layers

  def chain(fn):
    def f(x, k, w1, s):
      h = layers.modulate(layers.layer_norm(fn(x, k)), s, s)
      return h @ w1
    return f

  size, c0, ratio = config.latent_size, config.model.hidden_size, config.model.mlp_ratio
  out: dict[str, Any] = dict(batch=batch, repeats=repeats, levels=[],
                             load_average_start=load_average())
  for level in range(3):
    h, c = size // 2 ** level, c0 * 2 ** level
    keys = jax.random.split(jax.random.key(level), 5)
    x = jax.random.normal(keys[0], (batch, h, h, c))
    k = 0.1 * jax.random.normal(keys[1], (7, 7, 1, c))
    g = jax.random.normal(keys[2], (batch, h, h, c))
    w1 = 0.05 * jax.random.normal(keys[3], (c, int(c * ratio)))
    s = jax.random.normal(keys[4], (batch, c))
    cases = {}
    for impl in impls:
      fn = layers.DWCONV_FNS[impl]
      cases[(impl, "fwd")] = (jax.jit(fn).lower(x, k).compile(), (x, k))
      bwd = jax.jit(lambda x, k, g, fn=fn: jax.vjp(fn, x, k)[1](g))
      cases[(impl, "bwd")] = (bwd.lower(x, k, g).compile(), (x, k, g))
      cases[(impl, "chain")] = (jax.jit(chain(fn)).lower(x, k, w1, s).compile(), (x, k, w1, s))
    times: dict[tuple, list] = {key: [] for key in cases}
    for fn, args in cases.values():
      jax.block_until_ready(fn(*args))
    for _ in range(repeats):
      for key, (fn, args) in cases.items():
        times[key].append(_timed(lambda: jax.block_until_ready(fn(*args))))
    row = dict(shape=[batch, h, h, c])
    for (impl, what), ts in times.items():
      row.setdefault(impl, {})[what] = dict(median_ms=1e3 * statistics.median(ts),
                                            min_ms=1e3 * min(ts))
    out["levels"].append(row)
    log(f"dwconv {row['shape']}: " + "; ".join(
        f"{impl} fwd {row[impl]['fwd']['median_ms']:.1f} bwd {row[impl]['bwd']['median_ms']:.1f}"
        f" chain {row[impl]['chain']['median_ms']:.1f} ms" for impl in impls))
  out["load_average_end"] = load_average()
  return out


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def format_report(report: dict[str, Any]) -> str:
  """A human-readable table of a report."""
  lines = []
  m = report["machine"]
  dev = m["device_kind"] + (f" ({m['cpu']['model']}, {m['cpu']['cores']} cores)" if "cpu" in m else "")
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
      lines.append(f"  torch: step s med {t['median']:.3f} (min {t['min']:.3f}, max {t['max']:.3f}),"
                   f" {r['torch']['img_per_s']['median']:.2f} img/s; JAX/PyTorch speed "
                   f"{r['speedup_vs_torch']:.2f}x (medians), {r['speedup_vs_torch_best']:.2f}x "
                   f"(best steps), {_fmt(r.get('speedup_vs_torch_quiet'), '.2f')}x (quiet steps: "
                   f"JAX {r.get('quiet_steps', '-')}, torch {r['torch'].get('quiet_steps', '-')})")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      "config", None, "config file (configs/*.py); fields overridable as --config.x=y")
  flags.DEFINE_integer("batch", 8, "global batch size")
  flags.DEFINE_enum("mode", "both", ["train", "sample", "both", "dwconv"],
                    "what to time; 'dwconv' = the depthwise conv formulation study")
  flags.DEFINE_enum("dtype", None, sorted(DTYPES), "compute dtype (default: the config's)")
  flags.DEFINE_string("remat", None, "none | block | dots | dots_no_batch (default: config's)")
  flags.DEFINE_string("dwconv_impl", None, "auto | xla | shift | shift_vjp (default: config's)")
  flags.DEFINE_integer("repeats", 5, "timed steps (median, min, max)")
  flags.DEFINE_integer("warmup", 3, "untimed steps after compilation (PyTorch on a CPU "
                       "needs a few before its allocator and kernels settle)")
  flags.DEFINE_bool("vs_torch", False, "also time the PyTorch module, alternating A/B")
  flags.DEFINE_alias("vs-torch", "vs_torch")
  flags.DEFINE_float("peak_tflops", None, "peak TFLOP/s for MFU (default: table / CPU estimate)")
  flags.DEFINE_bool("compile_only", False, "compile and count FLOPs only (no state allocated)")
  flags.DEFINE_bool("count_flops", True, "count model and XLA FLOPs")
  flags.DEFINE_integer("num_devices", 0, "use the first N devices (0 = all)")
  flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default)")
  flags.DEFINE_string("json", None, "write the report here as JSON")
  FLAGS = flags.FLAGS

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config_flag.value is None:
      raise app.UsageError("--config is required")
    if FLAGS.mode == "dwconv":
      report = dwconv_study(config_flag.value, batch=FLAGS.batch, repeats=FLAGS.repeats)
      report["machine"] = machine_info(__import__("jax").devices())
      report["command"] = " ".join(["python -m fcdm_jax.bench"] + sys.argv[1:])
      if FLAGS.json:
        with open(FLAGS.json, "w") as f:
          json.dump(report, f, indent=1, default=str)
      return
    modes = MODES if FLAGS.mode == "both" else (FLAGS.mode,)
    report = run(config_flag.value, batch=FLAGS.batch, modes=modes, dtype=FLAGS.dtype,
                 remat=FLAGS.remat, dwconv_impl=FLAGS.dwconv_impl, repeats=FLAGS.repeats,
                 warmup=FLAGS.warmup, vs_torch=FLAGS.vs_torch, peak_tflops=FLAGS.peak_tflops,
                 compile_only=FLAGS.compile_only, count_flops=FLAGS.count_flops,
                 num_devices=FLAGS.num_devices, torch_threads=FLAGS.torch_threads)
    report["command"] = " ".join(["python -m fcdm_jax.bench"] + sys.argv[1:])
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump(report, f, indent=1, default=str)

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
