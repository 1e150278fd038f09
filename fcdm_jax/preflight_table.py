"""The TPU preflight table of docs/performance.md: every config on v5e-8, v5p-8, v6e-8 and more.

  python -m fcdm_jax.preflight_table            # compile what is missing, update the doc
  python -m fcdm_jax.preflight_table --jobs 2   # two rows at a time (one core each)
  python -m fcdm_jax.preflight_table --render   # only rewrite the doc's table from the JSON

Each entry is one `fcdm_jax.preflight` run of the training step (global batch 256) in its own
process; its figures go into docs/tpu_preflight.json as soon as it finishes, and entries
already there are skipped, so the table fills over several sittings (one TPU compile of
FCDM takes minutes on a small machine). After each entry the table in docs/performance.md
(between its marker comments) is rewritten, missing rows listed as such.

Rows name their settings (remat always; dwconv and parameter layout where they depart from
the config file), and a finished row is found by the program it compiled, not by its key:
so the table survives a change of a config's defaults (the doc marks, per config, the row
that is its default), and a row whose dwconv or layout default has changed since is
compiled again.

Entries: S, B, L, XL x 256, 512 px in bf16 with their default remat on v5e-8, v5p-8 and
v6e-8; XL/512 on a v5p-64 pod slice; for XL/256 on v5p-8 the sweep fp32/bf16 x remat
none/block/dots x dwconv_impl xla/shift/shift_vjp ('auto' is 'xla' on a TPU); and the rows
the defaults are chosen from: every config's remat candidates on v5e-8, B/256 under FSDP
and L/256 replicated on v5e-8. Time figures are roofline bounds derived from compiler counts, not measurements.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "tpu_preflight.json"
DOC = REPO / "docs" / "performance.md"
START = "<!-- tpu-preflight-table:start (python -m fcdm_jax.preflight_table) -->"
END = "<!-- tpu-preflight-table:end -->"
BATCH = 256
VARIANTS = ("s", "b", "l", "xl")
TOPOLOGIES = ("v5e-8", "v5p-8", "v6e-8")


MESH_AXES = {"fsdp": (("data", 1), ("fsdp", -1)), "replicated": (("data", -1), ("fsdp", 1))}


def entry(config: str, topology: str, dtype: str = "bfloat16", remat: str | None = None,
          dwconv_impl: str | None = None, params: str | None = None) -> dict[str, Any]:
  """One table row's settings; None = the config's own value. `params` ('fsdp' or
  'replicated') sets config.sharding.params and the mesh that goes with it."""
  e = dict(config=config, topology=topology, batch=BATCH, dtype=dtype, remat=remat,
           dwconv_impl=dwconv_impl, params=params)
  e["key"] = "|".join(str(e[k]) for k in ("config", "topology", "batch", "dtype", "remat",
                                          "dwconv_impl"))
  if params is not None:   # (rows without it keep the keys they were saved under)
    e["key"] += f"|{params}"
  return e


# Each config's candidates for its default remat, compiled on CHOICE_SLICE: the 8-chip
# slice with the least HBM per image at batch 256 (v5e-8: 16 GiB for 32 images per chip;
# v6e-8 has 32 GiB for 32, v5p-8 95 GiB for 64), so a policy that fits there fits the
# others (the default's rows on all three show it).
CHOICE_SLICE = "v5e-8"
REMAT_CANDIDATES = {"s_256": ("none",), "s_512": ("none", "dots", "block"),
                    "b_256": ("none",), "b_512": ("none", "dots", "block"),
                    **{f"{v}_{r}": ("block", "dots") for v in ("l", "xl") for r in (256, 512)}}


def entries() -> list[dict[str, Any]]:
  """In the order they are compiled: the pod slice and the smallest config first (the
  acceptance runs), then every config with its default remat on every slice, small to
  large, then the XL/256 sweep, then the remat candidates on CHOICE_SLICE and the other
  parameter layouts. Rows that compile the same program (same resolved settings) appear
  once, under the first."""
  configs = [f"configs/{v}_{r}.py" for v in VARIANTS for r in (256, 512)]
  out = [entry("configs/xl_512.py", "v5p-64", remat="block"),
         entry("configs/s_256.py", "v5e-8", remat="none")]
  for config_file in configs:
    remat = config_defaults(config_file).model.remat
    out += [entry(config_file, topo, remat=remat) for topo in TOPOLOGIES]
  for dtype in ("float32", "bfloat16"):
    for remat in ("none", "block", "dots"):
      for dw in ("xla", "shift", "shift_vjp"):
        out.append(entry("configs/xl_256.py", "v5p-8", dtype, remat, dw))
  for config_file in configs:
    for remat in REMAT_CANDIDATES[pathlib.Path(config_file).stem]:
      out.append(entry(config_file, CHOICE_SLICE, remat=remat))
  # The other parameter layout where the choice is close: B and L at 256 px.
  out += [entry("configs/b_256.py", CHOICE_SLICE, remat="none", params="fsdp"),
          entry("configs/l_256.py", CHOICE_SLICE, remat="block", params="replicated")]
  seen, unique = set(), []
  for e in out:
    if signature(e) not in seen:
      seen.add(signature(e))
      unique.append(e)
  return unique


_CONFIGS: dict[str, Any] = {}


def config_defaults(config_file: str):
  """The config file's get_config() (cached: entries() asks for each row)."""
  if config_file not in _CONFIGS:
    import importlib.util
    spec = importlib.util.spec_from_file_location("_table_config", REPO / config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _CONFIGS[config_file] = module.get_config()
  return _CONFIGS[config_file]


def settings(e: dict[str, Any]) -> dict[str, str]:
  """What the row compiles with today: its own settings, else the config file's defaults
  (dwconv 'auto' resolved for a TPU), named as a finished row records them."""
  from fcdm_jax.models.layers import resolve_dwconv_impl
  config = config_defaults(e["config"])
  return dict(remat_used=e["remat"] or config.model.remat,
              dwconv_used=resolve_dwconv_impl(e["dwconv_impl"] or config.model.dwconv_impl,
                                              backend="tpu"),
              params_sharding=e.get("params") or config.sharding.params)


def signature(e: dict[str, Any]) -> tuple:
  """The program a row compiles: same signature, same figures."""
  return (e["config"], e["topology"], e["batch"], e["dtype"], *settings(e).values())


def row_signature(row: dict[str, Any]) -> tuple | None:
  """The program a finished row compiled, from what it recorded (None for a failure)."""
  if any(k not in row for k in ("remat_used", "dwconv_used", "params_sharding")):
    return None
  return (row["config"], row["topology"], row["batch"], row["dtype"], row["remat_used"],
          row["dwconv_used"], row["params_sharding"])


def is_default(e: dict[str, Any]) -> bool:
  """Whether the row is its config file's own setting (remat, dwconv, parameter layout)."""
  return settings(e) == settings(dict(e, remat=None, dwconv_impl=None, params=None))


def rekey(rows: dict[str, Any]) -> dict[str, Any]:
  """Files rows under the entry that compiles their program, so a row saved under another
  key (an older table layout, a config default since changed) is found, and a row whose
  program no entry compiles any more is kept under its own key but not shown."""
  by_signature = {signature(e): e for e in entries()}
  keys = {e["key"] for e in by_signature.values()}
  out: dict[str, Any] = {}
  for key, row in rows.items():
    e = by_signature.get(row_signature(row))
    if e is None:
      if row_signature(row) is not None and key in keys:   # that entry compiles otherwise now
        key = f"{key}|superseded"
      out.setdefault(key, row)
      continue
    kept = out.get(e["key"])
    if kept is None or "error" in kept or str(row.get("date")) > str(kept.get("date")):
      out[e["key"]] = dict(row, **{k: e[k] for k in ("remat", "dwconv_impl", "params", "key")})
  return out


def command(e: dict[str, Any], json_path: str) -> list[str]:
  cmd = [sys.executable, "-m", "fcdm_jax.preflight", f"--config={e['config']}",
         f"--topology={e['topology']}", f"--batch={e['batch']}", "--programs=train",
         f"--config.model.dtype={e['dtype']}", f"--json={json_path}"]
  if e["remat"] is not None:
    cmd.append(f"--config.model.remat={e['remat']}")
  if e["dwconv_impl"] is not None:
    cmd.append(f"--config.model.dwconv_impl={e['dwconv_impl']}")
  if e.get("params") is not None:
    cmd += [f"--config.sharding.params={e['params']}",
            f"--config.mesh.axes={MESH_AXES[e['params']]}"]
  return cmd


def summarize(e: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
  """The row's figures from a preflight report (the training step's)."""
  r = report["programs"]["train"]
  row = dict(e, date=report["date"], jax=report["jax"], remat_used=report["remat"],
             dwconv_used=report["dwconv_impl"], mesh=report["mesh"],
             params_sharding=report["params_sharding"], chips=report["topology"]["chips"],
             hosts=report["topology"]["hosts"], hbm_bytes=report["chip"]["hbm_bytes"],
             compile_s=r["compile_s"], fits=r["fits"], margin_bytes=r["margin_bytes"])
  if r["compiled"]:
    row["hbm_used_bytes"] = r["memory"]["total"]
    rf = r["roofline"]
    row.update(step_s_bound=rf["step_s_bound"], binds=rf["binds"],
               img_per_s_bound=rf["img_per_s_bound"], mfu_bound=rf["mfu_bound"],
               compute_s=rf["compute_s"], memory_s=rf["memory_s"])
  else:
    row.update(hbm_used_bytes=r["required_bytes"], compiler_error=r["compiler_error"])
  return row


def load(path: pathlib.Path) -> dict[str, Any]:
  return rekey(json.loads(path.read_text())) if path.exists() else {}


def save(path: pathlib.Path, results: dict[str, Any], key: str) -> None:
  """Adds row `key` of `results` to the file, merged under a lock with what other sittings
  (`--only`/`--skip` on disjoint rows) wrote meanwhile; written to a temporary file and
  renamed, so an interrupted run loses one row at most. `results` gains their rows too."""
  import fcntl
  with open(path.with_suffix(".json.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    merged = load(path)
    merged[key] = results[key]
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
  results.update(merged)


def run_entry(e: dict[str, Any], timeout_s: int, log) -> dict[str, Any]:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    t0 = time.time()
    try:
      proc = subprocess.run(command(e, out), cwd=REPO, capture_output=True, text=True,
                            timeout=timeout_s)
    except subprocess.TimeoutExpired:
      return dict(e, error=f"timed out after {timeout_s} s", date=time.strftime("%Y-%m-%d"))
    if proc.returncode in (0, 1) and os.path.exists(out):
      with open(out) as f:
        return summarize(e, json.load(f))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    log(f"  failed after {time.time() - t0:.0f} s: {' | '.join(tail)}")
    return dict(e, error=f"exit {proc.returncode}: {' | '.join(tail)[:500]}",
                date=time.strftime("%Y-%m-%d"))


def run_all(todo, results, results_path, doc, timeout_s, jobs, log) -> None:
  """Compiles `todo` with `jobs` rows at a time, each in its own process; every finished row
  is saved (and the doc rewritten) by this thread alone, so no row is lost to a race."""
  from concurrent import futures

  def one(e):
    log(f"{time.strftime('%H:%M:%S')} {e['key']}: compiling ...")
    t0 = time.time()
    return run_entry(e, timeout_s, log), time.time() - t0

  with futures.ThreadPoolExecutor(jobs) as pool:
    pending = {pool.submit(one, e): e for e in todo}
    for fut in futures.as_completed(pending):
      e = pending[fut]
      r, seconds = fut.result()
      results[e["key"]] = r
      save(results_path, results, e["key"])
      write_doc(doc, results)
      log(f"  {e['key']} done in {seconds:.0f} s: "
          + (r["error"] if "error" in r else
             f"{_gib(r['hbm_used_bytes'])} GiB, fits={r['fits']}, "
             f"bound {r.get('step_s_bound')} s ({r.get('binds')})"))


# ----------------------------------------------------------------------------- defaults

MARGIN = 0.10   # HBM a default leaves free on every slice (previews, runtime buffers)
TIE = 0.01      # bounds closer than this are no evidence: the policy with less HBM is taken


def choose_remat(config_file: str, results: dict[str, Any]) -> dict[str, Any]:
  """The remat policy the table supports for a config: of its candidates, those that leave
  MARGIN of HBM free on CHOICE_SLICE at batch 256 in bf16 (and on every other slice it was
  compiled for), the one with the lowest step bound there (of bounds within TIE of the
  lowest, the one using the least HBM). {'remat': None, 'why': ...} while a candidate's
  row is missing."""
  fitting, refused, missing = [], [], []
  for remat in REMAT_CANDIDATES[pathlib.Path(config_file).stem]:
    rows = [results.get(entry(config_file, topo, remat=remat)["key"]) for topo in TOPOLOGIES]
    main = rows[TOPOLOGIES.index(CHOICE_SLICE)]
    if main is None or "error" in main:
      missing.append(remat)
      continue
    tight = [(r["topology"], r["margin_bytes"] / r["hbm_bytes"]) for r in rows
             if r is not None and "error" not in r
             and r["margin_bytes"] < MARGIN * r["hbm_bytes"]]
    if tight:
      refused.append((remat, tight))
    else:
      fitting.append((main["step_s_bound"], remat, main["hbm_used_bytes"] / main["hbm_bytes"]))
  if missing:
    return dict(remat=None, why=f"{CHOICE_SLICE} rows missing for remat {', '.join(missing)}")
  why = "; ".join(f"{remat} needs over {100 * (1 - MARGIN):.0f}% of HBM on "
                  + ", ".join(f"{topo} ({100 * (1 - m):.0f}%)" for topo, m in tight)
                  for remat, tight in refused)
  if not fitting:
    return dict(remat=None, why=why or "no candidate")
  fitting.sort()
  close = [f for f in fitting if f[0] <= fitting[0][0] * (1 + TIE)]
  bound, remat, used = min(close, key=lambda f: f[2])
  fitting.remove((bound, remat, used))
  fitting.insert(0, (bound, remat, used))
  why = "; ".join(filter(None, [
      f"{remat}: step bound {1e3 * bound:.1f} ms on {CHOICE_SLICE}, {100 * used:.0f}% of HBM",
      *(f"{r}: {1e3 * b:.1f} ms, {100 * u:.0f}%" for b, r, u in fitting[1:]), why]))
  return dict(remat=remat, why=why)


def choose_dwconv(results: dict[str, Any]) -> dict[str, Any]:
  """The depthwise-conv formulation the XL/256 v5p-8 sweep supports on a TPU: the one that
  needs the least HBM at the most (dtype, remat) points, its step bound beside the others'."""
  wins, points, worst = {}, 0, {}
  for dtype in ("float32", "bfloat16"):
    for remat in ("none", "block", "dots"):
      rows = {}
      for dw in ("xla", "shift", "shift_vjp"):
        e = entry("configs/xl_256.py", "v5p-8", dtype, remat, dw)
        r = results.get(e["key"]) or results.get(
            next((x["key"] for x in entries() if signature(x) == signature(e)), ""))
        if r is None or "error" in r:
          return dict(dwconv=None, why="sweep rows missing")
        rows[dw] = r
      points += 1
      best = min(rows, key=lambda d: rows[d]["hbm_used_bytes"])
      wins[best] = wins.get(best, 0) + 1
      for dw, r in rows.items():
        if r.get("step_s_bound") and rows["xla"].get("step_s_bound"):
          worst[dw] = max(worst.get(dw, 0.0), r["step_s_bound"] / rows["xla"]["step_s_bound"])
  dw = max(wins, key=wins.get)
  return dict(dwconv=dw, why=f"least HBM at {wins[dw]} of {points} sweep points; step bounds "
              + ", ".join(f"{d} up to {v:.3f}x xla's" for d, v in sorted(worst.items())
                          if d != "xla"))


def render_defaults(results: dict[str, Any]) -> list[str]:
  lines = ["", "**Defaults chosen from this table** (`preflight_table.choose_remat`, "
           "`choose_dwconv`; tests/test_preflight_table.py checks configs/ against them): "
           f"a config's remat is, of its candidates, the one with the lowest step bound on "
           f"{CHOICE_SLICE} (the least HBM per image of the three slices) that leaves "
           f"{100 * MARGIN:.0f}% of HBM free there and on every slice it was compiled for, at "
           f"batch {BATCH}; bounds within {100 * TIE:.0f}% of each other count as a tie, "
           "which the policy using less HBM wins.", ""]
  dw = choose_dwconv(results)
  lines.append(f"- dwconv on TPU ('auto'): **{dw['dwconv'] or 'undecided'}**: {dw['why']}.")
  for variant in VARIANTS:
    for res in (256, 512):
      config_file = f"configs/{variant}_{res}.py"
      c = choose_remat(config_file, results)
      lines.append(f"- {_label(dict(config=config_file))}: remat **{c['remat'] or 'undecided'}**"
                   f" ({c['why']}).")
  return lines


# ----------------------------------------------------------------------------- markdown


def _gib(v) -> str:
  return "-" if v is None else f"{v / 2**30:.1f}"


def _label(e) -> str:
  """configs/xl_512.py -> XL/512."""
  return pathlib.Path(e["config"]).stem.upper().replace("_", "/")


HEADER = ("| config | slice | dtype | remat | dwconv | mesh | HBM GiB / chip | fits | "
          "step bound ms | binds | img/s bound | MFU bound | compile s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def _row_line(e: dict[str, Any], r: dict[str, Any], mark: str) -> str:
  dtype = "bf16" if e["dtype"] == "bfloat16" else "fp32"
  mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
  step, ips, mfu = r.get("step_s_bound"), r.get("img_per_s_bound"), r.get("mfu_bound")
  figures = [_gib(r["hbm_used_bytes"]) + " of " + _gib(r["hbm_bytes"]),
             "yes" if r["fits"] else "**no**",
             "-" if step is None else f"{1e3 * step:.1f}", r.get("binds", "-"),
             "-" if ips is None else f"{ips:.0f}",
             "-" if mfu is None else f"{100 * min(mfu, 1.0):.0f}%", f"{r['compile_s']:.0f}"]
  return (f"| {_label(e)} | {e['topology']} | {dtype} | {r['remat_used']}{mark} | "
          f"{r['dwconv_used']} | {mesh} ({r['params_sharding']}) | " + " | ".join(figures) + " |")


def render(results: dict[str, Any]) -> str:
  """The doc's table: the rows done, then the rows still missing."""
  todo = entries()
  lines = [START, "",
           f"Regenerate (skips rows already in `docs/tpu_preflight.json`): "
           f"`python -m fcdm_jax.preflight_table`. Training step, global batch {BATCH}; "
           "HBM = XLA's plan per chip (arguments + outputs - donated + temporaries + code). "
           "**Step bound, img/s and MFU are roofline bounds derived from compiler counts "
           "(FLOPs per chip counted through every loop, HBM bytes with loops counted once) and "
           "vendor peaks, not "
           "measurements**: a real step is slower. A row the compiler refused shows the "
           "memory it asked for. **(default)** marks the config file's own remat, dwconv "
           "and parameter layout.", "", *HEADER]
  missing = []
  for e in todo:
    r = results.get(e["key"])
    if r is None:
      missing.append(e)
      continue
    dtype = "bf16" if e["dtype"] == "bfloat16" else "fp32"
    if "error" in r:
      lines.append(f"| {_label(e)} | {e['topology']} | {dtype} | {e['remat'] or '-'} | "
                   f"{e['dwconv_impl'] or '-'} | | | not compiled: {r['error'][:80]} "
                   "| | | | | |")
      continue
    lines.append(_row_line(e, r, " **(default)**" if is_default(e) else ""))
  keys = {e["key"] for e in todo}
  earlier = [r for k, r in sorted(results.items()) if k not in keys and row_signature(r)]
  if earlier:
    lines += ["", "Rows of programs no entry compiles any more (settings that were a "
              "config's default when they were compiled):", "", *HEADER,
              *(_row_line(r, r, "") for r in earlier)]
  if missing:
    lines += ["", f"Still missing ({len(missing)} of {len(todo)} rows, not yet compiled): "
              + "; ".join(f"{_label(e)} {e['topology']} {e['dtype']}"
                          + (f" remat={e['remat']}" if e["remat"] else "")
                          + (f" dwconv={e['dwconv_impl']}" if e["dwconv_impl"] else "")
                          + (f" params={e['params']}" if e.get("params") else "")
                          for e in missing) + "."]
  lines += render_defaults(results)
  lines += ["", END]
  return "\n".join(lines)


def write_doc(doc: pathlib.Path, results: dict[str, Any]) -> None:
  """Replaces the table between the markers (appends a section if there is none)."""
  text = doc.read_text() if doc.exists() else ""
  table = render(results)
  if START in text and END in text:
    head, rest = text.split(START, 1)
    text = head + table + rest.split(END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n## TPU preflight table\n\n" + table + "\n"
  tmp = doc.with_suffix(f".md.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, doc)


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", default=str(RESULTS), help="the JSON file of finished rows")
  p.add_argument("--doc", default=str(DOC), help="the markdown file holding the table")
  p.add_argument("--render", action="store_true", help="only rewrite the doc's table")
  p.add_argument("--only", default="", help="compile only rows whose key contains this")
  p.add_argument("--skip", default="", help="leave out rows whose key contains this (two "
                 "sittings on disjoint rows, e.g. --only=shift and --skip=shift, can share "
                 "the JSON file)")
  p.add_argument("--max_entries", type=int, default=0, help="stop after N rows (0 = all)")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per row")
  p.add_argument("--retry_errors", action="store_true", help="recompile rows that failed")
  p.add_argument("--jobs", type=int, default=1,
                 help="rows compiled side by side (each compile is mostly one thread; "
                      "mind the host memory: an XL compile holds a few GiB)")
  args = p.parse_args(argv)
  results_path, doc = pathlib.Path(args.results), pathlib.Path(args.doc)
  results = load(results_path)
  log = lambda s: print(s, flush=True)
  if not args.render:
    todo = [e for e in entries()
            if args.only in e["key"] and not (args.skip and args.skip in e["key"])
            and (results.get(e["key"]) is None
                 or (args.retry_errors and "error" in results[e["key"]]))]
    if args.max_entries:
      todo = todo[:args.max_entries]
    run_all(todo, results, results_path, doc, args.timeout, max(1, args.jobs), log)
  write_doc(doc, results)


if __name__ == "__main__":
  main()
