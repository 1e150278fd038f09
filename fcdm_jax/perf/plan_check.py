"""The preflight's memory plan for a GPU beside the plan and peak of the same program on
that GPU, so that a user with one GPU can see how far the verdicts for others can be trusted.

The preflight compiles without the GPU (`python -m fcdm_jax.preflight --topology=1xh200
--json=pre.json`): XLA's GPU compiler with the target's description and no autotuning. The
benchmark on the GPU (`python -m fcdm_jax.bench ... --preflight_json=pre.json`) compiles
the same program for the device itself and reads the allocator's peak. `compare` puts the
parts of both plans side by side; the verdicts rest on the totals agreeing within
`TOLERANCE`.
"""

from __future__ import annotations

from typing import Any

PARTS = ("argument", "output", "alias", "temp", "code", "total")
TOLERANCE = 0.10
# Settings both reports must share for their plans to be of the same program.
SETTINGS = ("config", "batch", "grad_accum_steps", "dtype", "remat")


def _settings(report: dict[str, Any]) -> dict[str, Any]:
  out = {k: report.get(k) for k in SETTINGS}
  out["grad_accum_steps"] = int(out["grad_accum_steps"] or 1)
  return out


def config_settings(config, batch: int) -> dict[str, Any]:
  """The settings a benchmark of `config` (overrides applied) at `batch` will report."""
  return dict(config=str(config.get("name", "")), batch=int(batch),
              grad_accum_steps=int(config.get("grad_accum_steps", 1) or 1),
              dtype=str(config.model.dtype), remat=config.model.remat)


def check_settings(preflight: dict[str, Any], settings: dict[str, Any]) -> None:
  """ValueError naming each setting in which the preflight report's program differs."""
  pre = _settings(preflight)
  differ = [f"{k} {pre[k]!r} (preflight) vs {settings[k]!r} (benchmark)"
            for k in SETTINGS if pre[k] != settings[k]]
  if differ:
    raise ValueError("the preflight report is of another program: " + ", ".join(differ))


def compare(preflight: dict[str, Any], bench: dict[str, Any],
            program: str = "train") -> dict[str, Any]:
  """Both plans of `program`, part by part (bytes and device/preflight ratios), the
  device's peak against the preflight's total, and whether the totals agree within
  `TOLERANCE`. ValueError when a report lacks the program or they differ in settings."""
  pre = (preflight.get("programs") or {}).get(program) or {}
  res = (bench.get("results") or {}).get(program) or {}
  plan = pre.get("memory")
  real = (res.get("memory") or {}).get("xla_plan")
  if not plan:
    raise ValueError(f"the preflight report has no memory plan of {program!r}")
  if not real:
    raise ValueError(f"the benchmark report has no XLA plan of {program!r} (run it with "
                     f"--mode={program}, not --compile_only on a backend without one)")
  check_settings(preflight, _settings(bench))
  parts = {}
  for k in PARTS:
    a, b = plan.get(k), real.get(k)
    parts[k] = dict(preflight=a, device=b, ratio=(b / a) if a and b is not None else None)
  total = parts["total"]["ratio"]
  peak = (res.get("memory") or {}).get("peak_bytes")
  peak_source = (res.get("memory") or {}).get("source")
  return dict(
      program=program, settings=_settings(bench),
      preflight=dict(target=(preflight.get("topology") or {}).get("device_kind"),
                     topology=(preflight.get("topology") or {}).get("name"),
                     jax=preflight.get("jax"), date=preflight.get("date")),
      device=dict(kind=(bench.get("machine") or {}).get("device_kind"),
                  jax=(bench.get("machine") or {}).get("jax"), date=bench.get("date")),
      parts=parts, peak_bytes=peak, peak_source=peak_source,
      peak_vs_preflight_total=(peak / plan["total"]) if peak and plan.get("total") else None,
      tolerance=TOLERANCE,
      within_tolerance=total is not None and abs(total - 1) <= TOLERANCE)


def format_comparison(c: dict[str, Any]) -> str:
  """The comparison as a few lines of text (GiB)."""
  gib = lambda v: "-" if v is None else f"{v / 2**30:.2f}"
  lines = [f"memory plan of {c['program']}: preflight for {c['preflight']['target']} "
           f"(jax {c['preflight']['jax']}, no GPU) vs on {c['device']['kind']} "
           f"(jax {c['device']['jax']})",
           f"  {'part':<9}{'preflight GiB':>14}{'device GiB':>12}{'device/pre':>12}"]
  for k, p in c["parts"].items():
    ratio = "-" if p["ratio"] is None else f"{p['ratio']:.3f}"
    lines.append(f"  {k:<9}{gib(p['preflight']):>14}{gib(p['device']):>12}{ratio:>12}")
  peak = c["peak_vs_preflight_total"]
  lines.append(f"  device peak {gib(c['peak_bytes'])} GiB ({c['peak_source']})"
               + ("" if peak is None else f", {peak:.3f} x the preflight's total"))
  lines.append(f"  totals {'agree' if c['within_tolerance'] else 'DO NOT agree'} within "
               f"{c['tolerance']:.0%}")
  return "\n".join(lines)
