"""Captions of a dataset as precomputed text embeddings: the format, its writer, and the
per-step draw a text-conditioned run trains on.

Why precomputed: the text encoder is frozen, so every caption (about 5 per COCO image) is
encoded once, and a training step only picks rows. Each example's captions are a range of
rows; at every step each example gets one of them, or the empty caption with probability
`dropout` (classifier-free guidance's unconditional half), drawn from (seed, step,
position in the global batch) as the flips are, so a resumed run and a run on any number
of hosts see the same captions.

Format (version 1), a folder (any path, local or gs://):

  captions.json     written last: a folder without it is unfinished and refused.
                    {"format": "fcdm_jax.captions", "version": 1, "num_examples": N,
                     "count": M, "dim": D, "dtype": "float32", "encoder": {...}}
  embeddings.npy    (M, D) pooled embeddings of the M captions
  offsets.npy       (N + 1,) int64: example i's captions are rows [offsets[i], offsets[i+1])
  empty.npy         (D,) the empty caption's embedding
  texts.json        the M captions, for previews and evaluation
"""

from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np

from fcdm_jax import fileio
from fcdm_jax.data.registry import source_spec

FORMAT = "fcdm_jax.captions"
VERSION = 1
MANIFEST = "captions.json"
SUBFOLDER = "captions"   # where a dataset keeps its caption folder, beside its data
_TAG_CAPTION = 3   # the data stream's tag for caption draws (pipeline.py holds 0-2)


def _save_npy(path: str, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  fileio.atomic_write_bytes(path, buf.getvalue())


def _load_npy(path: str) -> np.ndarray:
  return np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False)


def write_captions(out: str, captions: Sequence[Sequence[str]], encoder, *,
                   batch: int = 256, dtype: str = "float32", progress=None) -> dict:
  """Encodes `captions[i]` (the captions of example i, at least one each) with `encoder`
  (`models.text_encoder.TextEncoder`) into the folder `out`; returns the manifest."""
  if dtype not in ("float16", "float32"):
    raise ValueError(f"caption embedding dtype must be float16 or float32, got {dtype!r}")
  empty = [i for i, c in enumerate(captions) if not len(c)]
  if empty:
    raise ValueError(f"examples {empty[:8]} have no caption (every example needs one)")
  texts = [str(t) for c in captions for t in c]
  offsets = np.concatenate([[0], np.cumsum([len(c) for c in captions])]).astype(np.int64)
  # Each distinct caption is encoded once (a captioned dataset repeats many).
  unique = list(dict.fromkeys(texts))
  row = {t: i for i, t in enumerate(unique)}
  encoded = []
  for start in range(0, len(unique), batch):
    encoded.append(encoder.encode(unique[start:start + batch], batch=batch))
    if progress is not None:
      progress(min(start + batch, len(unique)), len(unique))
  embeddings = np.concatenate(encoded)[[row[t] for t in texts]].astype(dtype)
  _save_npy(fileio.join(out, "embeddings.npy"), embeddings)
  _save_npy(fileio.join(out, "offsets.npy"), offsets)
  _save_npy(fileio.join(out, "empty.npy"), encoder.empty().astype(np.float32))
  fileio.atomic_write_bytes(fileio.join(out, "texts.json"), json.dumps(texts).encode())
  manifest = {"format": FORMAT, "version": VERSION, "num_examples": len(captions),
              "count": len(texts), "dim": int(embeddings.shape[1]), "dtype": dtype,
              "encoder": dict(encoder.identity)}
  fileio.atomic_write_bytes(fileio.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
  return manifest


class CaptionTable:
  """A caption folder in memory, and the caption of every example at every step."""

  def __init__(self, path: str, *, num_examples: int | None = None, dim: int | None = None,
               dropout: float = 0.1):
    if not path:
      raise FileNotFoundError("no caption folder: a text-conditioned model trains on one "
                              "(config.data.captions, or <data.path>/captions as "
                              "fcdm_jax.extract_latents --text_encoder writes it)")
    manifest_path = fileio.join(path, MANIFEST)
    if not fileio.isfile(manifest_path):
      raise FileNotFoundError(f"{manifest_path} not found: {path} is not a finished caption "
                              "folder (config.data.captions; by default <data.path>/captions, "
                              "which extract_latents --text_encoder writes)")
    m = json.loads(fileio.read_text(manifest_path))
    if m.get("format") != FORMAT or m.get("version") != VERSION:
      raise ValueError(f"{manifest_path}: format {m.get('format')!r} version "
                       f"{m.get('version')!r}; this reader knows {FORMAT!r} {VERSION}")
    if num_examples is not None and m["num_examples"] != num_examples:
      raise ValueError(f"captions {path} are for {m['num_examples']} examples, the dataset has "
                       f"{num_examples}")
    if dim is not None and m["dim"] != dim:
      raise ValueError(f"captions {path} are {m['dim']}-dimensional embeddings, the model takes "
                       f"text_dim={dim} (config.model.text_dim)")
    if not 0.0 <= float(dropout) < 1.0:
      raise ValueError(f"caption dropout must be in [0, 1), got {dropout}")
    self.path, self.manifest, self.dropout = path, m, float(dropout)
    self.embeddings = _load_npy(fileio.join(path, "embeddings.npy")).astype(np.float32)
    self.offsets = _load_npy(fileio.join(path, "offsets.npy"))
    self.empty = _load_npy(fileio.join(path, "empty.npy")).astype(np.float32)
    if self.embeddings.shape != (m["count"], m["dim"]) or \
       self.offsets.shape != (m["num_examples"] + 1,) or self.empty.shape != (m["dim"],):
      raise ValueError(f"captions {path}: arrays of shapes {self.embeddings.shape}, "
                       f"{self.offsets.shape}, {self.empty.shape} do not match the manifest")
    self.dim = int(m["dim"])

  def texts(self) -> list[str]:
    return json.loads(fileio.read_text(fileio.join(self.path, "texts.json")))

  def rows(self, indices: np.ndarray, step: int, positions: np.ndarray, seed: Sequence[int],
           global_batch: int) -> np.ndarray:
    """Caption row of each example at `step` (-1: the empty caption), keyed by (seed, step,
    position in the global batch)."""
    rng = np.random.default_rng([*seed, _TAG_CAPTION, step])
    pick, drop = rng.random(global_batch), rng.random(global_batch)
    positions = np.asarray(positions)
    start, end = self.offsets[indices], self.offsets[np.asarray(indices) + 1]
    rows = start + np.floor(pick[positions] * (end - start)).astype(np.int64)
    return np.where(drop[positions] < self.dropout, -1, rows)

  def embed(self, rows: np.ndarray) -> np.ndarray:
    """(n, dim) float32 embeddings of caption rows (-1 = the empty caption)."""
    out = self.embeddings[np.maximum(rows, 0)]
    out[rows < 0] = self.empty
    return out


def caption_folder(config) -> str:
  """The caption folder a text-conditioned run trains on: `config.data.captions`, else the
  one its data keeps (`<data.path>/captions` for latents, as `extract_latents` writes it;
  the prepared folder's for the colour digits)."""
  data = config.data
  if data.get("captions"):
    return data.captions
  return source_spec(data.source).load().caption_folder(data)
