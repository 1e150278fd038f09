"""The TPU preflight table of docs/performance.md: which config fits which slice, how fast at best.

Each entry is one `fcdm_jax.preflight` run of the training step (global batch 256) in its
own process; its figures go into the results JSON as soon as it finishes (`save`), and
entries already there are skipped, so the table fills over several sittings (one TPU
compile of FCDM takes minutes on a small machine). After each entry the table in the
markdown doc (between its marker comments) is rewritten, missing rows listed as such
(`render`, `write_doc`). Config files are found relative to the directory it runs in (the
repository's root), and each preflight runs there.

Rows name their settings (remat always; dwconv and parameter layout where they depart from
the config file), and a finished row is found by the program it compiled, not by its key:
so the table survives a change of a config's defaults (the doc marks, per config, the row
that is its default), and a row whose dwconv or layout default has changed since is
compiled again.

Entries: S, B, L, XL x 256, 512 px in bf16 with their default remat on v5e-8, v5p-8 and
v6e-8; XL/512 on a v5p-64 pod slice; for XL/256 on v5p-8 the sweep fp32/bf16 x remat
none/block/dots x dwconv_impl xla/shift/shift_vjp ('auto' is 'xla' on a TPU); and the rows
the defaults are chosen from: every config's remat candidates on v5e-8, and B/256 and L/256
in the other parameter layout (B on v5e-8, L on all three slices). Time figures are
roofline bounds derived from compiler counts, not measurements.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
from typing import Any

from fcdm_jax.config_base import PARAM_MESH_AXES
from fcdm_jax.models.layers import resolve_dwconv_impl
from fcdm_jax.perf import table_rows

RESULTS = "docs/tpu_preflight.json"   # the defaults, relative to the repository's root
DOC = "docs/performance.md"
START = "<!-- tpu-preflight-table:start (python -m fcdm_jax.preflight_table) -->"
END = "<!-- tpu-preflight-table:end -->"
BATCH = 256
VARIANTS = ("s", "b", "l", "xl")
TOPOLOGIES = ("v5e-8", "v5p-8", "v6e-8")


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
# others (the default's rows on all three show it). A config without candidates here gets
# its default rows only, and no remat choice (`choose_remat` says so).
CHOICE_SLICE = "v5e-8"
REMAT_CANDIDATES = {"s_256": ("none",), "s_512": ("none", "dots", "block"),
                    "b_256": ("none",), "b_512": ("none", "dots", "block"),
                    **{f"{v}_{r}": ("block", "dots") for v in ("l", "xl") for r in (256, 512)}}


# The parameter layouts compared where the choice is close, B and L at 256 px, at the
# config's remat. Elsewhere the size decides: S is replicated; XL is FSDP, its training
# state alone being 15.4 GiB per chip replicated (32 x 492.5 MiB of arguments in the
# v5p-64 XL/512 row), nearly all of a v5e chip; L/512 is FSDP, replicating L's state
# adding about 7.5 GiB per chip (the L/256 rows) to its 8.6 GiB on v5e-8, past 90% of 16.
# L/256 is compiled both ways on every slice: on v5e-8 replicated has the lower bound
# for more HBM, so whether it fits everywhere decides.
LAYOUT_CANDIDATES = {"b_256": ("replicated", "fsdp"), "l_256": ("replicated", "fsdp")}
LAYOUT_SLICES = {"b_256": (CHOICE_SLICE,), "l_256": TOPOLOGIES}


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
    for remat in REMAT_CANDIDATES.get(pathlib.Path(config_file).stem, ()):
      out.append(entry(config_file, CHOICE_SLICE, remat=remat))
  for stem, layouts in LAYOUT_CANDIDATES.items():
    config_file = f"configs/{stem}.py"
    remat = config_defaults(config_file).model.remat
    out += [entry(config_file, topo, remat=remat, params=params) for params in layouts
            for topo in LAYOUT_SLICES[stem]]
  seen, unique = set(), []
  for e in out:
    if signature(e) not in seen:
      seen.add(signature(e))
      unique.append(e)
  return unique


_CONFIGS: dict[str, Any] = {}


def config_defaults(config_file: str):
  """The config file's get_config() (cached: entries() asks for each row); the file is
  found relative to the working directory."""
  if config_file not in _CONFIGS:
    spec = importlib.util.spec_from_file_location("_table_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _CONFIGS[config_file] = module.get_config()
  return _CONFIGS[config_file]


def settings(e: dict[str, Any]) -> dict[str, str]:
  """What the row compiles with today: its own settings, else the config file's defaults
  (dwconv 'auto' resolved for a TPU), named as a finished row records them."""
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
            f"--config.mesh.axes={PARAM_MESH_AXES[e['params']]}"]
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
  """Adds row `key` of `results` to the file (`table_rows.save`: locked, merged, atomic)."""
  table_rows.save(path, results, key, load)


def run_entry(e: dict[str, Any], timeout_s: int, log) -> dict[str, Any]:
  return table_rows.run_preflight(e, command, summarize, timeout_s, log)


def run_all(todo, results, results_path, doc, timeout_s, jobs, log) -> None:
  """Compiles `todo` with `jobs` rows at a time, each in its own process; every finished row
  is saved (and the doc rewritten) as it ends."""
  def done(e, r, seconds):
    results[e["key"]] = r
    save(results_path, results, e["key"])
    write_doc(doc, results)
    log(f"  {e['key']} done in {seconds:.0f} s: "
        + (r["error"] if "error" in r else
           f"{_gib(r['hbm_used_bytes'])} GiB, fits={r['fits']}, "
           f"bound {r.get('step_s_bound')} s ({r.get('binds')})"))

  table_rows.run_all(todo, lambda e: run_entry(e, timeout_s, log), done, jobs, log)


# ----------------------------------------------------------------------------- defaults

MARGIN = 0.10   # HBM a default leaves free on every slice (previews, runtime buffers)
TIE = 0.01      # bounds closer than this are no evidence: a tie, which each choice settles


def filed_key(e: dict[str, Any]) -> str:
  """The key `e`'s row is filed under (rekey): that of the entry compiling the same program
  (a default row, when `e` names the default's settings), else `e`'s own."""
  return next((x["key"] for x in entries() if signature(x) == signature(e)), e["key"])


def lookup(results: dict[str, Any], e: dict[str, Any]) -> dict[str, Any] | None:
  """The finished row of `e`'s program: under its own key or the key it is filed under."""
  row = results.get(e["key"])
  return results.get(filed_key(e)) if row is None else row


def _candidate_rows(results: dict[str, Any], es: list[dict[str, Any]]) -> list | None:
  """The finished rows of one candidate's entries (CHOICE_SLICE's first), or None while
  its CHOICE_SLICE row, or a row the table lists, is not compiled yet (a slice the table
  does not list for it counts only where a row happens to exist)."""
  listed = {signature(e) for e in entries()}
  rows = [lookup(results, e) for e in es]
  if any((r is None or "error" in r) and (i == 0 or signature(e) in listed)
         for i, (e, r) in enumerate(zip(es, rows))):
    return None
  return rows


def _choose(rows_of: dict[str, list | None], prefer) -> dict[str, Any]:
  """Of the candidates ({name: its rows, CHOICE_SLICE's first, or None while missing}),
  those that leave MARGIN of HBM free on every slice they were compiled for, the one with
  the lowest step bound on CHOICE_SLICE; of bounds within TIE of the lowest, the one
  `prefer(name, row)` ranks first. {'choice': None, 'why': ...} while one is missing."""
  fitting, refused, missing = [], [], []
  for name, rows in rows_of.items():
    if rows is None:
      missing.append(name)
      continue
    main = rows[0]
    tight = [(r["topology"], r["margin_bytes"] / r["hbm_bytes"]) for r in rows
             if r is not None and "error" not in r
             and r["margin_bytes"] < MARGIN * r["hbm_bytes"]]
    if tight:
      refused.append((name, tight))
    else:
      fitting.append((main["step_s_bound"], name, main))
  if missing:
    return dict(choice=None, why=f"rows missing for {', '.join(missing)}")
  why = "; ".join(f"{name} needs over {100 * (1 - MARGIN):.0f}% of HBM on "
                  + ", ".join(f"{topo} ({100 * (1 - m):.0f}%)" for topo, m in tight)
                  for name, tight in refused)
  if not fitting:
    return dict(choice=None, why=why or "no candidate")
  fitting.sort(key=lambda f: f[0])
  close = [f for f in fitting if f[0] <= fitting[0][0] * (1 + TIE)]
  best = min(close, key=lambda f: prefer(f[1], f[2]))
  fitting.remove(best)
  used = lambda r: 100 * r["hbm_used_bytes"] / r["hbm_bytes"]
  why = "; ".join(filter(None, [
      f"{best[1]}: step bound {1e3 * best[0]:.1f} ms on {CHOICE_SLICE}, "
      f"{used(best[2]):.0f}% of HBM",
      *(f"{n}: {1e3 * b:.1f} ms, {used(r):.0f}%" for b, n, r in fitting), why]))
  return dict(choice=best[1], why=why)


def choose_remat(config_file: str, results: dict[str, Any]) -> dict[str, Any]:
  """The remat policy the table supports for a config, under its own parameter layout: of
  its REMAT_CANDIDATES, `_choose`'s, ties going to the policy that uses less HBM.
  {'remat': None, 'why': ...} while a candidate's row is missing, and for a config the
  table lists no candidates for (its own remat is then the table's only word on it)."""
  stem = pathlib.Path(config_file).stem
  if stem not in REMAT_CANDIDATES:
    return dict(remat=None, why=f"the table lists no remat candidates for {stem} "
                f"(REMAT_CANDIDATES has {', '.join(sorted(REMAT_CANDIDATES))})")
  rows_of = {remat: _candidate_rows(results, [entry(config_file, topo, remat=remat)
                                              for topo in _slices()])
             for remat in REMAT_CANDIDATES[stem]}
  c = _choose(rows_of, lambda name, row: row["hbm_used_bytes"] / row["hbm_bytes"])
  return dict(remat=c["choice"], why=c["why"])


def choose_layout(config_file: str, results: dict[str, Any]) -> dict[str, Any] | None:
  """The parameter layout the table supports for a config (None where LAYOUT_CANDIDATES
  does not compare layouts), at its own remat: `_choose`'s, ties going to replicated, since
  the bound leaves out the all-gathers FSDP adds. {'params': None, ...} while rows are
  missing."""
  stem = pathlib.Path(config_file).stem
  if stem not in LAYOUT_CANDIDATES:
    return None
  remat = config_defaults(config_file).model.remat
  rows_of = {params: _candidate_rows(results, [entry(config_file, topo, remat=remat,
                                                     params=params) for topo in _slices()])
             for params in LAYOUT_CANDIDATES[stem]}
  c = _choose(rows_of, lambda name, row: name != "replicated")
  return dict(params=c["choice"], why=c["why"])


def _slices() -> tuple[str, ...]:
  """CHOICE_SLICE, then the other slices of the table."""
  return (CHOICE_SLICE, *(t for t in TOPOLOGIES if t != CHOICE_SLICE))


def choose_dwconv(results: dict[str, Any]) -> dict[str, Any]:
  """The depthwise-conv formulation the XL/256 v5p-8 sweep supports on a TPU: the one that
  needs the least HBM at the most (dtype, remat) points, its step bound beside the others'."""
  wins, points, worst = {}, 0, {}
  for dtype in ("float32", "bfloat16"):
    for remat in ("none", "block", "dots"):
      rows = {}
      for dw in ("xla", "shift", "shift_vjp"):
        r = lookup(results, entry("configs/xl_256.py", "v5p-8", dtype, remat, dw))
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
  lines = ["", "**Defaults chosen from this table** (`fcdm_jax.perf.tpu_table.choose_remat`, "
           "`choose_layout`, `choose_dwconv`; tests/test_preflight_table.py checks configs/ "
           "against them): a config's remat (under its parameter layout) and, for B/256 and "
           "L/256, its parameter layout (at its remat) are, of the candidates, the one with "
           f"the lowest step bound on {CHOICE_SLICE} (the least HBM per image of the three "
           f"slices) that leaves {100 * MARGIN:.0f}% of HBM free there and on every slice it "
           f"was compiled for, at batch {BATCH}; bounds within {100 * TIE:.0f}% of each other "
           "count as a tie, which the remat policy using less HBM wins, and for layouts "
           "replicated wins (the bound leaves out FSDP's all-gathers).", ""]
  dw = choose_dwconv(results)
  lines.append(f"- dwconv on TPU ('auto'): **{dw['dwconv'] or 'undecided'}**: {dw['why']}.")
  for variant in VARIANTS:
    for res in (256, 512):
      config_file = f"configs/{variant}_{res}.py"
      c = choose_remat(config_file, results)
      lines.append(f"- {_label(dict(config=config_file))}: remat **{c['remat'] or 'undecided'}**"
                   f" ({c['why']}).")
      layout = choose_layout(config_file, results)
      if layout is not None:
        lines.append(f"- {_label(dict(config=config_file))}: parameters "
                     f"**{layout['params'] or 'undecided'}** ({layout['why']}).")
  return lines


# ----------------------------------------------------------------------------- markdown


_gib = table_rows.gib


def _label(e) -> str:
  return table_rows.label(e["config"])


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
    lines += ["", "Rows of programs no entry compiles any more (a config's default, or a "
              "candidate under its layout, when they were compiled):", "", *HEADER,
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
  table_rows.write_section(doc, render(results), START, END, "TPU preflight table")


def update(results_path, doc, *, render_only: bool = False, only: str = "", skip: str = "",
           max_entries: int = 0, timeout_s: int = 3600, retry_errors: bool = False,
           jobs: int = 1, log=print) -> dict[str, Any]:
  """Compiles the rows missing from `results_path` (those whose key contains `only` and not
  `skip`, failed ones again with `retry_errors`, at most `max_entries` when > 0, `jobs` at
  a time), then rewrites the table in `doc`; `render_only` only rewrites it. Returns the
  rows."""
  results_path, doc = pathlib.Path(results_path), pathlib.Path(doc)
  results = load(results_path)
  if not render_only:
    todo = table_rows.pending(entries(), results, only=only, skip=skip,
                              retry_errors=retry_errors, max_entries=max_entries)
    run_all(todo, results, results_path, doc, timeout_s, max(1, jobs), log)
  write_doc(doc, results)
  return results
