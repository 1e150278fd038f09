"""FID-k during training: FID, sFID and Inception Score of k samples of the EMA params.

The numbers are `fcdm_jax.evaluate`'s (ADM's Inception features and formulas) for
`config.eval.num_samples` samples with uniform random labels, against the reference batch
`config.eval.reference` (its stored mu/sigma, or its images' features), so a run's curve
is comparable with the final 50k evaluation up to the sample size's bias. The
Inception weights (`config.eval.inception`) and the reference statistics are loaded once,
when the run starts; every call samples the same labels from the same noise (config.seed).
"""

from __future__ import annotations

import time

import numpy as np
from absl import logging

from fcdm_jax import evaluate, fileio, sampling
from fcdm_jax.evaluation.hooks import check_count, sample_settings

WHICH = ("fid", "sfid", "is")


class FidEvaluator:
  """Samples config.eval.num_samples images; writes eval/fid, eval/sfid, eval/inception_score."""

  def __init__(self, config, mesh):
    from fcdm_jax.models import inception
    ev = config.eval
    self.num_samples = check_count("num_samples", ev.num_samples, 2)
    self.batch = check_count("batch_size", ev.batch_size, 1)
    self.every_steps = int(ev.every_steps)
    self.seed = int(config.seed)
    for name in ("inception", "reference"):
      if not ev[name] or not fileio.isfile(ev[name]):
        raise FileNotFoundError(f"config.eval.{name}={ev[name]!r} is not a file; the FID "
                                "evaluation needs the FID-Inception weights and a reference "
                                "batch .npz (or set config.eval.enabled=False)")
    decoder = None
    if sampling.is_latent(config):
      if not config.preview.vae_dir:
        raise ValueError("the FID evaluation of a latent model decodes its samples with the "
                         "SD-VAE of config.preview.vae_dir, which is empty")
      decoder = sampling.load_decoder(config.preview.vae_dir, config, mesh)
    elif config.model.in_channels not in (1, 3):
      raise ValueError(f"a pixel-space model with {config.model.in_channels} channels has no "
                       "images for Inception (1 or 3 expected)")
    self.generator = sampling.Generator(config, sample_settings(config), mesh, decoder)
    self.labels = sampling.random_labels(self.seed, self.num_samples,
                                         int(config.model.num_classes))
    model, variables = inception.load_inception(ev.inception)
    self.extract = evaluate.FeatureExtractor(model, variables, self.batch)
    self.reference = ev.reference
    with fileio.open_read(ev.reference) as fh, np.load(fh) as z:
      has_images = "arr_0" in z.files
    self.ref_feats = None   # the reference's features, once (its statistics at the first call)
    if has_images:
      self.ref_feats = self.extract(evaluate.NpzImages(ev.reference), "reference features",
                                    progress=False)
    self.stats = None

  def __call__(self, step: int, ema_params, writer) -> dict:
    start = time.time()
    images, _ = self.generator.generate_all(ema_params, self.seed, self.labels, self.batch)
    if images.shape[-1] == 1:   # grey: Inception reads RGB
      images = np.repeat(images, 3, axis=-1)
    feats = self.extract(evaluate.ArrayImages(images), "eval features", progress=False)
    if self.stats is None:
      self.stats = evaluate.reference_statistics(self.reference, self.ref_feats, ("fid", "sfid"),
                                                 feats["pool"].shape[1],
                                                 feats["spatial"].shape[1])
    results = evaluate.sample_metrics(feats, self.stats, WHICH, split_size=self.num_samples)
    writer.write_scalars(step, {"eval/fid": results["fid"], "eval/sfid": results["sfid"],
                                "eval/inception_score": results["inception_score"]})
    logging.info("eval at step %d: FID-%d %.3f, sFID %.3f, IS %.3f (%.1f s)", step,
                 self.num_samples, results["fid"], results["sfid"],
                 results["inception_score"], time.time() - start)
    return dict(results, step=int(step), num_samples=self.num_samples)
