"""The TPU table: its rows, skipping what is done, saving each row, rendering the doc.

No compile here (`run_entry` is replaced): the preflight itself is tests/test_preflight.py.
Paths (config files, the committed table) are relative to the repository's root, where the
table runs.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fcdm_jax import config_base
from fcdm_jax.perf import tpu_table as table

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def update(results, doc, **kwargs):
  """One sitting of the table over these files (what the command's main does)."""
  return table.update(results, doc, log=lambda s: None, **kwargs)


def fake_row(e, hbm=20 * 2**30, fits=False):
  return dict(e, date="2026-12-01", jax="0.10.2", **table.settings(e),
              mesh={"data": 1, "fsdp": 8}, chips=8, hosts=2,
              hbm_bytes=16 * 2**30, compile_s=250.0, fits=fits, margin_bytes=16 * 2**30 - hbm,
              hbm_used_bytes=hbm, step_s_bound=0.5, binds="compute", img_per_s_bound=512.0,
              mfu_bound=0.7, compute_s=0.5, memory_s=0.2)


def test_rows_cover_the_issue():
  es = table.entries()
  keys = [e["key"] for e in es]
  # defaults: 8 configs x 3 slices; the pod slice; the XL/256 sweep less its point that is
  # XL/256's default row on v5p-8; remat candidates on v5e-8 other than the default
  # (S/512, B/512: dots, block; L, XL: dots); the other layout of B/256 on v5e-8 and of
  # L/256 on all three slices
  assert len(set(keys)) == len(keys) == 8 * 3 + 1 + (18 - 1) + (2 * 2 + 4) + (1 + 3)
  assert len({table.signature(e) for e in es}) == len(es)   # no program twice
  assert keys[:2] == ["configs/xl_512.py|v5p-64|256|bfloat16|block|None",
                      "configs/s_256.py|v5e-8|256|bfloat16|none|None"]
  for variant, candidates in table.REMAT_CANDIDATES.items():
    for remat in candidates:
      assert table.entry(f"configs/{variant}.py", "v5e-8", remat=remat)["key"] in keys
  sweep = {(e["dtype"], e["remat"], table.settings(e)["dwconv_used"]) for e in es
           if e["config"] == "configs/xl_256.py" and e["topology"] == "v5p-8"}
  assert sweep == {(d, r, w) for d in ("float32", "bfloat16") for r in ("none", "block", "dots")
                   for w in ("xla", "shift", "shift_vjp")}
  for variant in table.VARIANTS:
    for res in (256, 512):
      for topo in table.TOPOLOGIES:   # every config's own setting on every 8-chip slice
        assert any(table.is_default(e) for e in es
                   if e["config"] == f"configs/{variant}_{res}.py" and e["topology"] == topo)
  e = next(e for e in es if e["dwconv_impl"] == "shift" and e["remat"] == "none")
  cmd = table.command(e, "/tmp/r.json")
  assert "--programs=train" in cmd and "--batch=256" in cmd
  assert "--config.model.remat=none" in cmd and "--config.model.dwconv_impl=shift" in cmd
  for stem, layouts in table.LAYOUT_CANDIDATES.items():   # the other layout, where compared
    config = table.config_defaults(f"configs/{stem}.py")
    [other] = [p for p in layouts if p != config.sharding.params]
    rows = [e for e in es if e.get("params") == other and e["config"] == f"configs/{stem}.py"]
    assert [e["topology"] for e in rows] == list(table.LAYOUT_SLICES[stem])
    for e in rows:
      assert e["key"].endswith(f"|{config.model.remat}|None|{other}")   # others end at dwconv
      assert not table.is_default(e)
      cmd = table.command(e, "/tmp/r.json")
      assert f"--config.sharding.params={other}" in cmd
      assert f"--config.mesh.axes={config_base.PARAM_MESH_AXES[other]}" in cmd
  assert config_base.PARAM_MESH_AXES["replicated"] == (("data", -1), ("fsdp", 1))


def test_rows_saved_under_other_keys_are_found_by_their_program():
  """A row saved when the grid said 'the config's remat' (key ...|None|None), and a row
  saved with dwconv left to the config, are filed under the entry that compiles it; a row
  whose program no entry compiles (a dwconv default since changed) is kept, not shown."""
  es = table.entries()
  grid = next(e for e in es if e["key"] == "configs/l_512.py|v6e-8|256|bfloat16|block|None")
  old = dict(fake_row(grid), remat=None, key="configs/l_512.py|v6e-8|256|bfloat16|None|None")
  dots = next(e for e in es if e["key"] == "configs/xl_256.py|v5p-8|256|float32|dots|xla")
  sweep = dict(fake_row(dots), dwconv_impl=None,
               key="configs/xl_256.py|v5p-8|256|float32|dots|None")
  gone = dict(fake_row(grid), dwconv_used="shift", key="configs/l_512.py|v6e-8|x")
  rows = table.rekey({old["key"]: old, sweep["key"]: sweep, gone["key"]: gone})
  assert set(rows) == {grid["key"], dots["key"], gone["key"]}
  assert rows[grid["key"]]["remat"] == "block" and rows[dots["key"]]["dwconv_impl"] == "xla"
  text = table.render(rows)
  assert "Still missing" in text
  earlier = text.split("Rows of programs no entry compiles any more")[1]
  assert "| L/512 | v6e-8 | bf16 | block | shift | fsdp8 (fsdp) |" in earlier
  assert earlier.count("| L/512 |") == 1


def test_skips_done_rows_and_saves_each_new_one(tmp_path, monkeypatch):
  es = table.entries()
  results = tmp_path / "r.json"
  doc = tmp_path / "perf.md"
  doc.write_text("# Perf\n\nintro\n\n" + table.START + "\nold\n" + table.END + "\n\ntail\n")
  done = {e["key"]: fake_row(e) for e in es[1:]}
  results.write_text(json.dumps(done))
  ran = []

  def fake_run(e, timeout_s, log):
    ran.append(e["key"])
    return fake_row(e, hbm=8 * 2**30, fits=True)

  monkeypatch.setattr(table, "run_entry", fake_run)
  update(results, doc)
  assert ran == [es[0]["key"]]  # only the missing row
  saved = json.loads(results.read_text())
  assert saved[es[0]["key"]]["fits"] is True and len(saved) == len(es)
  text = doc.read_text()
  assert text.startswith("# Perf\n\nintro\n\n") and text.endswith("\n\ntail\n")
  assert "old" not in text and "Still missing" not in text
  assert ("| XL/512 | v5p-64 | bf16 | block **(default)** | xla | fsdp8 (fsdp) | 8.0 of 16.0 | "
          "yes | 500.0 |") \
      in text
  update(results, doc)
  assert len(ran) == 1  # a second sitting has nothing left to do


def test_render_lists_missing_rows_and_failures():
  es = table.entries()
  results = {es[0]["key"]: fake_row(es[0]), es[1]["key"]: dict(es[1], error="timed out")}
  text = table.render(results)
  assert f"Still missing ({len(es) - 2} of {len(es)} rows" in text
  assert "| **no** |" in text and "not compiled: timed out" in text
  assert "not measurements" in text


@pytest.mark.parametrize("retry, expected", [(False, 0), (True, 1)])
def test_failed_rows_are_retried_only_when_asked(tmp_path, monkeypatch, retry, expected):
  es = table.entries()
  results = tmp_path / "r.json"
  done = {e["key"]: fake_row(e) for e in es}
  done[es[3]["key"]] = dict(es[3], error="exit 2: boom")
  results.write_text(json.dumps(done))
  ran = []
  monkeypatch.setattr(table, "run_entry", lambda e, t, log: ran.append(e) or fake_row(e))
  update(results, tmp_path / "d.md", retry_errors=retry)
  assert len(ran) == expected


def test_rows_compiled_side_by_side_are_all_saved(tmp_path, monkeypatch):
  """--jobs 3: rows finish out of order in worker threads; every one lands in the JSON."""
  import threading
  import time as _time
  es = table.entries()
  results = tmp_path / "r.json"
  results.write_text(json.dumps({e["key"]: fake_row(e) for e in es[6:]}))
  running, peak, lock = [0], [0], threading.Lock()

  def fake_run(e, timeout_s, log):
    with lock:
      running[0] += 1
      peak[0] = max(peak[0], running[0])
    _time.sleep(0.05 * (6 - es.index(e)))  # the first submitted finishes last
    with lock:
      running[0] -= 1
    return fake_row(e, hbm=es.index(e) * 2**30, fits=True)

  monkeypatch.setattr(table, "run_entry", fake_run)
  update(results, tmp_path / "d.md", jobs=3)
  saved = json.loads(results.read_text())
  assert len(saved) == len(es) and peak[0] == 3
  assert [saved[e["key"]]["hbm_used_bytes"] for e in es[:6]] == [i * 2**30 for i in range(6)]
  assert "Still missing" not in (tmp_path / "d.md").read_text()


def test_two_sittings_on_disjoint_rows_share_the_file(tmp_path, monkeypatch):
  """--only=shift and --skip=shift at once: rows the other sitting saves after this one
  loaded the file are kept, not overwritten."""
  es = table.entries()
  results = tmp_path / "r.json"
  shift = [e for e in es if "shift" in e["key"]]
  rest = [e for e in es if "shift" not in e["key"]]
  results.write_text(json.dumps({e["key"]: fake_row(e) for e in es[2:-3]
                                 if "shift" not in e["key"]}))

  def fake_run(e, timeout_s, log):
    if e["key"] == shift[-1]["key"]:   # meanwhile, the other sitting finishes its rows
      update(results, tmp_path / "d.md", skip="shift")
    return fake_row(e)

  monkeypatch.setattr(table, "run_entry", fake_run)
  done = {e["key"]: fake_row(e) for e in shift[:-1]}
  saved = json.loads(results.read_text())
  results.write_text(json.dumps({**saved, **done}))
  update(results, tmp_path / "d.md", only="shift")
  saved = json.loads(results.read_text())
  assert set(saved) == {e["key"] for e in es}, set(e["key"] for e in es) - set(saved)
  assert len(rest) + len(shift) == len(es)
  assert "Still missing" not in (tmp_path / "d.md").read_text()


def test_a_row_compiled_under_an_old_default_is_compiled_again(tmp_path, monkeypatch):
  """S/512's grid row leaves dwconv to the config: compiled when it resolved otherwise,
  the row no longer matches and is compiled again."""
  es = table.entries()
  s512 = next(e for e in es if e["key"] == "configs/s_512.py|v5e-8|256|bfloat16|none|None")
  now = table.settings(s512)
  assert now == dict(remat_used="none", dwconv_used="xla", params_sharding="replicated")
  rows = {e["key"]: fake_row(e) for e in es}
  rows[s512["key"]]["dwconv_used"] = "shift_vjp"     # compiled when 'auto' meant that
  results = tmp_path / "r.json"
  results.write_text(json.dumps(rows))
  ran = []
  monkeypatch.setattr(table, "run_entry", lambda e, t, log: ran.append(e["key"]) or fake_row(e))
  update(results, tmp_path / "d.md")
  assert ran == [s512["key"]]
  saved = json.loads(results.read_text())
  assert saved[s512["key"]]["dwconv_used"] == "xla"
  assert saved[s512["key"] + "|superseded"]["dwconv_used"] == "shift_vjp"   # kept


def grid_rows(config, bounds, used):
  """Fake finished grid rows of one config: {remat: step bound}, {(remat, topo): HBM used}."""
  rows = {}
  for remat, bound in bounds.items():
    for topo in table.TOPOLOGIES:
      e = table.entry(config, topo, remat=remat)
      hbm = used.get((remat, topo), 0.5) * 16 * 2**30
      rows[e["key"]] = dict(fake_row(e, hbm=hbm, fits=hbm <= 16 * 2**30), step_s_bound=bound)
  return rows


def test_remat_choice_is_the_fastest_that_fits_everywhere_with_room():
  xl = "configs/xl_256.py"
  rows = grid_rows(xl, {"block": 0.067, "dots": 0.053}, {})
  assert table.choose_remat(xl, rows)["remat"] == "dots"
  rows = grid_rows(xl, {"block": 0.067, "dots": 0.053}, {("dots", "v5e-8"): 0.95})
  c = table.choose_remat(xl, rows)
  assert c["remat"] == "block" and "dots needs over 90% of HBM on v5e-8 (95%)" in c["why"]
  rows = grid_rows(xl, {"block": 0.0532, "dots": 0.053}, {("dots", "v5e-8"): 0.6,
                                                           ("block", "v5e-8"): 0.3})
  c = table.choose_remat(xl, rows)   # a 0.4% lower bound is a tie: less HBM wins
  assert c["remat"] == "block" and c["why"].startswith("block: step bound 53.2 ms")
  rows = grid_rows(xl, {"block": 0.067, "dots": 0.053}, {("dots", "v6e-8"): 0.92})
  assert table.choose_remat(xl, rows)["remat"] == "block"   # tight where it was compiled too
  s512 = "configs/s_512.py"
  bounds = {"none": 0.050, "dots": 0.051, "block": 0.065}
  rows = grid_rows(s512, bounds, {("none", "v5e-8"): 1.4})
  assert table.choose_remat(s512, rows)["remat"] == "dots"
  rows = grid_rows(s512, bounds, {})
  assert table.choose_remat(s512, rows)["remat"] == "none"
  del rows[table.entry(s512, "v6e-8", remat="dots")["key"]]   # only v5e-8 is needed
  assert table.choose_remat(s512, rows)["remat"] == "none"
  del rows[table.entry(s512, "v5e-8", remat="block")["key"]]
  assert table.choose_remat(s512, rows) == dict(remat=None, why="rows missing for block")
  rows = grid_rows(s512, bounds, {})
  del rows[table.entry(s512, "v6e-8", remat="block")["key"]]   # a row the table lists
  assert table.choose_remat(s512, rows)["remat"] is None


def layout_rows(config, bounds, used):
  """Fake finished rows of one config's layouts at its remat: {params: step bound},
  {(params, topo): HBM used as a fraction of 16 GiB}."""
  remat = table.config_defaults(config).model.remat
  rows = {}
  for params, bound in bounds.items():
    for topo in table.TOPOLOGIES:
      e = table.entry(config, topo, remat=remat, params=params)
      hbm = used.get((params, topo), 0.5) * 16 * 2**30
      row = dict(fake_row(e, hbm=hbm, fits=hbm <= 16 * 2**30), step_s_bound=bound,
                 params_sharding=params)
      rows[table.filed_key(e)] = row
  return rows


def test_layout_choice_is_the_fastest_that_fits_everywhere_ties_going_to_replicated():
  l256 = "configs/l_256.py"
  rows = layout_rows(l256, {"replicated": 0.061, "fsdp": 0.064}, {("fsdp", "v5e-8"): 0.2})
  c = table.choose_layout(l256, rows)
  assert c["params"] == "replicated" and c["why"].startswith("replicated: step bound 61.0 ms")
  # too tight on a slice the table lists for L/256 (not the one the bounds are read on)
  rows = layout_rows(l256, {"replicated": 0.061, "fsdp": 0.064}, {("replicated", "v6e-8"): 0.93})
  c = table.choose_layout(l256, rows)
  assert c["params"] == "fsdp" and "replicated needs over 90% of HBM on v6e-8 (93%)" in c["why"]
  # a tie on the bound goes to replicated even though it needs more HBM
  rows = layout_rows(l256, {"replicated": 0.0644, "fsdp": 0.064}, {("fsdp", "v5e-8"): 0.2})
  assert table.choose_layout(l256, rows)["params"] == "replicated"
  rows = layout_rows(l256, {"replicated": 0.070, "fsdp": 0.064}, {})
  assert table.choose_layout(l256, rows)["params"] == "fsdp"
  # L/256's other slices are listed: a missing one leaves the choice open
  del rows[table.filed_key(table.entry(l256, "v5p-8", remat=table.config_defaults(l256).model.remat,
                                 params="replicated"))]
  assert table.choose_layout(l256, rows) == dict(params=None, why="rows missing for replicated")
  b256 = "configs/b_256.py"   # B/256's FSDP rows exist on v5e-8 only: that is enough
  rows = {k: r for k, r in layout_rows(b256, {"replicated": 0.037, "fsdp": 0.055}, {}).items()
          if r["params_sharding"] == "replicated" or r["topology"] == "v5e-8"}
  assert table.choose_layout(b256, rows)["params"] == "replicated"
  assert table.choose_layout("configs/s_256.py", rows) is None   # not compared: size decides


def test_dwconv_choice_reads_the_sweep():
  es = [e for e in table.entries() if e["config"] == "configs/xl_256.py"
        and e["topology"] == "v5p-8"]
  rows = {}
  for e in es:
    dw = table.settings(e)["dwconv_used"]
    hbm = {"xla": 7, "shift": 9, "shift_vjp": 8}[dw] * 2**30
    rows[e["key"]] = dict(fake_row(e, hbm=hbm), step_s_bound={"xla": 1.0, "shift": 1.01,
                                                             "shift_vjp": 1.2}[dw])
  c = table.choose_dwconv(rows)
  assert c["dwconv"] == "xla" and "6 of 6" in c["why"] and "shift_vjp up to 1.200x" in c["why"]
  del rows[es[0]["key"]]
  assert table.choose_dwconv(rows)["dwconv"] is None


def test_configs_follow_the_committed_table():
  """configs/ against docs/tpu_preflight.json: each config's remat, and parameter layout
  where layouts are compared, is the table's choice (where its candidates' rows are in),
  and 'auto' on a TPU is the sweep's dwconv."""
  from fcdm_jax.models.layers import resolve_dwconv_impl
  results = table.load(REPO / table.RESULTS)
  dw = table.choose_dwconv(results)
  assert dw["dwconv"] == resolve_dwconv_impl("auto", backend="tpu"), dw["why"]
  decided = []
  for variant in table.VARIANTS:
    for res in (256, 512):
      config_file = f"configs/{variant}_{res}.py"
      config = table.config_defaults(config_file)
      c = table.choose_remat(config_file, results)
      if c["remat"] is not None:
        assert config.model.remat == c["remat"], (config_file, c)
        decided.append(config_file)
      layout = table.choose_layout(config_file, results)
      if layout is not None and layout["params"] is not None:
        assert config.sharding.params == layout["params"], (config_file, layout)
        assert config.mesh.axes == config_base.PARAM_MESH_AXES[layout["params"]]
        decided.append(f"{config_file} layout")
  # The committed table has every row: every config's remat and both layouts are decided.
  assert len(decided) == 2 * len(table.VARIANTS) + len(table.LAYOUT_CANDIDATES), decided


def test_a_config_without_candidates_gets_its_default_rows_and_no_choice(monkeypatch):
  """A config REMAT_CANDIDATES does not list: its default row on every slice, and the
  choice says there are no candidates (no KeyError), in the library and the rendered doc."""
  assert table.choose_remat("configs/t2i_s_256.py", {}) == dict(
      remat=None, why="the table lists no remat candidates for t2i_s_256 (REMAT_CANDIDATES "
      f"has {', '.join(sorted(table.REMAT_CANDIDATES))})")
  assert table.choose_layout("configs/t2i_s_256.py", {}) is None
  monkeypatch.setattr(table, "REMAT_CANDIDATES",
                      {k: v for k, v in table.REMAT_CANDIDATES.items() if k != "s_512"})
  rows = [e for e in table.entries() if e["config"] == "configs/s_512.py"]
  assert sorted(e["topology"] for e in rows) == sorted(table.TOPOLOGIES)
  assert all(table.is_default(e) for e in rows)
  assert "- S/512: remat **undecided** (the table lists no remat candidates for s_512" \
      in table.render({})


@pytest.mark.slow
def test_command_paths_are_relative_to_where_it_runs(tmp_path):
  """`--render --results=r.json --doc=d.md` in a folder with the configs: both files are
  that folder's (absl flags; nothing found through the package's location)."""
  (tmp_path / "configs").symlink_to(REPO / "configs")
  e = table.entries()[0]
  row = dict(e, date="2026-12-01", jax="0.10.2", **table.settings(e), mesh={"data": 1, "fsdp": 32},
             chips=32, hosts=8, hbm_bytes=95 * 2**30, compile_s=250.0, fits=True,
             margin_bytes=90 * 2**30, hbm_used_bytes=5 * 2**30, step_s_bound=0.5,
             binds="compute", img_per_s_bound=512.0, mfu_bound=0.7, compute_s=0.5, memory_s=0.2)
  (tmp_path / "r.json").write_text(json.dumps({e["key"]: row}))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "fcdm_jax.preflight_table", "--render",
                         "--results=r.json", "--doc", "d.md"], capture_output=True, text=True,
                        timeout=300, cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = (tmp_path / "d.md").read_text()
  assert table.START in text and "| XL/512 | v5p-64 | bf16 | block **(default)** |" in text
  assert f"Still missing ({len(table.entries()) - 1} of" in text
