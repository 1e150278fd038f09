"""ADM-compatible evaluation of a sample batch: FID, sFID, Inception Score, precision, recall.

    python -m fcdm_jax.evaluate --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
        --inception=pt_inception-2015-12-05-6726825d.pth [--batch_size=256] [--out=metrics.json]

Batches are ADM's `.npz` format: `arr_0` uint8 NHWC RGB images, read in slices so that
50k images at 512 px need not fit in memory. The reference batch's `arr_0` gives the
reference features for precision/recall (and the statistics when it carries none); its
`mu`/`sigma` (pool3) and `mu_s`/`sigma_s` (spatial) are used as given when present, as
ADM's evaluator does. Features come from `fcdm_jax.models.inception` (ADM's preprocessing
by default) on all local devices; the metric math is `fcdm_jax.metrics`.
"""

from __future__ import annotations

import json
import sys
import zipfile
from typing import Iterator, Sequence

import jax
import numpy as np

from fcdm_jax import fileio, metrics
from fcdm_jax.adm_npz import NpzImages
from fcdm_jax.models import inception
from fcdm_jax.train import sharding

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
    from tqdm import tqdm
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
        ref_feats["pool"], sample_feats["pool"], batch_size=pr_batch_size)
  return results


# metric -> (feature, reference batch keys of its precomputed statistics)
STATISTICS = {"fid": ("pool", "mu", "sigma"), "sfid": ("spatial", "mu_s", "sigma_s")}


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


_LABELS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
           ("precision", "Precision"), ("recall", "Recall"))


def _define_flags():
  from absl import flags
  flags.DEFINE_string("samples", None, "Sample batch .npz (ADM format: arr_0 uint8 NHWC).",
                      required=True)
  flags.DEFINE_string("ref", None, "Reference batch .npz: arr_0 images and/or precomputed "
                      "mu/sigma (and mu_s/sigma_s), e.g. ADM's VIRTUAL_imagenet256_labeled.npz.",
                      required=True)
  flags.DEFINE_string("inception", None, "pytorch-fid's FID Inception weights, "
                      "pt_inception-2015-12-05-6726825d.pth (no download happens).",
                      required=True)
  flags.DEFINE_integer("batch_size", 256, "Images per Inception step over all local devices "
                       "(rounded up to a multiple of the device count).")
  flags.DEFINE_string("out", None, "Also write the results to this JSON file.")
  flags.DEFINE_list("metrics", list(METRICS), f"Which metrics to compute, from {METRICS}.")
  flags.DEFINE_enum("preprocess", "adm", list(inception.PREPROCESSING),
                    "Resize/scaling before Inception: 'adm' = ADM's TF graph (legacy TF "
                    "bilinear resize, (x-128)/128), 'pytorch_fid' = pytorch-fid's.")
  flags.DEFINE_integer("split_size", 5000, "Inception Score chunk size (ADM: 5000).")
  flags.DEFINE_integer("pr_batch_size", 10000, "Rows per distance block for precision/recall.")
  return flags.FLAGS


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  try:
    results = evaluate(f.samples, f.ref, f.inception, batch_size=f.batch_size,
                       which=f.metrics, preprocess=f.preprocess, split_size=f.split_size,
                       pr_batch_size=f.pr_batch_size)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  for key, label in _LABELS:
    if key in results:
      print(f"{label}: {results[key]}")
  if f.out:
    fileio.atomic_write_bytes(f.out, (json.dumps(results, indent=2) + "\n").encode())


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
