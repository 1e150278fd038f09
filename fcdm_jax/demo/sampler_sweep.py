"""The README's sampler table: every sampler on a class demo checkpoint at a range of steps,
with and without a guidance interval, judged as the demo's end-of-run evaluation judges
(`digit_judge`: guided conditional accuracy and the classifier's Fréchet distance of
`num_samples` class-balanced samples from the run's seed), each row with its network
evaluations per image (`sampling.cost`) and wall time. `python -m fcdm_jax.demo.sampler_table`
is its command.

Rows. Every sampler the registry has for the run's objective (`samplers.names`), the SDE and
ODE with each method of `METHODS`, at each of `steps`; adaptive dopri5 once (its steps are
its own); and the reference, the FID protocol's sampler (the run's `config.sample.sampler`:
DDPM for the DDPM objective, SiT's Euler SDE for flow) at `reference_steps` (250). Each
with no interval and with the interval `sigma_interval` (EDM2's sigma in [0.34, 1.02] for
DiT), converted into the objective's time (`Objective.time_of_sigma`). The other sampler
settings are the run's evaluation settings (`sampler_settings(config, "eval")`: the demo's
guidance scale 4).

Resuming. Rows are written to `out` (JSON, atomically) as each finishes, and a rerun skips
the rows already there, so a long sweep can stop and go on; the settings every row shares
(run, checkpoint step, samples, seed, guidance scale, interval) are recorded with them and
a rerun with others is refused.

Wall time. `seconds` is the row's sampling, compilation included; `sampling_seconds` leaves
the first batch (which compiles) out, the other batches' time scaled to all samples (with
one batch, the same as `seconds`).
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
from absl import logging

from fcdm_jax import fileio, provenance, sampling, sharding
from fcdm_jax.demo import digit_judge
from fcdm_jax.diffusion import samplers
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.sampling import weights
from fcdm_jax.sampling.settings import sampler_settings

STEPS = (5, 8, 10, 15, 20, 25, 50)
REFERENCE_STEPS = 250
SIGMA_INTERVAL = (0.34, 1.02)   # EDM2's guidance interval for DiT-XL/2 (Kynkäänniemi et al.)
NUM_SAMPLES = 500
METHODS = {"sde": ("euler",), "ode": ("euler", "heun")}   # the step methods swept
ADAPTIVE = ("ode", "dopri5")    # swept once: its steps depend on the data
WITHIN = 0.05   # the table's notes: fewest evaluations within 5% of the reference's distance


def _label(sampler: str, method: str | None) -> str:
  return sampler if method is None else f"{sampler} ({method})"


def plan(objective: str, reference_sampler: str, steps=STEPS, reference_steps=REFERENCE_STEPS,
         only=None, reference: bool = True, adaptive: bool = True) -> list[dict]:
  """The rows' sampler settings (without the interval): {label, sampler, method, steps,
  reference}. `only`: labels to keep (None: all)."""
  rows = []
  for name in samplers.names(objective):
    for method in METHODS.get(name, (None,)):
      rows += [dict(label=_label(name, method), sampler=name, method=method, steps=int(n),
                    reference=False) for n in steps]
  if adaptive and ADAPTIVE[0] in samplers.names(objective):
    rows.append(dict(label=_label(*ADAPTIVE), sampler=ADAPTIVE[0], method=ADAPTIVE[1],
                     steps=None, reference=False))
  if reference:
    method = METHODS.get(reference_sampler, (None,))[0]
    rows.append(dict(label=_label(reference_sampler, method), sampler=reference_sampler,
                     method=method, steps=int(reference_steps), reference=True))
  if only is not None:
    known = sorted({r["label"] for r in rows})
    unknown = sorted(set(only) - set(known))
    if unknown:
      raise ValueError(f"--samplers {unknown} are none of this run's samplers {known}")
    rows = [r for r in rows if r["label"] in only or r["reference"]]
  return rows


def row_key(row: dict) -> tuple:
  return (row["label"], row["steps"], row["reference"], row["guidance_interval"] is not None)


def _read(out: str) -> dict | None:
  if fileio.isdir(out):
    raise ValueError(f"--out={out} is a folder; name a .json file")
  if not fileio.exists(out):
    return None
  try:
    data = json.loads(fileio.read_text(out))
  except ValueError as e:
    raise ValueError(f"{out} is not a sampler table (not JSON: {e}); use another --out") from e
  if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
    raise ValueError(f"{out} is not a sampler table (no 'rows'); use another --out")
  return data


def _write(out: str, data: dict) -> None:
  fileio.atomic_write_bytes(out, (json.dumps(data, indent=1) + "\n").encode())


def _sample(generator, config, params, labels, batch: int):
  """(uint8 images, non-finite count, seconds, steady-state seconds) of the row's samples."""
  start = time.time()
  stamps, parts = [], []
  for first, _, raw in generator.batches(params, config.seed, labels, batch):
    parts.append(raw)
    stamps.append((first + len(raw), time.time()))
  seconds = time.time() - start
  if len(stamps) > 1:
    (done0, t0), (done1, t1) = stamps[0], stamps[-1]
    steady = (t1 - t0) / (done1 - done0) * len(labels)
  else:
    steady = seconds
  samples = np.concatenate(parts)
  bad = int(np.sum(~np.isfinite(samples).all(axis=(1, 2, 3))))
  samples = np.nan_to_num(samples, nan=-1.0, posinf=1.0, neginf=-1.0)
  return sampling.to_uint8(samples), bad, seconds, steady


def sweep(workdir: str, out: str, *, step: int | None = None, num_samples: int = NUM_SAMPLES,
          steps=STEPS, reference_steps: int = REFERENCE_STEPS, only=None,
          reference: bool = True, adaptive: bool = True, sigma_interval=SIGMA_INTERVAL,
          batch_size: int = 100, on_row: Callable[[dict], None] | None = None) -> dict:
  """Samples and judges the rows `out` does not hold yet (see the module docstring);
  returns what `out` holds. `on_row(row)` is called after each new row is written."""
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
    raise ValueError(f"--num_samples must be an integer >= 2 (a Fréchet distance needs 2), "
                     f"got {num_samples!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"--batch_size must be a positive integer, got {batch_size!r}")
  for n in list(steps) + [reference_steps]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
      raise ValueError(f"--steps and --reference_steps must be integers >= 2, got {n!r}")
  lo, hi = (float(v) for v in sigma_interval)
  if not 0 < lo < hi:
    raise ValueError(f"--sigma_interval must be LOW,HIGH with 0 < LOW < HIGH, got "
                     f"{sigma_interval}")
  config, identity = weights.resolve_model(workdir, None, None, step)
  objective = make_objective(config)
  interval = tuple(round(float(t), 4) for t in sorted(objective.time_of_sigma([lo, hi])))
  base = sampler_settings(config, "eval")
  rows = plan(config.objective, config.sample.sampler, steps, reference_steps, only,
              reference, adaptive)
  settings = provenance.as_json(dict(
      workdir=identity["workdir"], step=identity["step"], objective=config.objective,
      num_samples=num_samples, seed=int(config.seed), cfg_scale=float(base["cfg_scale"]),
      sigma_interval=[lo, hi], guidance_interval=list(interval)))
  data = _read(out)
  if data is not None:
    provenance.refuse_changes(data.get("settings", {}), settings,
                              f"{out} holds sampler-table rows made with other settings",
                              "use another --out")
  else:
    fileio.check_output(out, overwrite=False, inputs=(workdir,))
    data = dict(settings=settings, rows=[])
  done = {row_key(r) for r in data["rows"]}
  todo = [dict(r, guidance_interval=g) for g in (None, list(interval)) for r in rows
          if row_key(dict(r, guidance_interval=g)) not in done]
  logging.info("sampler table: %d rows to sample, %d already in %s", len(todo),
               len(data["rows"]), out)
  if not todo:
    return data

  mesh = sharding.create_mesh(config)
  judge = digit_judge.load_or_train_classifier(workdir)
  if "real_digits" not in data:
    data["real_digits"] = judge.real_reference(num_samples)
  params = weights.load_model(config, identity, mesh)
  labels = digit_judge.balanced_labels(num_samples)
  for row in todo:
    chosen = dict(base, sampler=row["sampler"], cfg_interval=row["guidance_interval"])
    if row["method"] is not None:
      chosen["method"] = row["method"]
    if row["steps"] is not None:
      chosen["steps"] = row["steps"]
    generator = sampling.Generator(config, chosen, mesh)
    images, bad, seconds, steady = _sample(generator, config, params, labels, batch_size)
    score = judge.score(images, labels)
    result = dict(row, **generator.last_cost, accuracy=score["accuracy"],
                  frechet_distance=score["frechet_distance"], non_finite_samples=bad,
                  seconds=round(seconds, 2), sampling_seconds=round(steady, 2))
    data["rows"].append(provenance.as_json(result))
    _write(out, data)
    if on_row is not None:
      on_row(result)
  return data


def _order(data: dict):
  """Rows in table order: without the interval first; the reference last of each half."""
  labels = []
  for row in data["rows"]:
    if row["label"] not in labels and not row["reference"]:
      labels.append(row["label"])
  rank = lambda r: (r["guidance_interval"] is not None, r["reference"],
                    labels.index(r["label"]) if r["label"] in labels else len(labels),
                    r["steps"] if r["steps"] is not None else float("inf"))
  return sorted(data["rows"], key=rank)


def _reference(data: dict, interval: bool) -> dict | None:
  refs = [r for r in data["rows"]
          if r["reference"] and (r["guidance_interval"] is not None) == interval]
  return refs[0] if refs else None


def fewest_within(data: dict, interval: bool, within: float = WITHIN) -> dict[str, dict]:
  """For each sampler (table label), its row with the fewest evaluations per image whose
  Fréchet distance is within `within` of the reference's, both with the guidance interval
  (`interval` True) or both without: {label: row}, ordered by evaluations (then distance);
  samplers with no such row are left out, and so is everything when that reference is not
  measured yet. The two halves are compared apart because the interval changes what the
  samples are, not only what they cost."""
  ref = _reference(data, interval)
  if ref is None:
    return {}
  bound = ref["frechet_distance"] * (1 + within)
  best = {}
  for r in data["rows"]:
    if (r["reference"] or (r["guidance_interval"] is not None) != interval
        or r["frechet_distance"] > bound):
      continue
    key = (r["evaluations_per_image"], r["frechet_distance"])
    if r["label"] not in best or key < (best[r["label"]]["evaluations_per_image"],
                                        best[r["label"]]["frechet_distance"]):
      best[r["label"]] = r
  return dict(sorted(best.items(), key=lambda kv: (kv[1]["evaluations_per_image"],
                                                   kv[1]["frechet_distance"])))


def markdown(data: dict) -> str:
  """The table as markdown, with the real digits' floor and the note on the fewest
  evaluations within 5% of the reference's Fréchet distance."""
  s = data["settings"]
  lines = [f"{s['objective']} objective, checkpoint step {s['step']}, {s['num_samples']} "
           f"class-balanced samples, guidance scale {s['cfg_scale']:g}, interval "
           f"sigma in [{s['sigma_interval'][0]:g}, {s['sigma_interval'][1]:g}] = "
           f"t in [{s['guidance_interval'][0]:g}, {s['guidance_interval'][1]:g}].", "",
           "| sampler | steps | guidance interval | evaluations / image | accuracy | "
           "Fréchet distance | seconds |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
  for r in _order(data):
    evals = r["evaluations_per_image"]
    if r.get("evaluations_counted") == "measured":
      evals = f"{evals} (measured, max {r['evaluations_per_image_max']})"
    lines.append(f"| {r['label']}{' (reference)' if r['reference'] else ''} | "
                 f"{r['steps'] if r['steps'] is not None else 'adaptive'} | "
                 f"{'yes' if r['guidance_interval'] is not None else 'no'} | {evals} | "
                 f"{r['accuracy']:.3f} | {r['frechet_distance']:.2f} | "
                 f"{r['sampling_seconds']:.1f} |")
  real = data.get("real_digits")
  if real:
    lines += ["", f"Real digits: classifier accuracy {real['classifier_test_accuracy']:.3f}, "
              f"Fréchet distance {real['frechet_distance_train_vs_test']:.2f} "
              f"({real['frechet_distance_num_train_images']} train vs the test images)."]
  for interval in (False, True):
    ref = _reference(data, interval)
    if ref is None:
      continue
    half = "With the interval" if interval else "Without the interval"
    head = (f"{half}, fewest evaluations per image within {WITHIN:.0%} of the reference's "
            f"Fréchet distance ({ref['frechet_distance']:.2f} at "
            f"{ref['evaluations_per_image']} evaluations per image)")
    best = fewest_within(data, interval)
    if not best:
      lines += ["", f"{head}: no sampler."]
      continue
    lines += ["", f"{head}:"] + [
        f"- {label}: {r['evaluations_per_image']} ({r['steps'] or 'adaptive'} steps), "
        f"distance {r['frechet_distance']:.2f}" for label, r in best.items()]
  return "\n".join(lines)


def grid(data: dict) -> str:
  """The table at a glance (the README's form): one line per sampler and half, one column
  per step count, each cell 'Fréchet distance / evaluations per image'; the reference on
  its own line, adaptive samplers in an 'adaptive' column. Accuracy and wall time are in
  `markdown`'s table."""
  rows = _order(data)
  counts = sorted({r["steps"] for r in rows if r["steps"] is not None})
  adaptive = any(r["steps"] is None for r in rows)
  columns = [str(n) for n in counts] + (["adaptive"] if adaptive else [])
  lines, cells = [], {}
  for r in rows:
    line = (f"{r['label']}{' (reference)' if r['reference'] else ''}",
            "yes" if r["guidance_interval"] is not None else "no")
    if line not in cells:
      lines.append(line)
      cells[line] = {}
    column = "adaptive" if r["steps"] is None else str(r["steps"])
    cells[line][column] = f"{r['frechet_distance']:.1f} / {r['evaluations_per_image']}"
  out = ["| sampler | interval | " + " | ".join(f"{c} steps" if c != "adaptive" else c
                                               for c in columns) + " |",
         "| --- | --- |" + " ---: |" * len(columns)]
  for line in lines:
    out.append(f"| {line[0]} | {line[1]} | "
               + " | ".join(cells[line].get(c, "") for c in columns) + " |")
  return "\n".join(out)
