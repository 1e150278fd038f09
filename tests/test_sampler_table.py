"""The README's sampler table (`fcdm_jax.demo.sampler_sweep`, `python -m
fcdm_jax.demo.sampler_table`) on a tiny untrained flow demo run with tiny counts: its rows,
their evaluations per image against the network's counted calls, resuming (rows already in
the file are not sampled again; a missing one is, alike), a file of other settings refused,
and the markdown table."""

import json
import os
import subprocess
import sys

import pytest

from fcdm_jax.demo import sampler_sweep

from helpers.network_calls import counted_rows, rows_since
from helpers.runs import make_workdir
from helpers.training import seed_classifier, tiny_demo_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8
TINY = dict(num_samples=N, steps=(3,), reference_steps=3, only=["dpmpp_2m"], batch_size=N)


def test_plan_covers_every_sampler_and_the_reference():
  rows = sampler_sweep.plan("flow", "sde")
  labels = {r["label"] for r in rows}
  assert labels == {"sde (euler)", "ode (euler)", "ode (heun)", "ode (dopri5)", "dpmpp_2m",
                    "unipc"}
  assert [r["steps"] for r in rows if r["label"] == "unipc"] == list(sampler_sweep.STEPS)
  assert [(r["label"], r["steps"]) for r in rows if r["reference"]] == [("sde (euler)", 250)]
  ddpm = sampler_sweep.plan("ddpm", "ddpm")
  assert {r["label"] for r in ddpm} == {"ddpm", "ddim", "dpmpp_2m", "unipc"}
  assert [(r["label"], r["steps"]) for r in ddpm if r["reference"]] == [("ddpm", 250)]
  with pytest.raises(ValueError, match=r"--samplers \['magic'\] are none of this run's"):
    sampler_sweep.plan("ddpm", "ddpm", only=["magic"])


def _row(label, steps, evals, distance, interval=False, reference=False):
  return dict(label=label, steps=steps, evaluations_per_image=evals, frechet_distance=distance,
              accuracy=1.0, sampling_seconds=1.0, reference=reference,
              guidance_interval=[0.5, 0.75] if interval else None)


def test_fewest_within_compares_each_half_to_its_own_reference():
  data = dict(settings=dict(objective="flow", step=1, num_samples=8, cfg_scale=4.0,
                            sigma_interval=[0.34, 1.02], guidance_interval=[0.5, 0.75]),
              rows=[_row("sde (euler)", 250, 500, 80.0, reference=True),
                    _row("sde (euler)", 250, 300, 10.0, interval=True, reference=True),
                    _row("unipc", 5, 10, 90.0), _row("unipc", 8, 16, 83.9),
                    _row("unipc", 10, 20, 70.0), _row("dpmpp_2m", 8, 16, 82.0),
                    _row("ddim", 5, 10, 84.1),
                    # With the interval: far below the other half's reference (80), but
                    # only 10.4 and below counts against its own (10.0).
                    _row("unipc", 5, 6, 12.0, interval=True),
                    _row("unipc", 10, 12, 10.4, interval=True)])
  without = sampler_sweep.fewest_within(data, interval=False)
  # Fewest evaluations first, ties by distance; ddim (84.1 > 84.0) never fits.
  assert [(k, r["steps"]) for k, r in without.items()] == [("dpmpp_2m", 8), ("unipc", 8)]
  within = sampler_sweep.fewest_within(data, interval=True)
  assert [(k, r["steps"]) for k, r in within.items()] == [("unipc", 10)]
  table = sampler_sweep.markdown(data)
  assert "Without the interval, fewest evaluations" in table
  assert "- dpmpp_2m: 16 (8 steps), distance 82.00" in table
  assert "- unipc: 12 (10 steps), distance 10.40" in table
  # No reference with the interval measured yet: that half has no note.
  data["rows"] = [r for r in data["rows"] if not (r["reference"] and r["guidance_interval"])]
  assert sampler_sweep.fewest_within(data, interval=True) == {}
  assert "With the interval, fewest" not in sampler_sweep.markdown(data)
  glance = sampler_sweep.grid(data).splitlines()
  assert glance[0] == ("| sampler | interval | 5 steps | 8 steps | 10 steps | 250 steps |")
  assert "| unipc | no | 90.0 / 10 | 83.9 / 16 | 70.0 / 20 |  |" in glance
  assert "| sde (euler) (reference) | no |  |  |  | 80.0 / 500 |" in glance
  assert "| unipc | yes | 12.0 / 6 |  | 10.4 / 12 |  |" in glance


@pytest.mark.slow
def test_rows_count_their_evaluations_and_resume(tmp_path, digit_classifier):
  workdir, _ = make_workdir(tmp_path / "run", tiny_demo_config("flow", seed=5))
  seed_classifier(digit_classifier, workdir)
  out = str(tmp_path / "table.json")
  ran = {}
  with counted_rows() as calls:
    def on_row(row):
      ran[sampler_sweep.row_key(row)] = rows_since(calls) / N

    data = sampler_sweep.sweep(workdir, out, on_row=on_row, **TINY)
    rows = {sampler_sweep.row_key(r): r for r in data["rows"]}
    # dpmpp_2m at 3 steps and the reference (SiT's Euler SDE at 3 grid points: 2 steps and
    # the last step), each without and with the interval.
    assert sorted(rows) == sorted([("dpmpp_2m", 3, False, False), ("dpmpp_2m", 3, False, True),
                                   ("sde (euler)", 3, True, False),
                                   ("sde (euler)", 3, True, True)])
    assert {k: r["evaluations_per_image"] for k, r in rows.items()} == ran
    assert rows["dpmpp_2m", 3, False, False]["evaluations_per_image"] == 6   # all guided
    assert 3 < rows["dpmpp_2m", 3, False, True]["evaluations_per_image"] < 6
    assert data["settings"]["guidance_interval"] == pytest.approx([1 / 2.02, 1 / 1.34],
                                                                  abs=1e-4)
    for r in rows.values():
      assert 0 <= r["accuracy"] <= 1 and r["frechet_distance"] > 0 and r["seconds"] > 0
    with open(out) as f:
      assert json.load(f) == data

    # Again: every row is there, nothing runs.
    again = sampler_sweep.sweep(workdir, out, on_row=on_row, **TINY)
    assert again == data and rows_since(calls) == 0
    # One row lost: only it is sampled again, to the same numbers.
    lost = ("dpmpp_2m", 3, False, True)
    data["rows"] = [r for r in data["rows"] if sampler_sweep.row_key(r) != lost]
    with open(out, "w") as f:
      json.dump(data, f)
    ran.clear()
    resumed = sampler_sweep.sweep(workdir, out, on_row=on_row, **TINY)
    assert list(ran) == [lost] and ran[lost] == rows[lost]["evaluations_per_image"]
    redone = {sampler_sweep.row_key(r): r for r in resumed["rows"]}[lost]
    for key in ("evaluations_per_image", "accuracy", "frechet_distance"):
      assert redone[key] == rows[lost][key], key

  with pytest.raises(ValueError, match="made with other settings.*num_samples"):
    sampler_sweep.sweep(workdir, out, **dict(TINY, num_samples=N + 2))

  table = sampler_sweep.markdown(resumed)
  assert table.count("\n| dpmpp_2m | 3 |") == 2 and table.count("(reference) | 3 |") == 2
  assert "Real digits: classifier accuracy" in table and "of the reference's Fréchet" in table

  # The command: every row done, it prints the table.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "fcdm_jax.demo.sampler_table",
                         f"--workdir={workdir}", f"--out={out}", f"--num_samples={N}",
                         "--steps=3", "--reference_steps=3", "--samplers=dpmpp_2m",
                         f"--batch_size={N}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert table in proc.stdout and sampler_sweep.grid(resumed) in proc.stdout


def test_readme_quotes_the_measured_tables():
  """The README's sampler tables are the committed measurements' (docs/sampler_table_*.json),
  as `grid` prints them."""
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  tables = sorted(n for n in os.listdir(os.path.join(REPO, "docs"))
                  if n.startswith("sampler_table_") and n.endswith(".json"))
  assert tables, "no measured sampler table in docs/"
  for name in tables:
    with open(os.path.join(REPO, "docs", name)) as f:
      data = json.load(f)
    assert sampler_sweep.grid(data) in readme, name
    with open(os.path.join(REPO, "docs", "sampler_tables.md")) as f:
      assert sampler_sweep.markdown(data) in f.read(), name
