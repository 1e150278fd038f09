"""The GPU preflight table of docs/performance.md: for every config on the GPU nodes people
have, the fastest batch layout that fits, and what bounds its step.

Each row is one `fcdm_jax.preflight --fit` run (`perf.fit`) in its own process: the training
step of a config at global batch 256 in bfloat16, compiled by XLA's GPU compiler for the
node's abstract GPUs over (remat policy, gradient accumulation) candidates; the row keeps the
choice (the lowest step bound that leaves 10% of the usable memory free), its overrides and
how many candidates were compiled. Rows are saved as they finish and skipped when already
there (`perf.table_rows`), so the table fills over several sittings. Time figures are
roofline bounds derived from compiler counts and vendor peaks, not measurements.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

from fcdm_jax.models.layers import resolve_dwconv_impl
from fcdm_jax.perf import table_rows

RESULTS = "docs/gpu_preflight.json"   # relative to the repository's root
DOC = "docs/performance.md"
START = "<!-- gpu-preflight-table:start (python -m fcdm_jax.preflight_table --table=gpu) -->"
END = "<!-- gpu-preflight-table:end -->"
BATCH = 256
DTYPE = "bfloat16"
VARIANTS = ("s", "b", "l", "xl")
RESOLUTIONS = (256, 512)
TOPOLOGIES = ("4x4090", "8xa100-80gb", "8xh100")
# The paper's claim the README answers from this table: XL/256 at batch 256 on four 4090s.
PAPER_SETTING = ("configs/xl_256.py", "4x4090")
# The depthwise-conv formulation the GPU configs run with ('auto' on a GPU). A row compiled
# with another one (an older default) is stale: shown until a run compiles it again.
DWCONV = resolve_dwconv_impl("auto", backend="gpu")


def entry(config: str, topology: str) -> dict[str, Any]:
  return dict(config=config, topology=topology, batch=BATCH, dtype=DTYPE, dwconv=DWCONV,
              key=f"{config}|{topology}|{BATCH}|{DTYPE}")


def entries() -> list[dict[str, Any]]:
  """Small configs first (quick rows before the long ones), every node for each."""
  return [entry(f"configs/{v}_{r}.py", topo) for v in VARIANTS for r in RESOLUTIONS
          for topo in TOPOLOGIES]


def command(e: dict[str, Any], json_path: str) -> list[str]:
  return [sys.executable, "-m", "fcdm_jax.preflight", f"--config={e['config']}",
          f"--topology={e['topology']}", f"--batch={e['batch']}", "--fit",
          f"--config.model.dtype={e['dtype']}", f"--json={json_path}"]


def summarize(e: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
  """The row's figures from a --fit report: the choice, or (when nothing fits) the candidate
  that came closest."""
  compiled = [c for c in report["candidates"] if c.get("compiled")]
  row = dict(e, date=report["date"], jax=report["jax"], gpu=report["device_kind"],
             devices=report["devices"], mesh=report["mesh"],
             params_sharding=report["params_sharding"], dwconv_used=report["dwconv_impl"],
             memory_bytes=report["memory_bytes"], usable_bytes=report["usable_bytes"],
             headroom=report["headroom"], overrides=report["overrides"],
             fits=report["choice"] is not None,
             candidates=[{k: c.get(k) for k in ("remat", "grad_accum_steps", "memory_bytes",
                                                 "fits", "step_s_bound", "skipped")}
                         for c in report["candidates"]],
             compiled=len(compiled), compile_s=sum(c.get("compile_s") or 0 for c in compiled))
  choice = report["choice"]
  if choice is None:
    sized = [c for c in compiled if c.get("memory_bytes") is not None]
    choice = min(sized, key=lambda c: c["memory_bytes"]) if sized else None
  if choice is not None:
    row.update(remat_used=choice["remat"], grad_accum_steps=choice["grad_accum_steps"],
               micro_batch_per_device=choice["micro_batch_per_device"],
               used_bytes=choice["memory_bytes"], step_s_bound=choice["step_s_bound"],
               binds=choice["binds"], compute_s=choice["compute_s"],
               memory_s=choice["memory_s"])
  return row


def stale(row: dict[str, Any]) -> bool:
  """Made with another depthwise-conv formulation than the GPU default (rows from before
  the default changed; a failed row records the one it tried, older ones none)."""
  return (row.get("dwconv_used") or row.get("dwconv")) != DWCONV


def load(path: pathlib.Path) -> dict[str, Any]:
  return json.loads(path.read_text()) if path.exists() else {}


def save(path: pathlib.Path, results: dict[str, Any], key: str) -> None:
  table_rows.save(path, results, key, load)


# ----------------------------------------------------------------------------- markdown

HEADER = ("| config | GPUs | remat | micro-batches x per GPU | memory GiB / GPU (usable of total) "
          "| fits | step bound ms | binds | img/s bound | compiled | compile s | dwconv |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def _row_line(e: dict[str, Any], r: dict[str, Any]) -> str:
  head = f"| {table_rows.label(e['config'])} | {e['topology']} |"
  dwconv = r.get("dwconv_used") or r.get("dwconv") or "shift"   # rows before the column: shift
  if "error" in r:
    return head + f" not compiled: {r['error'][:80]} | | | | | | | | | {dwconv} |"
  if r.get("remat_used") is None:
    return (head + " - | - | - | **no** | - | - | - | "
            + f"{r['compiled']} | {r['compile_s']:.0f} | {dwconv} |")
  step = r.get("step_s_bound")
  bound = "-" if step is None else f"{1e3 * step:.1f}"
  rate = "-" if not step else f"{r['batch'] / step:.0f}"
  memory = (f"{table_rows.gib(r['used_bytes'])} ({table_rows.gib(r['usable_bytes'])} of "
            f"{table_rows.gib(r['memory_bytes'])})")
  return (head + f" {r['remat_used']} | {r['grad_accum_steps']} x {r['micro_batch_per_device']} |"
          f" {memory} | {'yes' if r['fits'] else '**no** (closest shown)'} |"
          f" {bound} | {r.get('binds') or '-'} | {rate} | {r['compiled']} |"
          f" {r['compile_s']:.0f} | {dwconv} |")


def render(results: dict[str, Any]) -> str:
  """The doc's table: the rows done, the paper's setting spelled out, the rows missing."""
  lines = [START, "",
           "Regenerate (skips rows already in `docs/gpu_preflight.json`): "
           "`python -m fcdm_jax.preflight_table --table=gpu`. Each row is "
           f"`python -m fcdm_jax.preflight --config=FILE --topology=GPUS --batch={BATCH} --fit "
           f"--config.model.dtype={DTYPE}`: the training step at global batch {BATCH}, "
           "bf16, compiled by XLA's GPU compiler without a GPU for each candidate (remat "
           "policy, gradient accumulation), and the one with the lowest step bound that "
           "leaves 10% of the memory JAX's allocator takes (75% of the GPU's) free. "
           "Micro-batches x per GPU: the accumulation steps and each micro-batch's examples "
           "per GPU. Compiled: the candidates compiled (the others could not win, `perf.fit`). "
           "**Step bound and img/s are roofline bounds derived from compiler counts and "
           "vendor peaks, not measurements**; bytes count the model's loops once and the "
           "micro-batch loop through by an estimate (`perf.preflight_run`), so a "
           "memory-bound row is less certain than a compute-bound one. dwconv: the "
           f"depthwise-conv formulation compiled (the GPU default is `{DWCONV}`; rows made "
           "with another are compiled again by the next run).", "", *HEADER]
  missing = []
  for e in entries():
    r = results.get(e["key"])
    if r is None:
      missing.append(e)
    else:
      lines.append(_row_line(e, r))
  old = [e for e in entries() if results.get(e["key"]) is not None and stale(results[e["key"]])]
  if old:
    lines += ["", f"Made with an older default formulation ({len(old)} rows, compiled again "
              "by the next run): " + "; ".join(f"{table_rows.label(e['config'])} on "
                                               f"{e['topology']}" for e in old) + "."]
  if missing:
    lines += ["", f"Still missing ({len(missing)} of {len(entries())} rows, not yet compiled): "
              + "; ".join(f"{table_rows.label(e['config'])} on {e['topology']}"
                          for e in missing) + "."]
  paper = results.get(entry(*PAPER_SETTING)["key"])
  if paper is not None and "error" not in paper and paper.get("overrides"):
    lines += ["", f"The paper's setting, {table_rows.label(PAPER_SETTING[0])} at batch "
              f"{BATCH} on {PAPER_SETTING[1]}: `python -m fcdm_jax.main "
              f"--config={PAPER_SETTING[0]} --config.model.dtype={DTYPE} {paper['overrides']}`"
              f" (step >= {1e3 * paper['step_s_bound']:.0f} ms, a bound)."]
  lines += ["", END]
  return "\n".join(lines)


def write_doc(doc: pathlib.Path, results: dict[str, Any]) -> None:
  table_rows.write_section(doc, render(results), START, END, "GPU preflight table")


def update(results_path, doc, *, render_only: bool = False, only: str = "", skip: str = "",
           max_entries: int = 0, timeout_s: int = 3600, retry_errors: bool = False,
           jobs: int = 1, log=print) -> dict[str, Any]:
  """As `tpu_table.update`: compiles the missing rows (filtered by `only` / `skip`, failed
  ones again with `retry_errors`, at most `max_entries` when > 0, `jobs` at a time), saving
  each and rewriting the doc's table as it finishes."""
  results_path, doc = pathlib.Path(results_path), pathlib.Path(doc)
  results = load(results_path)
  if not render_only:
    todo = table_rows.pending(entries(), results, only=only, skip=skip,
                              retry_errors=retry_errors, max_entries=max_entries, stale=stale)

    def done(e, r, seconds):
      results[e["key"]] = r
      save(results_path, results, e["key"])
      write_doc(doc, results)
      log(f"  {e['key']} done in {seconds:.0f} s: " + (
          r["error"] if "error" in r else
          f"remat={r.get('remat_used')}, accum={r.get('grad_accum_steps')}, "
          f"{table_rows.gib(r.get('used_bytes'))} GiB, fits={r['fits']}, "
          f"bound {r.get('step_s_bound')} s ({r.get('binds')})"))

    table_rows.run_all(
        todo, lambda e: table_rows.run_preflight(e, command, summarize, timeout_s, log),
        done, jobs, log)
  write_doc(doc, results)
  return results
