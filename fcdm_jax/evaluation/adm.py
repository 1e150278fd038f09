"""ADM's evaluation of images: FID, sFID, Inception Score, precision and recall.

A sample batch (ADM's `.npz`, read in slices) against a reference batch (its stored
mu/sigma and mu_s/sigma_s when it has them, as ADM's evaluator uses them, else its images'
features); reference statistics made from a dataset's images (centre-cropped as the
training data); and a training run's EMA weights sampled and scored in one go (the
FID-k evaluator run once). Features come from `models.inception` (ADM's preprocessing by
default) on all local devices; the metric math is `fcdm_jax.metrics`.
"""

from __future__ import annotations

import io
import sys
import zipfile
from concurrent import futures
from typing import Iterator, Sequence

import jax
import numpy as np
from tqdm import tqdm

from fcdm_jax import fileio, metrics, sharding
from fcdm_jax.data.image_sources import load_shard, open_source
from fcdm_jax.models import inception
from fcdm_jax.sampling.adm_npz import NpzImages

METRICS = ("fid", "sfid", "is", "pr")


class FeatureExtractor:
  """Inception features of image batches, the batch split over all local devices."""

  def __init__(self, model: inception.InceptionV3, variables, batch_size: int):
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = sharding.create_mesh(devices=devices)   # this host's devices: local batches
    self.data = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    self.variables = jax.device_put(variables, replicated)

    def features(v, images):
      out = model.apply(v, images)
      return out["pool"], out["spatial"], jax.nn.softmax(out["logits_unbiased"], axis=-1)

    self._fn = jax.jit(features, in_shardings=(replicated, self.data),
                       out_shardings=(self.data, self.data, self.data))

  def __call__(self, images: NpzImages | ArrayImages, desc: str, progress: bool = True
               ) -> dict[str, np.ndarray]:
    out = {"pool": [], "spatial": [], "probs": []}
    with tqdm(total=len(images), desc=desc, unit="img", file=sys.stderr,
              disable=not progress) as bar:
      for batch in images.batches(self.batch_size):
        n = len(batch)
        if n < self.batch_size:
          pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
          batch = np.concatenate([batch, pad])
        results = self._fn(self.variables, jax.device_put(batch, self.data))
        for name, r in zip(out, results):
          out[name].append(np.asarray(r)[:n])
        bar.update(n)
    return {k: np.concatenate(v) for k, v in out.items()}


def _given_statistics(ref: str, mu_key: str, sigma_key: str, dim: int):
  """(mu, sigma) stored in the reference batch, or None; checked against the feature size."""
  with fileio.open_read(ref) as fh, np.load(fh) as z:
    if mu_key not in z.files or sigma_key not in z.files:
      return None
    mu, sigma = z[mu_key], z[sigma_key]
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(f"{ref}: {mu_key} {mu.shape} / {sigma_key} {sigma.shape} do not match "
                     f"the Inception features of size {dim}")
  return mu, sigma


def evaluate(samples: str, ref: str, inception_path: str, batch_size: int = 256,
             which: Sequence[str] = METRICS, preprocess: str = "adm",
             split_size: int = 5000, pr_batch_size: int = 10000) -> dict:
  """Computes the requested metrics (see `METRICS`) of `samples` against `ref`."""
  unknown = set(which) - set(METRICS)
  if unknown:
    raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
  sample_images = NpzImages(samples)
  if not fileio.isfile(ref):
    raise FileNotFoundError(f"reference batch not found: {ref}")
  try:
    with fileio.open_read(ref) as fh, np.load(fh) as z:
      ref_keys = set(z.files)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{ref} is not an .npz reference batch: {e}") from e
  ref_images = NpzImages(ref) if "arr_0" in ref_keys else None
  if ref_images is not None and ref_images.image_size != sample_images.image_size:
    raise ValueError(f"sample images are {sample_images.image_size}, reference images "
                     f"{ref_images.image_size}: evaluate samples against the reference batch "
                     "of their resolution")
  if ref_images is None and "pr" in which:
    raise ValueError(f"{ref} has no 'arr_0' images, which precision/recall needs; "
                     "pass --metrics without pr to use its statistics only")
  # Before any features: a batch too small for a metric fails now, not after the work.
  _check_count(samples, len(sample_images), which, set())
  if ref_images is not None:
    _check_count(ref, len(ref_images), which, ref_keys)
  model, variables = inception.load_inception(inception_path, preprocess=preprocess)
  extract = FeatureExtractor(model, variables, batch_size)
  sample_feats = extract(sample_images, "sample features")
  ref_feats = extract(ref_images, "reference features") if ref_images is not None else None
  stats = reference_statistics(ref, ref_feats, [m for m in which if m in STATISTICS],
                               sample_feats["pool"].shape[1], sample_feats["spatial"].shape[1])
  results: dict = {"num_samples": len(sample_images),
                   "num_reference": len(ref_images) if ref_images is not None else None}
  results.update(sample_metrics(sample_feats, stats, which, split_size))
  if "pr" in which:
    results["precision"], results["recall"] = metrics.precision_recall(
        ref_feats["pool"], sample_feats["pool"], k=PR_K, batch_size=pr_batch_size)
  return results


# metric -> (feature, reference batch keys of its precomputed statistics)
STATISTICS = {"fid": ("pool", "mu", "sigma"), "sfid": ("spatial", "mu_s", "sigma_s")}
PR_K = 3   # precision/recall's k-NN radius: more than k images per side


def _check_count(path: str, count: int, which: Sequence[str], given_keys: set) -> None:
  """Refuses a batch with fewer images than a requested metric needs: a covariance needs
  2 (unless the batch gives the statistics), precision/recall's k-NN radius k + 1."""
  needs = {m: 2 for m in which if m in STATISTICS
           and not set(STATISTICS[m][1:]) <= given_keys}
  if "pr" in which:
    needs["pr"] = PR_K + 1
  short = sorted(m for m, n in needs.items() if count < n)
  if short:
    raise ValueError(f"{path} holds {count} image{'s' if count != 1 else ''}; "
                     f"{', '.join(short)} need at least {max(needs[m] for m in short)}: "
                     "evaluate a larger batch, or leave them out of --metrics")


def reference_statistics(ref: str, ref_feats: dict | None, which: Sequence[str],
                         pool_dim: int, spatial_dim: int) -> dict:
  """{metric: (mu, sigma)} of the reference for 'fid'/'sfid' in `which`: as stored in the
  batch when it has them (ADM), else from its images' features `ref_feats`."""
  dims = {"pool": pool_dim, "spatial": spatial_dim}
  stats = {}
  for name in which:
    feats_key, mu_key, sigma_key = STATISTICS[name]
    given = _given_statistics(ref, mu_key, sigma_key, dims[feats_key])
    if given is None:
      if ref_feats is None:
        raise ValueError(f"{ref} has neither '{mu_key}'/'{sigma_key}' nor 'arr_0' images "
                         f"to compute {name} from")
      given = metrics.fid_statistics(ref_feats[feats_key])
    stats[name] = given
  return stats


def sample_metrics(sample_feats: dict, stats: dict, which: Sequence[str],
                   split_size: int) -> dict:
  """Inception Score and the Frechet distances in `which` of the samples' features."""
  results = {}
  if "is" in which:
    results["inception_score"] = metrics.inception_score(sample_feats["probs"], split_size)
  for name in which:
    if name in STATISTICS:
      mu, sigma = metrics.fid_statistics(sample_feats[STATISTICS[name][0]])
      results[name] = metrics.frechet_distance(mu, sigma, *stats[name])
  return results


class ArrayImages:
  """In-memory uint8 RGB images as `FeatureExtractor` reads an `NpzImages` batch."""

  def __init__(self, images: np.ndarray):
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    self.images = images

  def __len__(self) -> int:
    return len(self.images)

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(self.images), batch_size):
      yield self.images[start:start + batch_size]


def make_reference(source: str, out: str, inception_path: str, *, resolution: int = 256,
                   split: str = "train", data_dir: str = "", image_key: str = "image",
                   batch_size: int = 256, shard_size: int = 1000, num_workers: int = 8,
                   preprocess: str = "adm", progress: bool = True) -> dict:
  """Writes the reference statistics (mu, sigma, mu_s, sigma_s) of a dataset's images,
  centre-cropped to `resolution` as `fcdm_jax.extract_latents` crops them, to `out`."""
  if not out:
    raise ValueError("--out is empty: name the .npz to write the reference statistics to")
  src = open_source(source, data_dir, split, image_key)
  model, variables = inception.load_inception(inception_path, preprocess=preprocess)
  extract = FeatureExtractor(model, variables, batch_size)
  pools, spatials, kept = [], [], 0
  with tqdm(total=src.num_examples, desc="reference features", unit="img", file=sys.stderr,
            disable=not progress) as bar, futures.ThreadPoolExecutor(num_workers) as pool:
    for start in range(0, src.num_examples, shard_size):
      end = min(start + shard_size, src.num_examples)
      shard = load_shard(src, start, end, resolution, pool)
      if len(shard.pixels):
        feats = extract(ArrayImages(shard.pixels), "reference features", progress=False)
        pools.append(feats["pool"])
        spatials.append(feats["spatial"])
        kept += len(shard.pixels)
      bar.update(end - start)
  if kept < 2:
    raise ValueError(f"{source}: {kept} decodable images; the statistics need at least 2")
  mu, sigma = metrics.fid_statistics(np.concatenate(pools))
  mu_s, sigma_s = metrics.fid_statistics(np.concatenate(spatials))
  buf = io.BytesIO()
  np.savez(buf, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  fileio.atomic_write_bytes(out, buf.getvalue())
  return {"out": out, "num_images": kept, "skipped": src.num_examples - kept,
          "source": source, "split": split, "resolution": resolution}
