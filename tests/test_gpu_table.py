"""The GPU table: its rows, what a row keeps of a --fit report, skipping what is done, saving
each row, rendering the doc, and the committed table's rows.

No compile here (the preflight is replaced): --fit itself is tests/test_gpu_preflight.py.
"""

import json
import pathlib
import shlex
import subprocess
import sys

import pytest

from fcdm_jax.perf import gpu_table as table
from fcdm_jax.perf import table_rows

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def fit_report(e, *, fits=True, accum=2, used=10 * 2**30, dwconv=table.DWCONV):
  """A --fit report as `perf.fit.run` writes it: a no-remat candidate at the full batch that
  did not fit, the chosen accumulation, a policy skipped."""
  per_gpu = e["batch"] // 4
  first = dict(remat="none", grad_accum_steps=1, compiled=True, micro_batch_per_device=per_gpu,
               memory_bytes=30 * 2**30, free_fraction=-0.6, fits=False, compute_s=0.2,
               memory_s=0.1, step_s_bound=0.2, binds="compute", compile_s=100.0)
  chosen = dict(first, grad_accum_steps=accum, micro_batch_per_device=per_gpu // accum,
                memory_bytes=used, fits=fits, step_s_bound=0.21, compile_s=90.0)
  skipped = dict(remat="block", grad_accum_steps=None, compiled=False, compute_s=0.27,
                 skipped="compute alone 270.00 ms >= best bound")
  return dict(date="2026-12-03 16:00:00 UTC", jax="0.10.2", config="fcdm", topology=e["topology"],
              device_kind="NVIDIA GeForce RTX 4090", devices=4, dtype="bfloat16",
              mesh={"data": 1, "fsdp": 4}, params_sharding="fsdp", dwconv_impl=dwconv,
              batch=e["batch"], headroom=0.1, memory_bytes=24 * 2**30,
              usable_bytes=18 * 2**30, unit="GPU", candidates=[first, chosen, skipped],
              choice=chosen if fits else None,
              overrides=(f"--config.batch_size={e['batch']} --config.grad_accum_steps={accum} "
                         "--config.model.remat=none") if fits else None,
              accumulation=True)


def test_rows_cover_the_issue():
  """Every config (S, B, L, XL x 256, 512) at batch 256, bf16, on 4x 4090, 8x A100 80 GB and
  8x H100, each a --fit preflight."""
  es = table.entries()
  assert len(es) == 24 and len({e["key"] for e in es}) == 24
  assert {(e["config"], e["topology"]) for e in es} == {
      (f"configs/{v}_{r}.py", t) for v in ("s", "b", "l", "xl") for r in (256, 512)
      for t in ("4x4090", "8xa100-80gb", "8xh100")}
  assert all(pathlib.Path(e["config"]).exists() for e in es)
  cmd = table.command(es[0], "/tmp/r.json")
  assert cmd[1:3] == ["-m", "fcdm_jax.preflight"] and "--fit" in cmd and "--batch=256" in cmd
  assert "--config.model.dtype=bfloat16" in cmd and "--json=/tmp/r.json" in cmd


def test_a_row_keeps_the_choice_and_what_it_cost():
  e = table.entry("configs/xl_256.py", "4x4090")
  row = table.summarize(e, fit_report(e))
  assert row["fits"] and row["remat_used"] == "none" and row["grad_accum_steps"] == 2
  assert row["micro_batch_per_device"] == 32 and row["used_bytes"] == 10 * 2**30
  assert row["compiled"] == 2 and row["compile_s"] == 190.0 and len(row["candidates"]) == 3
  line = table._row_line(e, row)
  assert line.startswith("| XL/256 | 4x4090 | none | 2 x 32 | 10.0 (18.0 of 24.0) | yes | "
                         f"210.0 | compute | 1219 | 2 | 190 | {table.DWCONV} |")
  text = table.render({e["key"]: row})
  assert ("`python -m fcdm_jax.main --config=configs/xl_256.py --config.model.dtype=bfloat16 "
          "--config.batch_size=256 --config.grad_accum_steps=2 --config.model.remat=none`") in text


def test_nothing_fits_shows_the_closest_candidate():
  e = table.entry("configs/xl_512.py", "4x4090")
  row = table.summarize(e, fit_report(e, fits=False, used=20 * 2**30))
  assert row["fits"] is False and row["used_bytes"] == 20 * 2**30
  assert "| **no** (closest shown) |" in table._row_line(e, row)
  assert "The paper's setting" not in table.render({e["key"]: row})


def test_skips_done_rows_and_saves_each_new_one(tmp_path, monkeypatch):
  es = table.entries()
  results, doc = tmp_path / "r.json", tmp_path / "perf.md"
  doc.write_text("# Perf\n\n" + table.START + "\nold\n" + table.END + "\n\ntail\n")
  results.write_text(json.dumps({e["key"]: table.summarize(e, fit_report(e)) for e in es[2:]}))
  ran = []

  def fake_run(e, command, summarize, timeout_s, log):
    ran.append(e["key"])
    return summarize(e, fit_report(e, accum=4))

  monkeypatch.setattr(table_rows, "run_preflight", fake_run)
  table.update(results, doc, log=lambda s: None)
  assert ran == [es[0]["key"], es[1]["key"]]   # only the missing rows, in order
  saved = json.loads(results.read_text())
  assert len(saved) == len(es) and saved[es[0]["key"]]["grad_accum_steps"] == 4
  text = doc.read_text()
  assert "old" not in text and text.endswith("\n\ntail\n") and "Still missing" not in text
  table.update(results, doc, log=lambda s: None)
  assert len(ran) == 2   # nothing left for a second sitting


def test_rows_of_an_older_dwconv_default_are_shown_and_compiled_again(tmp_path, monkeypatch):
  """The GPU default became shift_vjp (XLA's GPU compiler took hours over `shift`'s
  backward): rows made with `shift`, and failed rows that name none, are stale."""
  assert table.DWCONV == "shift_vjp"
  es = table.entries()
  results, doc = tmp_path / "r.json", tmp_path / "perf.md"
  doc.write_text(table.START + "\n" + table.END + "\n")
  rows = {e["key"]: table.summarize(e, fit_report(e)) for e in es}
  rows[es[3]["key"]] = table.summarize(es[3], fit_report(es[3], dwconv="shift"))
  rows[es[5]["key"]] = {k: v for k, v in es[5].items() if k != "dwconv"} | dict(
      error="timed out after 3000 s", date="2026-12-03")
  results.write_text(json.dumps(rows))
  text = table.render(rows)
  assert table._row_line(es[3], rows[es[3]["key"]]).endswith("| shift |")
  assert ("Made with an older default formulation (2 rows, compiled again by the next run): "
          f"S/512 on 4x4090; S/512 on 8xh100.") in text
  ran = []

  def fake_run(e, command, summarize, timeout_s, log):
    ran.append(e["key"])
    return summarize(e, fit_report(e))

  monkeypatch.setattr(table_rows, "run_preflight", fake_run)
  table.update(results, doc, log=lambda s: None)
  assert ran == [es[3]["key"], es[5]["key"]]
  assert "older default" not in doc.read_text()


def test_a_failed_preflight_is_a_row_with_its_error(tmp_path):
  """A preflight that writes no report (here: a config file that does not exist) becomes a
  row naming the failure, which the doc shows and a later sitting retries when asked."""
  e = dict(table.entry("configs/no_such.py", "4x4090"))
  row = table_rows.run_preflight(e, table.command, table.summarize, 300, log=lambda s: None)
  assert "error" in row and row["error"].startswith("exit 2")
  assert "not compiled: exit 2" in table._row_line(e, row)


@pytest.mark.slow
def test_command_renders_the_gpu_table(tmp_path):
  e = table.entries()[0]
  (tmp_path / "r.json").write_text(json.dumps({e["key"]: table.summarize(e, fit_report(e))}))
  proc = subprocess.run([sys.executable, "-m", "fcdm_jax.preflight_table", "--table=gpu",
                         "--render", f"--results={tmp_path / 'r.json'}",
                         f"--doc={tmp_path / 'd.md'}"], capture_output=True, text=True,
                        timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = (tmp_path / "d.md").read_text()
  assert "## GPU preflight table" in text and "| S/256 | 4x4090 | none | 2 x 32 |" in text
  assert f"Still missing ({len(table.entries()) - 1} of" in text


def test_committed_rows_feed_back_as_run_commands():
  """Every fitting row of the committed table records overrides a run takes."""
  rows = json.loads((REPO / table.RESULTS).read_text())
  assert rows, "the committed GPU table has no rows"
  for key, row in rows.items():
    assert key == table.entry(row["config"], row["topology"])["key"]
    if row.get("fits"):
      flags = shlex.split(row["overrides"])
      assert flags[0] == f"--config.batch_size={table.BATCH}"
      assert f"--config.model.remat={row['remat_used']}" in flags
      assert row["used_bytes"] <= (1 - row["headroom"]) * row["usable_bytes"]


def test_a_preflight_past_its_time_is_stopped_and_its_output_shown_as_it_comes():
  e = table.entry("configs/s_256.py", "4x4090")
  script = "import time; print('candidate 1', flush=True); time.sleep(60)"
  lines = []
  row = table_rows.run_preflight(e, lambda e, out: [sys.executable, "-c", script],
                                 table.summarize, 3, log=lines.append)
  assert row["error"] == "timed out after 3 s"
  assert lines == [f"  [{e['key']}] candidate 1"]
