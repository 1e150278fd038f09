"""Precomputed SD-VAE latents: the on-disk format, its writer and its reader.

Why this shape: training draws a *fresh* latent of every image each epoch,
`latent = (mean + std * eps) * vae_scale` with eps ~ N(0, I), from the VAE posterior,
and a random horizontal flip picks the posterior of the mirrored *image* (a mirrored
latent is not the latent of the mirrored image). So each example stores the posterior
mean and std of the image and of its mirror. Shards are written one at a time and
atomically so that a long extraction can be interrupted and resumed.

Format (version 1), a directory:

  manifest.json         written last by `LatentShardWriter.finalize`; a directory
                        without it is an unfinished extraction and is refused.
  shard-00000.npy       one NumPy .npy file per shard, a 1-D structured array of
  shard-00001.npy       `count` records, each
  ...                     'label'  int32                 class index in [0, num_classes)
                          'latent' dtype (2, 2, H, W, C)  [flip][stat] NHWC, where
                                   flip 0 = the image, 1 = its horizontal mirror,
                                   stat 0 = posterior mean, 1 = posterior std,
                                   both *unscaled* (before vae_scale).
                        Records have a fixed size, so one example is one seek and
                        one read (no memory maps: a dataset of thousands of shards
                        would otherwise hold thousands of file descriptors).
  shard-00000.json      per-shard facts written before the .npy is renamed into
                        place: {"count", "label_min", "label_max", "stats": {...}};
                        a shard is complete iff its .npy and .json both exist.

manifest.json:

  {"format": "fcdm_jax.latents", "version": 1,
   "count": N,                     total examples
   "shape": [H, W, C],             one latent, NHWC
   "dtype": "float16",             storage dtype of mean/std (float16 or float32)
   "vae_scale": 0.18215,           scale the latents are trained with
   "num_classes": 1000,
   "shards": [{"file": "shard-00000.npy", "count": 1000,
               "label_min": 0, "label_max": 999}, ...],
   "stats": {...},                 per-shard stats summed (e.g. skipped images)
   "metadata": {...}}              free-form (source, resolution, VAE, ...)

Writing, resumably and from many hosts at once (each writes its own shard indices):

  writer = LatentShardWriter(out, shape=(32, 32, 4), num_classes=1000)
  for i in range(num_shards):
    if writer.is_complete(i):
      continue                              # done by an earlier run
    writer.write_shard(i, mean, std, labels, stats={"skipped": k})
  writer.finalize(num_shards, metadata={...})  # one process, after all shards
"""

from __future__ import annotations

import json
import os
import io
from typing import Any, Mapping, Sequence

import numpy as np

from fcdm_jax import fileio
from fcdm_jax.data import pipeline

FORMAT = "fcdm_jax.latents"
VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = ("float16", "float32")


def record_dtype(shape: Sequence[int], dtype: str) -> np.dtype:
  """The structured dtype of one example (see the module docstring)."""
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"latent storage dtype {dtype!r} is not one of {STORAGE_DTYPES}")
  return np.dtype([("label", "<i4"), ("latent", np.dtype(dtype).newbyteorder("<"),
                                      (2, 2, *map(int, shape)))])


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.npy"


def _write_atomic(path, write) -> None:
  """`write(file_object)` through `fileio.atomic_write`: readers never see half a file."""
  def to_path(tmp):
    with open(tmp, "wb") as f:
      write(f)
  fileio.atomic_write(path, to_path)


def read_npy_header(path) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, data offset) of a .npy file, reading only its first bytes."""
  head = fileio.read_ranges([path], [0], [_HEADER_BYTES])[0]
  f = io.BytesIO(head)
  try:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
  except (ValueError, EOFError, SyntaxError) as e:
    raise ValueError(f"{path} is not a readable .npy file ({e}): damaged or cut short; copy "
                     "it again or extract it again") from e
  return shape, dtype, f.tell()


_HEADER_BYTES = 4096  # np.lib.format pads headers to 64 bytes; ours are ~150


class LatentShardWriter:
  """Writes the latent format shard by shard; safe to rerun on a partly written directory."""

  def __init__(self, directory: str | os.PathLike, *, shape: Sequence[int], num_classes: int,
               vae_scale: float = 0.18215, dtype: str = "float16"):
    if len(shape) != 3:
      raise ValueError(f"latent shape must be (H, W, C), got {tuple(shape)}")
    self.directory = fileio.path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.shape = tuple(int(d) for d in shape)
    self.num_classes = int(num_classes)
    self.vae_scale = float(vae_scale)
    self.dtype = dtype
    self.record = record_dtype(self.shape, dtype)

  def shard_path(self, index: int):
    return self.directory / shard_name(index)

  def is_complete(self, index: int) -> bool:
    """True when shard `index` was fully written (by any run) with this writer's layout."""
    npy, meta = self.shard_path(index), self.shard_path(index).with_suffix(".json")
    if not (npy.exists() and meta.exists()):
      return False
    shape, dtype, _ = read_npy_header(npy)
    info = json.loads(meta.read_text())
    return dtype == self.record and shape == (info["count"],)

  def write_shard(self, index: int, mean: np.ndarray, std: np.ndarray, labels: np.ndarray,
                  stats: Mapping[str, Any] | None = None, overwrite: bool = False) -> bool:
    """Write shard `index` atomically; returns False (and writes nothing) if already complete.

    mean, std: (n, 2, H, W, C) unscaled posterior mean and std, axis 1 = [image, mirror];
    labels: (n,) ints in [0, num_classes); stats: numbers summed into the manifest.
    """
    if index < 0:
      raise ValueError(f"shard index must be >= 0, got {index}")
    if not overwrite and self.is_complete(index):
      return False
    mean, std, labels = np.asarray(mean), np.asarray(std), np.asarray(labels)
    n = len(labels)
    want = (n, 2, *self.shape)
    for name, a in (("mean", mean), ("std", std)):
      if a.shape != want:
        raise ValueError(f"shard {index}: {name} has shape {a.shape}, expected {want} "
                         f"(n, [image, mirror], H, W, C)")
      if not np.all(np.isfinite(a)):
        raise ValueError(f"shard {index}: {name} has non-finite values")
    if np.any(std < 0):
      raise ValueError(f"shard {index}: std has negative values")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"shard {index}: labels must be integers of shape ({n},), got "
                       f"{labels.dtype} {labels.shape}")
    pipeline.check_labels(labels, self.num_classes, f"shard {index}")
    records = np.empty(n, self.record)
    records["label"] = labels
    records["latent"][:, :, 0] = mean
    records["latent"][:, :, 1] = std
    info = {"count": n,
            "label_min": int(labels.min()) if n else 0,
            "label_max": int(labels.max()) if n else -1,
            "stats": dict(stats or {})}
    npy = self.shard_path(index)
    # The .json first: a shard counts as complete only once its .npy is in place.
    _write_atomic(npy.with_suffix(".json"), lambda f: f.write(json.dumps(info).encode()))
    _write_atomic(npy, lambda f: np.lib.format.write_array(f, records, allow_pickle=False))
    return True

  def finalize(self, num_shards: int, metadata: Mapping[str, Any] | None = None) -> dict:
    """Check shards 0..num_shards-1 are complete and write manifest.json (atomically)."""
    missing = [i for i in range(num_shards) if not self.is_complete(i)]
    if missing:
      raise FileNotFoundError(f"{self.directory}: {len(missing)} of {num_shards} shards are "
                              f"missing or incomplete (first: {missing[:10]})")
    shards, totals = [], {}
    for i in range(num_shards):
      info = json.loads(self.shard_path(i).with_suffix(".json").read_text())
      shards.append({"file": shard_name(i), "count": info["count"],
                     "label_min": info["label_min"], "label_max": info["label_max"]})
      for k, v in info["stats"].items():
        if isinstance(v, (int, float)):
          totals[k] = totals.get(k, 0) + v
    manifest = {"format": FORMAT, "version": VERSION,
                "count": sum(s["count"] for s in shards), "shape": list(self.shape),
                "dtype": self.dtype, "vae_scale": self.vae_scale,
                "num_classes": self.num_classes, "shards": shards, "stats": totals,
                "metadata": dict(metadata or {})}
    _write_atomic(self.directory / MANIFEST,
                  lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
  """The manifest of a finished latent dataset, checked; clear errors otherwise."""
  directory = pipeline.data_path(directory, "latent dataset directory",
                                 "a latent dataset directory (written by fcdm_jax.extract_latents)")
  path = directory / MANIFEST
  if not path.exists():
    partial = sorted(directory.glob("shard-*.npy"))
    hint = (f" ({len(partial)} shards present: an unfinished extraction? rerun it to finish "
            f"and write the manifest)" if partial else "")
    raise FileNotFoundError(f"{path} not found: {directory} is not a latent dataset{hint}")
  try:
    manifest = json.loads(path.read_text())
  except ValueError as e:   # JSONDecodeError, or bytes that are not text
    raise ValueError(f"{path} is damaged (not JSON: {e}); copy the dataset again, or rerun "
                     "the extraction that wrote it, which rewrites its manifest") from e
  if not isinstance(manifest, dict):
    raise ValueError(f"{path} is damaged (a JSON {type(manifest).__name__}, not an object)")
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(f"{path}: format {manifest.get('format')!r} version "
                     f"{manifest.get('version')!r}; this reader knows {FORMAT!r} {VERSION}")
  return manifest


class LatentDataset:
  """Random access to the posterior (mean, std) of any example, for either flip."""

  def __init__(self, directory: str | os.PathLike):
    self.manifest = m = read_manifest(directory)
    self.directory = fileio.path(directory)
    self.shape = tuple(m["shape"])
    self.num_classes = int(m["num_classes"])
    self.vae_scale = float(m["vae_scale"])
    self.record = record_dtype(self.shape, m["dtype"])
    self.files, self.offsets, counts = [], [], []
    for s in m["shards"]:
      path = self.directory / s["file"]
      if not path.exists():
        raise FileNotFoundError(f"{path} is listed in the manifest but missing")
      shape, dtype, offset = read_npy_header(path)
      if dtype != self.record or shape != (s["count"],):
        raise ValueError(f"{path}: holds {shape} records of {dtype}, the manifest says "
                         f"{s['count']} of {self.record}")
      want, have = offset + s["count"] * self.record.itemsize, fileio.size(path)
      if have < want:
        raise ValueError(f"{path} is cut short: {have} bytes, its header says {s['count']} "
                         f"records, {want} bytes; copy it again or extract it again")
      self.files.append(path)
      self.offsets.append(offset)
      counts.append(s["count"])
    self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.count = int(self.starts[-1])
    if self.count != m["count"]:
      raise ValueError(f"{self.directory}: shards hold {self.count} examples, the manifest "
                       f"says {m['count']}")
    self.label_range = (min((s["label_min"] for s in m["shards"] if s["count"]), default=0),
                        max((s["label_max"] for s in m["shards"]), default=-1))

  def __len__(self):
    return self.count

  def read(self, indices: np.ndarray) -> np.ndarray:
    """The records (structured array) of `indices`, in that order."""
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.count):
      raise IndexError(f"example index out of range [0, {self.count})")
    shard = np.searchsorted(self.starts, indices, side="right") - 1
    size = self.record.itemsize
    starts = [self.offsets[s] + (i - self.starts[s]) * size for s, i in zip(shard, indices)]
    chunks = fileio.read_ranges([self.files[s] for s in shard], starts,
                                [a + size for a in starts])
    return np.frombuffer(bytearray(b"".join(chunks)), self.record, count=len(indices))


class LatentSource(pipeline.Source):
  """Training batches from our latent format: the posterior (mean, std) of each example's
  chosen flip, scaled; the training step draws a fresh sample of it on the device."""

  def __init__(self, path: str, *, vae_scale: float, expected_shape, num_classes: int,
               **kwargs):
    self.dataset = ds = LatentDataset(path)
    where = f"latent dataset {path}"
    pipeline.check_element_shape(
        ds.shape, expected_shape, where,
        f"config.latent_size={expected_shape[0]}, config.model.in_channels={expected_shape[2]}")
    pipeline.check_num_classes(ds.num_classes, num_classes, where)
    if ds.label_range[1] >= num_classes or ds.label_range[0] < 0:
      raise ValueError(f"{where}: labels span {list(ds.label_range)}, outside [0, {num_classes}) "
                       f"(config.model.num_classes = {num_classes})")
    if not np.isclose(ds.vae_scale, vae_scale, rtol=1e-6):
      raise ValueError(f"{where} was written for vae_scale {ds.vae_scale} but "
                       f"config.data.vae_scale is {vae_scale}; set --config.data.vae_scale="
                       f"{ds.vae_scale} if that is the VAE you sample with")
    self.vae_scale = float(vae_scale)
    super().__init__(element_shape=ds.shape, num_classes=ds.num_classes,
                     num_examples=len(ds), description=where, **kwargs)

  @classmethod
  def from_config(cls, data, **common):
    return cls(data.path, vae_scale=float(data.vae_scale), **common)

  def _load(self, indices, flips):
    rec = self.dataset.read(indices)
    pick = flips.astype(np.int64)
    stats = rec["latent"][np.arange(len(indices)), pick].astype(np.float32)  # (n, 2, H, W, C)
    scale = np.float32(self.vae_scale)
    return {"x": stats[:, 0] * scale, "x_std": stats[:, 1] * scale, "y": rec["label"]}
