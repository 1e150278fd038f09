"""FID-k: FID, sFID and Inception Score of k samples of the EMA params (during training, and
as `fcdm_jax.evaluate --workdir=RUN`), with the CLIP score for a text-conditioned model.

The numbers are `fcdm_jax.evaluate`'s (ADM's Inception features and formulas) for
`config.eval.num_samples` samples against the reference batch `config.eval.reference` (its
stored mu/sigma, or its images' features), so a run's curve is comparable with the final
evaluation up to the sample size's bias. Class models sample uniform random labels. Text
models sample captions of `config.eval.captions` (a caption folder; default: the run's
own): sample i takes a random example and one of its captions, drawn from (seed, i): the
MS-COCO protocol (30k samples, each conditioned on a random val2014 caption, against
val2014 image statistics) when that folder is val2014's. With `config.eval.clip` (a
whole CLIP model folder) each sample is also scored against its caption (eval/clip_score).
Weights, captions and reference statistics are loaded once, when the run starts; every
call samples the same conditions from the same noise (config.seed). Samples are scored a
batch at a time: only their features are kept. The results (and the log line) give the
sampling's cost, `cost` (`sampling.cost`: network evaluations per image).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from fcdm_jax import conditions, fileio, sampling, sharding
from fcdm_jax.data.captions import MANIFEST, CaptionTable, caption_folder
from fcdm_jax.evaluation import adm
from fcdm_jax.evaluation.clip_score import CLIPScorer
from fcdm_jax.evaluation.registry import eval_counts
from fcdm_jax.diffusion import guidance
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.models import inception
from fcdm_jax.sampling import cost as cost_lib
from fcdm_jax.sampling import weights

WHICH = ("fid", "sfid", "is")
_TAG_EVAL_CAPTIONS = 7   # seeds the caption draw of the evaluation's samples


def eval_captions(config):
  """(CaptionTable of the evaluation's captions, the run's own caption folder) of a text run;
  refuses captions encoded by another text encoder than the run's."""
  own = caption_folder(config)
  path = config.eval.get("captions") or own
  table = CaptionTable(path, dim=int(config.model.text_dim))
  own_manifest = fileio.join(own, MANIFEST) if own else ""
  if path != own and own_manifest and fileio.isfile(own_manifest):
    trained = json.loads(fileio.read_text(own_manifest)).get("encoder", {})
    used = table.manifest.get("encoder", {})
    keys = ("weights_sha256", "pooling")
    if {k: trained.get(k) for k in keys} != {k: used.get(k) for k in keys}:
      raise ValueError(f"config.eval.captions={path} were encoded with {used}, the run's "
                       f"captions ({own}) with {trained}: encode both with the same text "
                       "encoder and pooling")
  return table


def draw_captions(table, seed: int, num_samples: int) -> np.ndarray:
  """Caption rows of the samples: a uniform example, then one of its captions, per sample."""
  rng = np.random.default_rng([int(seed), _TAG_EVAL_CAPTIONS])
  examples = rng.integers(0, table.offsets.shape[0] - 1, num_samples)
  start, end = table.offsets[examples], table.offsets[examples + 1]
  return start + np.floor(rng.random(num_samples) * (end - start)).astype(np.int64)


def eval_conditions(config, seed: int, num_samples: int):
  """(conditions, the guidance null's text embedding or None, caption texts or None) of an
  evaluation's samples: uniform random classes, or for a text model a random caption of a
  random example of the evaluation's caption folder each (both drawn from the seed)."""
  if not conditions.of_config(config).uses_captions:
    return (sampling.random_labels(seed, num_samples, int(config.model.num_classes)), None,
            None)
  table = eval_captions(config)
  rows = draw_captions(table, seed, num_samples)
  texts = table.texts()
  return table.embeddings[rows], table.empty, [texts[r] for r in rows]


class FidEvaluator:
  """Samples config.eval.num_samples images; writes eval/fid, eval/sfid, eval/inception_score
  (and eval/clip_score for a text model with config.eval.clip)."""

  def __init__(self, config, mesh, workdir: str = ""):
    del workdir   # scores go to the writer only
    ev = config.eval
    self.num_samples, self.batch, self.every_steps = eval_counts(config, 2)
    self.seed = int(config.seed)
    for name in ("inception", "reference"):
      if not ev[name] or not fileio.isfile(ev[name]):
        raise FileNotFoundError(f"config.eval.{name}={ev[name]!r} is not a file; the FID "
                                "evaluation needs the FID-Inception weights and a reference "
                                "batch .npz (or set config.eval.enabled=False)")
    decoder = sampling.image_decoder(config, config.preview.vae_dir, mesh,
                                     "config.preview.vae_dir (the FID evaluation's decoder)")
    self.conditions, empty, self.texts = eval_conditions(config, self.seed, self.num_samples)
    self.clip = None
    if ev.get("clip"):
      if self.texts is None:
        raise ValueError("config.eval.clip scores samples against their captions: it is for "
                         "text-conditioned models (model.condition='text')")
      self.clip = CLIPScorer(ev.clip)
    self.generator = sampling.Generator(config, sampling.sampler_settings(config, "eval"), mesh,
                                        decoder, empty_embedding=empty)
    model, variables = inception.load_inception(ev.inception)
    self.extract = adm.FeatureExtractor(model, variables, self.batch)
    self.reference = ev.reference
    with fileio.open_read(ev.reference) as fh, np.load(fh) as z:
      has_images = "arr_0" in z.files
    self.ref_feats = None   # the reference's features, once (its statistics at the first call)
    if has_images:
      self.ref_feats = self.extract(adm.NpzImages(ev.reference), "reference features",
                                    progress=False)
    self.stats = None

  def __call__(self, step: int, ema_params, writer, progress=None) -> dict:
    start = time.time()
    feats: dict[str, list] = {}
    clip_scores = []
    for first, images, _ in self.generator.batches(ema_params, self.seed, self.conditions,
                                                   self.batch, progress):
      if images.shape[-1] == 1:   # grey: Inception reads RGB
        images = np.repeat(images, 3, axis=-1)
      for k, v in self.extract(adm.ArrayImages(images), "eval features",
                               progress=False).items():
        feats.setdefault(k, []).append(v)
      if self.clip is not None:
        clip_scores.append(self.clip.score(images, self.texts[first:first + len(images)],
                                           batch=self.batch).per_image)
    feats = {k: np.concatenate(v) for k, v in feats.items()}
    if self.stats is None:
      self.stats = adm.reference_statistics(self.reference, self.ref_feats, ("fid", "sfid"),
                                                 feats["pool"].shape[1],
                                                 feats["spatial"].shape[1])
    results = adm.sample_metrics(feats, self.stats, WHICH, split_size=self.num_samples)
    results["cost"] = self.generator.last_cost
    scalars = {"eval/fid": results["fid"], "eval/sfid": results["sfid"],
               "eval/inception_score": results["inception_score"]}
    if clip_scores:
      results["clip_score"] = float(np.mean(np.concatenate(clip_scores)))
      scalars["eval/clip_score"] = results["clip_score"]
    writer.write_scalars(step, scalars)
    logging.info("eval at step %d: FID-%d %.3f, sFID %.3f, IS %.3f%s (%.1f s, %s)", step,
                 self.num_samples, results["fid"], results["sfid"],
                 results["inception_score"],
                 f", CLIP score {results['clip_score']:.3f}" if clip_scores else "",
                 time.time() - start, cost_lib.describe(results["cost"]))
    return dict(results, step=int(step), num_samples=self.num_samples)


def evaluate_run(workdir: str, ref: str, inception_path: str, num_samples: int, *,
                 batch_size: int = 256, step: int | None = None, captions: str = "",
                 clip: str = "", vae: str = "", progress: bool = True, **sampler) -> dict:
  """FID, sFID, IS (and the CLIP score) of `num_samples` samples of a run's EMA weights:
  `evaluation.fid_eval.FidEvaluator`, the training hook, run once. `sampler`: sampler,
  steps, cfg_scale, cfg_interval overrides of the run's preview/eval settings (None = keep;
  cfg_interval: LOW,HIGH or 'none')."""
  config, identity = weights.resolve_model(workdir, None, None, step)
  sampler = {k: v for k, v in sampler.items() if v is not None}
  if "cfg_interval" in sampler:   # () is "none": it overrides the preview's interval too
    sampler["cfg_interval"] = guidance.check_interval(
        sampler["cfg_interval"], make_objective(config).time_range, "--cfg_interval") or ()
  with config.unlocked():
    config.eval.update(num_samples=int(num_samples), batch_size=int(batch_size),
                       inception=inception_path, reference=ref, captions=captions, clip=clip)
    config.eval.update(sampler)
    if vae:
      config.preview.vae_dir = vae
  mesh = sharding.create_mesh(config)
  evaluator = FidEvaluator(config, mesh)
  params = weights.load_model(config, identity, mesh)
  from clu import metric_writers   # deferred: it imports TensorFlow (2 s of every start)
  with tqdm(total=int(num_samples), desc="sampling + features", unit="img", file=sys.stderr,
            disable=not progress or jax.process_index() != 0) as bar:
    results = evaluator(identity["step"], params, metric_writers.LoggingWriter(),
                        progress=lambda done, total: bar.update(done - bar.n))
  return dict(results, workdir=identity["workdir"], captions=captions or None)
