"""Which remat policy and micro-batch train a config fastest on a target: the preflight's --fit.

`run(config, topology)` compiles the training step at the global batch for (remat policy,
gradient accumulation) pairs and picks, of those that fit with `HEADROOM` of the usable
memory free, the one with the lowest roofline bound of the step (`perf.preflight_run`);
it returns the candidates compared and the command-line overrides that run the choice.

Not every pair is compiled. Accumulation does not change a step's arithmetic and only adds
passes over the weights, so for each policy the fewest micro-batches that fit is that
policy's best: its accumulation steps are tried from 1 up, the next try sized from the
last plan (its temporaries, which shrink with the micro-batch, against the room the rest
leaves), and the first that fits ends the policy. Policies are tried in order of the work
they recompute (`REMATS`), each only up to the fewest micro-batches that fit so far. At
as many micro-batches a later policy can still win: recomputing adds FLOPs, but it can
remove memory traffic (an elementwise value recomputed inside a fusion is neither stored
in the forward pass nor read back in the backward one), and a memory-bound step gets
faster (the GPU table's B/256 on 4x4090: no remat bounded at 49.8 ms, dots at 29.3 ms,
at the same micro-batch, both memory-bound). The one sound cut is compute: a policy whose compute time alone
(FLOPs per device / peak, from the step lowered for the CPU) is no lower than the best
bound found cannot win and is not compiled. Without config.grad_accum_steps only the
policies are compared, at the full batch. Times are bounds derived from compiler counts
and vendor peaks, not measurements. The byte counts see each loop body once except the
micro-batch loop, counted through by estimate (`perf.preflight_run`), so that candidates
with more micro-batches pay for them; a memory-bound choice is flagged as less certain.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax

from fcdm_jax import sharding
from fcdm_jax.models.fcdm import REMAT_POLICIES
from fcdm_jax.perf import preflight_run

HEADROOM = 0.10   # of the usable memory left free by the chosen layout
# Policies in order of the work they recompute: none recomputes nothing, dots keeps every
# matmul's output, dots_no_batch those without batch dimensions, block only its input.
REMATS = tuple(p for p in ("none", "dots", "dots_no_batch", "block") if p in REMAT_POLICIES)


def accumulation_steps(batch: int, data_parallel: int) -> list[int]:
  """Accumulation steps A that split `batch` into equal micro-batches that still divide
  over the data-parallel devices, ascending."""
  return [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % data_parallel == 0]


def _next_steps(steps: list[int], current: int, memory: dict[str, int], limit: float) -> int | None:
  """The accumulation to try after `current` did not fit: temporaries scale with the
  micro-batch, the rest (state, outputs) does not. None when no larger one is left, or the
  rest alone leaves no room."""
  larger = [a for a in steps if a > current]
  if not larger:
    return None
  fixed = memory["total"] - memory["temp"]
  if fixed >= limit:
    return None
  needed = current * memory["temp"] / (limit - fixed)
  return next((a for a in larger if a >= needed), larger[-1])


def overrides(config, remat: str, accum: int | None) -> str:
  """The command-line flags that run a choice (fcdm_jax.main and the preflight alike)."""
  flags = [f"--config.batch_size={int(config.batch_size)}"]
  if accum is not None:
    flags.append(f"--config.grad_accum_steps={accum}")
  flags.append(f"--config.model.remat={remat}")
  return " ".join(flags)


def run(config, topology: str, *, batch: int | None = None, remats=REMATS,
        memory_fraction: float | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the candidates for `topology` and returns the choice (None when nothing
  fits), its overrides and every candidate. ValueError / ImportError as the preflight's."""
  bad = [r for r in remats if r not in REMAT_POLICIES]
  if bad or not remats:
    raise ValueError(f"unknown remat policies {bad or remats}; expected some of "
                     f"{sorted(REMAT_POLICIES)}")
  target, devices, config = preflight_run.setup(config, topology, batch, memory_fraction)
  batch = int(config.batch_size)
  n = len(devices)
  mesh = sharding.create_mesh(config, devices)
  dp = sharding.data_parallel_size(mesh)
  if batch % dp:
    raise ValueError(f"batch {batch} must be divisible by the {dp} data-parallel devices")
  has_accum = "grad_accum_steps" in config
  steps = accumulation_steps(batch, dp) if has_accum else [None]
  dtype = str(config.model.dtype)
  peak = preflight_run.peak_tflops(target, devices[0].device_kind, dtype)
  limit = (1 - HEADROOM) * target.usable_bytes
  log(f"FCDM preflight --fit: {config.get('name', '')} on {topology} ({n} x "
      f"{devices[0].device_kind}); global batch {batch}, {dtype}, mesh {dict(mesh.shape)}; "
      f"the fastest (remat, accumulation) with {HEADROOM:.0%} of "
      f"{preflight_run.format_bytes(target.usable_bytes)} usable per {target.unit} left free"
      + ("" if has_accum else "; config.grad_accum_steps does not exist: remat only"))
  flops_cache: dict = {}
  candidates: list[dict[str, Any]] = []
  best = None
  fewest = fewest_by = None   # the fewest micro-batches a policy so far fits in, and which
  for remat in sorted(remats, key=REMATS.index):
    tries = [a for a in steps if fewest is None or a is None or a <= fewest]
    trial = config.copy_and_resolve_references()
    with trial.unlocked():
      trial.model.remat = remat
      if has_accum:
        trial.grad_accum_steps = 1
    compute_s = preflight_run.compute_seconds(trial, batch, n, peak, flops_cache)
    if best is not None and compute_s is not None and compute_s >= best["step_s_bound"]:
      candidates.append(dict(remat=remat, grad_accum_steps=None, compiled=False,
                             compute_s=compute_s,
                             skipped=f"compute alone {1e3 * compute_s:.2f} ms >= best bound"))
      log(f"  {remat}: not compiled, its compute alone ({1e3 * compute_s:.2f} ms) is no "
          f"lower than the best bound ({1e3 * best['step_s_bound']:.2f} ms)")
      continue
    accum = tries[0]
    while accum is not None or not has_accum:
      with trial.unlocked():
        if has_accum:
          trial.grad_accum_steps = accum
      log(f"  compiling remat={remat}" + (f", {accum} micro-batches" if has_accum else "")
          + " ...")
      res = preflight_run.step_program(trial, "train", batch, devices, target, peak,
                                       flops_cache=flops_cache)
      memory = res.get("memory")
      total = memory["total"] if memory else res.get("required_bytes")
      roof = res.get("roofline") or {}
      cand = dict(remat=remat, grad_accum_steps=accum, compiled=res["compiled"],
                  micro_batch_per_device=batch // (accum or 1) // dp, memory_bytes=total,
                  free_fraction=(None if total is None
                                 else 1 - total / target.usable_bytes),
                  fits=bool(total is not None and total <= limit),
                  compute_s=roof.get("compute_s"), memory_s=roof.get("memory_s"),
                  step_s_bound=roof.get("step_s_bound"), binds=roof.get("binds"),
                  compile_s=res["compile_s"])
      candidates.append(cand)
      log("  " + format_candidate(cand))
      if cand["fits"]:
        if cand["step_s_bound"] is not None and (
            best is None or cand["step_s_bound"] < best["step_s_bound"]):
          best = cand
        if fewest is None or (accum is not None and accum < fewest):
          fewest, fewest_by = accum, remat
        break
      if not has_accum:
        break
      if memory is None:   # a compiler's refusal: no plan to size the next try from
        accum = next((a for a in steps if a > accum), None)
      else:
        accum = _next_steps(steps, accum, memory, limit)
      if accum is not None and fewest is not None and accum > fewest:
        log(f"  {remat}: stops, it would need {accum} or more micro-batches where "
            f"{fewest_by} fits in {fewest}")
        accum = None
  result: dict[str, Any] = dict(
      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), jax=jax.__version__,
      config=str(config.get("name", "")), topology=topology, device_kind=devices[0].device_kind,
      devices=n, dtype=dtype, mesh=dict(mesh.shape), params_sharding=config.sharding.params,
      dwconv_impl=config.model.dwconv_impl, batch=batch, headroom=HEADROOM,
      memory_bytes=target.memory_bytes, usable_bytes=target.usable_bytes,
      unit=target.unit, candidates=candidates, choice=best,
      overrides=None if best is None else overrides(config, best["remat"],
                                                    best["grad_accum_steps"]),
      accumulation=has_accum)
  log(format_result(result))
  return result


# ----------------------------------------------------------------------------- text


def format_candidate(c: dict[str, Any]) -> str:
  if "skipped" in c:
    return f"{c['remat']:>13}  {'-':>5}  {'-':>6}  not compiled: {c['skipped']}"
  mem = "-" if c["memory_bytes"] is None else preflight_run.format_bytes(c["memory_bytes"])
  free = "-" if c["free_fraction"] is None else f"{100 * c['free_fraction']:5.1f}%"
  bound = ("-" if c["step_s_bound"] is None else
           f"{1e3 * c['step_s_bound']:9.2f} ms ({c['binds']}; compute "
           f"{1e3 * c['compute_s']:.2f}, memory {1e3 * c['memory_s']:.2f})")
  accum = "-" if c["grad_accum_steps"] is None else str(c["grad_accum_steps"])
  return (f"{c['remat']:>13}  {accum:>5}  {c['micro_batch_per_device']:>6}  {mem:>11}  "
          f"{free:>6}  {'yes' if c['fits'] else 'no':>4}  {bound}")


def format_result(result: dict[str, Any]) -> str:
  unit = result["unit"]
  lines = [f"candidates compared (memory per {unit}; fits = at most "
           f"{100 * (1 - result['headroom']):.0f}% of "
           f"{preflight_run.format_bytes(result['usable_bytes'])}; "
           "step bound derived, not measured):",
           f"{'remat':>13}  {'accum':>5}  {'micro/' + unit:>6}  {'memory':>11}  {'free':>6}  "
           f"{'fits':>4}  step bound"]
  lines += [format_candidate(c) for c in result["candidates"]]
  best = result["choice"]
  if best is None:
    lines.append(f"fit: nothing fits {result['topology']} at batch {result['batch']} with "
                 f"{result['headroom']:.0%} free")
  else:
    lines.append(f"fit: remat={best['remat']}"
                 + (f", {best['grad_accum_steps']} micro-batches of "
                    f"{best['micro_batch_per_device']} per {unit}"
                    if best["grad_accum_steps"] is not None else "")
                 + f": step >= {1e3 * best['step_s_bound']:.2f} ms (a bound, not a measurement)")
    if best["binds"] != "compute":
      lines.append("  (memory-bound: byte counts see the model's loops once and the "
                   "micro-batch loop by estimate, so this choice is less certain than a "
                   "compute-bound one)")
    lines.append(f"overrides: {result['overrides']}")
  return "\n".join(lines)
