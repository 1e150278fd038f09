"""What a sampling run spent, in network evaluations per image: the one record every output
gives (the sample command's log and `sample_settings.json`, previews, in-training
evaluation, `evaluate --workdir`, the demo judges, the sampler table), so that samplers are
compared by cost.

An evaluation of the network on an image's row counts 1; a guided one counts 2 (the doubled
batch, or the null rows inside the guidance interval). A sampler with a time grid costs what
`samplers.evaluations_per_image` computes from its grid, the same for every image
(`evaluations_counted: "time grid"`). Adaptive dopri5 counts its evaluations in its
compiled loop, per image (`"measured"`): the record gives their mean and maximum over the
images. A batch runs its while-loop until its slowest image is done, so the device spends
up to the batch's maximum on each of its images; the mean is what the images needed.
"""

from __future__ import annotations

import numpy as np

GRID = "time grid"
MEASURED = "measured"


def _number(value: float):
  return int(value) if float(value).is_integer() else round(float(value), 2)


def grid_record(evaluations: int) -> dict:
  """The record of a time-grid sampler, known before it runs."""
  return {"evaluations_per_image": int(evaluations), "evaluations_counted": GRID}


def record(counts, measured: bool) -> dict:
  """The record of the images whose evaluation counts are `counts` (one per image)."""
  counts = np.asarray(counts, np.float64)
  if counts.size == 0:
    raise ValueError("no images were sampled: there is no cost to record")
  out = {"evaluations_per_image": _number(counts.mean()),
         "evaluations_counted": MEASURED if measured else GRID}
  if measured:
    out["evaluations_per_image_max"] = _number(counts.max())
  return out


def describe(rec: dict | None) -> str:
  """The record for a log line: '40 network evaluations per image', or 'measured: mean 94.5,
  max 110 network evaluations per image'; for an adaptive sampler before it ran, 'network
  evaluations per image measured as it runs'."""
  if rec is None or rec.get("evaluations_per_image") is None:
    return "network evaluations per image measured as it runs"
  if rec.get("evaluations_counted") == MEASURED:
    return (f"measured: mean {rec['evaluations_per_image']}, max "
            f"{rec['evaluations_per_image_max']} network evaluations per image")
  return f"{rec['evaluations_per_image']} network evaluations per image"
