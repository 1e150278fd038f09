"""Recorded settings: what made an output is kept beside it, and a rerun with other
settings is refused (naming every difference) rather than mixed in or overwritten.

Used by the sampling CLI (`sample_settings.json`), latent extraction
(`extract_settings.json`), training resumes (the config saved with each checkpoint) and
the demo classifier's cache (`meta.json`'s recipe).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from fcdm_jax import fileio


def as_json(value) -> Any:
  """A ConfigDict / dict / tuple-holding value as it reads back from JSON, so that a value
  compares equal to its recorded self."""
  if hasattr(value, "to_json_best_effort"):
    return json.loads(value.to_json_best_effort())
  return json.loads(json.dumps(value, default=str))


def differences(saved: Mapping, now: Mapping, keys: Iterable[str] | None = None) -> dict:
  """{key: (saved value, value now)} of the keys (default: all) whose values differ."""
  keys = sorted(set(saved) | set(now)) if keys is None else list(keys)
  return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def refuse_changes(saved: Mapping, now: Mapping, what: str, advice: str,
                   keys: Iterable[str] | None = None) -> None:
  """ValueError "`what` (saved, now): {differences}; `advice`" unless nothing differs."""
  diff = differences(saved, now, keys)
  if diff:
    raise ValueError(f"{what} (saved, now): {diff}; {advice}")


def read(path: str) -> dict | None:
  """The settings recorded at `path`, or None when there are none."""
  if not fileio.exists(path):
    return None
  return json.loads(fileio.read_text(path))


def record(path: str, settings: Mapping) -> None:
  """Writes `settings` to `path` as JSON, atomically."""
  fileio.atomic_write_bytes(path, json.dumps(settings, indent=1, sort_keys=True).encode())
