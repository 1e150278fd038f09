"""ADM-compatible evaluation of a sample batch: FID, sFID, Inception Score, precision, recall.

    python -m fcdm_jax.evaluate --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
        --inception=pt_inception-2015-12-05-6726825d.pth [--batch_size=256] [--out=metrics.json]

Batches are ADM's `.npz` format: `arr_0` uint8 NHWC RGB images, read in slices so that
50k images at 512 px need not fit in memory. The reference batch's `arr_0` gives the
reference features for precision/recall (and the statistics when it carries none); its
`mu`/`sigma` (pool3) and `mu_s`/`sigma_s` (spatial) are used as given when present, as
ADM's evaluator does. Features come from `fcdm_jax.models.inception` (ADM's preprocessing
by default) on all local devices; the metric math is `fcdm_jax.metrics`.

Two more modes. A training run, sampled and scored in one go (FID-k of its EMA weights;
for a text model each sample conditioned on a random caption of --captions, plus the CLIP
score with --clip; the MS-COCO FID-30K protocol with val2014's captions and reference):

    python -m fcdm_jax.evaluate --workdir=runs/t2i_xl --num_samples=30000 \
        --captions=/data/latents/coco256_val/captions --ref=coco_val2014_256.npz \
        --inception=pt_inception-2015-12-05-6726825d.pth --vae=/models/sd-vae-ft-ema \
        [--clip=/models/clip-vit-large-patch14] [--out=metrics.json]

A reference batch made from images (ADM's centre crop, as the training data; the
statistics only: mu/sigma and mu_s/sigma_s), e.g. MS-COCO val2014 at 256 px:

    python -m fcdm_jax.evaluate --reference_from=coco:/data/coco --split=val2014 \
        --resolution=256 --inception=pt_inception-2015-12-05-6726825d.pth \
        --out=coco_val2014_256.npz
"""

from __future__ import annotations

import json
import sys
import zipfile
from typing import Iterator, Sequence

import jax
import numpy as np

from fcdm_jax import fileio, metrics
from fcdm_jax.sampling.adm_npz import NpzImages
from fcdm_jax.models import inception
from fcdm_jax import sharding

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


def evaluate_run(workdir: str, ref: str, inception_path: str, num_samples: int, *,
                 batch_size: int = 256, step: int | None = None, captions: str = "",
                 clip: str = "", vae: str = "", progress: bool = True, **sampler) -> dict:
  """FID, sFID, IS (and the CLIP score) of `num_samples` samples of a run's EMA weights:
  `evaluation.fid_eval.FidEvaluator`, the training hook, run once. `sampler`: sampler,
  steps, cfg_scale overrides of the run's preview/eval settings (None = keep)."""
  from clu import metric_writers
  from fcdm_jax import sample as sample_lib
  from fcdm_jax.evaluation.fid_eval import FidEvaluator
  config, identity = sample_lib.resolve_model(workdir, None, None, step)
  with config.unlocked():
    config.eval.update(num_samples=int(num_samples), batch_size=int(batch_size),
                       inception=inception_path, reference=ref, captions=captions, clip=clip)
    config.eval.update({k: v for k, v in sampler.items() if v is not None})
    if vae:
      config.preview.vae_dir = vae
  mesh = sharding.create_mesh(config)
  evaluator = FidEvaluator(config, mesh)
  params = sample_lib.load_model(config, identity, mesh)
  from tqdm import tqdm
  with tqdm(total=int(num_samples), desc="sampling + features", unit="img", file=sys.stderr,
            disable=not progress or jax.process_index() != 0) as bar:
    results = evaluator(identity["step"], params, metric_writers.LoggingWriter(),
                        progress=lambda done, total: bar.update(done - bar.n))
  return dict(results, workdir=identity["workdir"], captions=captions or None)


def make_reference(source: str, out: str, inception_path: str, *, resolution: int = 256,
                   split: str = "train", data_dir: str = "", image_key: str = "image",
                   batch_size: int = 256, shard_size: int = 1000, num_workers: int = 8,
                   preprocess: str = "adm", progress: bool = True) -> dict:
  """Writes the reference statistics (mu, sigma, mu_s, sigma_s) of a dataset's images,
  centre-cropped to `resolution` as `fcdm_jax.extract_latents` crops them, to `out`."""
  import io
  from concurrent import futures
  from fcdm_jax.extract_latents import load_shard, open_source
  if not out:
    raise ValueError("--out is empty: name the .npz to write the reference statistics to")
  src = open_source(source, data_dir, split, image_key)
  model, variables = inception.load_inception(inception_path, preprocess=preprocess)
  extract = FeatureExtractor(model, variables, batch_size)
  pools, spatials, kept = [], [], 0
  from tqdm import tqdm
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


_LABELS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
           ("precision", "Precision"), ("recall", "Recall"), ("clip_score", "CLIP score"))


def _define_flags():
  from absl import flags
  flags.DEFINE_string("samples", None, "Sample batch .npz (ADM format: arr_0 uint8 NHWC).")
  flags.DEFINE_string("workdir", None, "Instead of --samples: a training run, whose EMA "
                      "weights are sampled (--num_samples) and scored here.")
  flags.DEFINE_string("reference_from", None, "Instead of --samples: write the reference "
                      "statistics of a dataset's images to --out: folder:PATH, coco:ROOT "
                      "(with --split=val2014) or tfds:NAME (with --data_dir, --split).")
  flags.DEFINE_string("ref", None, "Reference batch .npz: arr_0 images and/or precomputed "
                      "mu/sigma (and mu_s/sigma_s), e.g. ADM's VIRTUAL_imagenet256_labeled.npz "
                      "or one written by --reference_from.")
  flags.DEFINE_string("inception", None, "pytorch-fid's FID Inception weights, "
                      "pt_inception-2015-12-05-6726825d.pth (no download happens).",
                      required=True)
  flags.DEFINE_integer("batch_size", 256, "Images per Inception step over all local devices "
                       "(rounded up to a multiple of the device count); with --workdir also "
                       "samples per sampling step.")
  flags.DEFINE_string("out", None, "Also write the results to this JSON file (with "
                      "--reference_from: the .npz to write). An existing file is refused "
                      "unless --overwrite; it may never be one of the inputs.")
  flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
  flags.DEFINE_list("metrics", list(METRICS), f"Which metrics to compute, from {METRICS} "
                    "(--samples mode; --workdir computes fid, sfid, is).")
  flags.DEFINE_enum("preprocess", "adm", list(inception.PREPROCESSING),
                    "Resize/scaling before Inception: 'adm' = ADM's TF graph (legacy TF "
                    "bilinear resize, (x-128)/128), 'pytorch_fid' = pytorch-fid's.")
  flags.DEFINE_integer("split_size", 5000, "Inception Score chunk size (ADM: 5000).")
  flags.DEFINE_integer("pr_batch_size", 10000, "Rows per distance block for precision/recall.")
  # --workdir
  flags.DEFINE_integer("num_samples", 30000, "--workdir: samples to draw (MS-COCO: 30000).")
  flags.DEFINE_integer("step", None, "--workdir: the checkpoint step (default: the latest).")
  flags.DEFINE_string("captions", "", "--workdir, text models: the caption folder whose "
                      "captions condition the samples (MS-COCO: val2014's, written by "
                      "extract_latents --text_encoder); default: the run's own.")
  flags.DEFINE_string("clip", "", "--workdir, text models: a whole CLIP model folder "
                      "(e.g. clip-vit-large-patch14): also the mean CLIP score.")
  flags.DEFINE_string("vae", "", "--workdir, latent models: the SD-VAE that decodes the "
                      "samples (default: the run's config.preview.vae_dir).")
  flags.DEFINE_string("sampler", None, "--workdir: sampler override (default: the run's "
                      "eval/preview sampler).")
  flags.DEFINE_integer("steps", None, "--workdir: sampling steps override.")
  flags.DEFINE_float("cfg_scale", None, "--workdir: guidance scale override.")
  # --reference_from
  flags.DEFINE_integer("resolution", 256, "--reference_from: ADM centre-crop size.")
  flags.DEFINE_string("split", "train", "--reference_from: the split (coco: val2014).")
  flags.DEFINE_string("data_dir", "", "--reference_from tfds: TFDS data_dir.")
  return flags.FLAGS


def _run(f) -> dict:
  modes = [m for m in ("samples", "workdir", "reference_from") if getattr(f, m)]
  if len(modes) != 1:
    raise ValueError("pass exactly one of --samples (a sample batch), --workdir (a run to "
                     "sample and score) and --reference_from (images to make a reference of)")
  if f.out:   # before any work: never over an input, never over a file unasked
    fileio.check_output(f.out, overwrite=f.overwrite,
                        inputs=(f.samples, f.ref, f.inception, f.captions, f.vae, f.clip))
  if f.reference_from:
    return make_reference(f.reference_from, f.out, f.inception, resolution=f.resolution,
                          split=f.split, data_dir=f.data_dir, batch_size=f.batch_size,
                          preprocess=f.preprocess)
  if not f.ref:
    raise ValueError("--ref is required: the reference batch .npz to compare against")
  if f.workdir:
    return evaluate_run(f.workdir, f.ref, f.inception, f.num_samples,
                        batch_size=f.batch_size, step=f.step, captions=f.captions,
                        clip=f.clip, vae=f.vae, sampler=f.sampler, steps=f.steps,
                        cfg_scale=f.cfg_scale)
  return evaluate(f.samples, f.ref, f.inception, batch_size=f.batch_size, which=f.metrics,
                  preprocess=f.preprocess, split_size=f.split_size,
                  pr_batch_size=f.pr_batch_size)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  try:
    results = _run(f)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if f.reference_from:
    print(f"wrote {results['out']}: statistics of {results['num_images']} images "
          f"({results['skipped']} undecodable skipped)")
    return
  for key, label in _LABELS:
    if key in results:
      print(f"{label}: {results[key]}")
  if f.out:
    fileio.atomic_write_bytes(f.out, (json.dumps(results, indent=2, default=float) + "\n").encode())


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
