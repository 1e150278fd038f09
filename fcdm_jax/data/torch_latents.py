"""Latents already extracted by the published PyTorch code, so its users keep their data.

The published `preparation/extract_features.py` (fast-DiT style) writes, per image,
  <features_path>/imagenet256_features/<rank>-<i>.npy   float32 (1, 4, H, W)  NCHW
  <features_path>/imagenet256_labels/<rank>-<i>.npy     int64   (1,)
(the folder names say 256 at every resolution). Each latent is ONE posterior sample
already multiplied by the VAE scale, of an image that was randomly mirrored at
extraction time; the published trainer uses them as they are. Its optional
`preparation/save_zarr.py` packs the same data into a zarr group with arrays
  latents  float32 (N, 4, H, W)   chunks of 1000
  labels   int64   (N,)
Both are read here as is (transposed to NHWC; config.data.vae_scale is not applied,
they are scaled already). config.data.random_flip mirrors the stored latent, which
only approximates the latent of the mirrored image; the published trainer does not
flip, so set random_flip=False to reproduce it exactly.

config.data.path is either the folder holding `*_features/` and `*_labels/`, or the
features folder itself (labels: config.data.labels_path, default the sibling folder
with `_labels` for `_features`). Features and labels are paired by file name.
The zarr source needs the optional `zarr` package.
"""

from __future__ import annotations

import io
import logging

import numpy as np

from fcdm_jax import fileio
from fcdm_jax.data import pipeline
from fcdm_jax.data.latents import read_npy_header


def _nchw_shape(shape, where: str) -> tuple[int, int, int]:
  """(C, H, W) of one stored latent: (C, H, W) or (1, C, H, W) as the extractor saved it."""
  shape = tuple(shape)
  if len(shape) == 4 and shape[0] == 1:
    shape = shape[1:]
  if len(shape) != 3:
    raise ValueError(f"{where}: a latent has shape {shape}; expected (C, H, W) or (1, C, H, W)")
  return shape


def _check(hwc, expected_shape, num_classes_config, labels, where):
  pipeline.check_element_shape(
      hwc, expected_shape, where,
      f"config.latent_size={expected_shape[0]}, config.model.in_channels={expected_shape[2]}")
  pipeline.check_labels(labels, num_classes_config, where)


def _load_npy(path) -> np.ndarray:
  """One .npy file, local or remote, never unpickled; a damaged one is named."""
  try:
    return np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False)
  except (ValueError, EOFError) as e:   # cut short, or not a .npy file
    raise ValueError(f"{path} is not a readable .npy file ({e}): damaged or cut short; "
                     "copy it again") from e


def _flip(x: np.ndarray, flips: np.ndarray) -> np.ndarray:
  x[flips] = x[flips, :, ::-1]
  return x


def resolve_feature_dirs(path: str, labels_path: str = ""):
  """(features dir, labels dir) from config.data.path / labels_path (see module docstring)."""
  root = pipeline.data_path(path, "features folder", "the published features folder "
                            "(holding imagenet256_features/ and imagenet256_labels/)")
  subdirs = sorted(p for p in root.glob("*_features") if p.is_dir())
  if subdirs:
    if len(subdirs) > 1:
      raise ValueError(f"{root} holds several feature folders {[p.name for p in subdirs]}; "
                       f"set config.data.path to one of them")
    features = subdirs[0]
  else:
    features = root
  if labels_path:
    labels = fileio.path(labels_path)
  elif features.name.endswith("_features"):
    labels = features.with_name(features.name[:-len("_features")] + "_labels")
  else:
    raise FileNotFoundError(f"cannot tell where the labels of {features} are: set "
                            f"config.data.labels_path")
  if not labels.is_dir():
    raise FileNotFoundError(f"labels folder {labels} does not exist")
  return features, labels


class TorchFeatureSource(pipeline.Source):
  """The published per-image .npy latents and labels (all labels are read up front)."""

  def __init__(self, path: str, *, labels_path: str, num_workers: int, expected_shape,
               num_classes: int, **kwargs):
    features_dir, labels_dir = resolve_feature_dirs(path, labels_path)
    names = sorted(p.name for p in features_dir.glob("*.npy"))
    label_names = sorted(p.name for p in labels_dir.glob("*.npy"))
    where = f"published features {features_dir}"
    if not names:
      raise FileNotFoundError(f"{features_dir} holds no .npy files")
    if names != label_names:
      only_f = sorted(set(names) - set(label_names))[:5]
      only_l = sorted(set(label_names) - set(names))[:5]
      raise ValueError(f"{where}: {len(names)} feature files but {len(label_names)} label files "
                       f"in {labels_dir} do not pair by name (features only: {only_f}, "
                       f"labels only: {only_l})")
    self.feature_files = [features_dir / n for n in names]
    self.num_workers = num_workers
    c, h, w = _nchw_shape(read_npy_header(self.feature_files[0])[0], where)
    # Every label up front: checked before any work, and then batches read features only.
    labels = pipeline.parallel_map(lambda n: _load_npy(labels_dir / n).reshape(-1),
                                   names, max(num_workers, 8))
    bad = [n for n, l in zip(names, labels) if l.size != 1]
    if bad:
      raise ValueError(f"{where}: label files {bad[:5]} do not hold exactly one label")
    self.labels = np.concatenate(labels).astype(np.int64)
    _check((h, w, c), expected_shape, num_classes, self.labels, where)
    super().__init__(element_shape=(h, w, c), num_classes=num_classes,
                     num_examples=len(names), description=where, **kwargs)

  @classmethod
  def from_config(cls, data, **common):
    return cls(data.path, labels_path=data.get("labels_path", ""),
               num_workers=int(data.get("num_workers", 4)), **common)

  def _read(self, i):
    x = _load_npy(self.feature_files[i])
    return np.transpose(x.reshape(x.shape[-3:]), (1, 2, 0))

  def _load(self, indices, flips):
    x = np.stack(pipeline.parallel_map(self._read, [int(i) for i in indices],
                                       self.num_workers)).astype(np.float32)
    return {"x": _flip(x, flips), "y": self.labels[indices]}


class TorchZarrSource(pipeline.Source):
  """The published zarr store: held in memory when it fits, else read chunk-wise per batch."""

  def __init__(self, path: str, *, max_in_memory_gb: float, expected_shape,
               num_classes: int, **kwargs):
    pipeline.data_path(path, "zarr store", "the published .zarr store")
    try:
      import zarr   # deferred: an optional dependency, for this source only
    except ImportError as e:
      raise ImportError("reading the published zarr store needs the optional `zarr` "
                        "package: pip install zarr") from e
    where = f"zarr store {path}"
    root = zarr.open(path, mode="r")
    missing = [k for k in ("latents", "labels") if k not in root]
    if missing:
      raise ValueError(f"{where} has no {missing} array(s); it has {sorted(root.keys())}")
    latents, labels = root["latents"], root["labels"]
    n = latents.shape[0]
    c, h, w = _nchw_shape(latents.shape[1:], where)
    if tuple(labels.shape) not in ((n,), (n, 1)):
      raise ValueError(f"{where}: labels have shape {labels.shape}, expected ({n},) to match "
                       f"{n} latents")
    self.labels = np.asarray(labels[...]).reshape(n).astype(np.int64)
    _check((h, w, c), expected_shape, num_classes, self.labels, where)
    self.chw = (c, h, w)
    nbytes = n * c * h * w * np.dtype(latents.dtype).itemsize
    if nbytes <= max_in_memory_gb * 1e9:
      logging.info("data: loading %s into memory (%.2f GB)", where, nbytes / 1e9)
      self.latents = np.asarray(latents[...]).reshape(n, c, h, w)
    else:
      logging.warning("data: %s is %.1f GB > max_in_memory_gb; reading it per batch, which "
                      "decompresses a whole chunk of %d latents for every example", where,
                      nbytes / 1e9, latents.chunks[0])
      self.latents = latents
    super().__init__(element_shape=(h, w, c), num_classes=num_classes, num_examples=n,
                     description=where, **kwargs)

  @classmethod
  def from_config(cls, data, **common):
    return cls(data.path, max_in_memory_gb=float(data.get("max_in_memory_gb", 8.0)), **common)

  def _load(self, indices, flips):
    if isinstance(self.latents, np.ndarray):
      x = self.latents[indices]
    else:
      uniq, inverse = np.unique(indices, return_inverse=True)
      x = np.asarray(self.latents.oindex[uniq]).reshape(len(uniq), *self.chw)[inverse]
    x = np.transpose(x, (0, 2, 3, 1)).astype(np.float32)
    return {"x": _flip(x, flips), "y": self.labels[indices]}
