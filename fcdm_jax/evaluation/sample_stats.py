"""A cheap health check of the EMA model during training, with no external weights.

Samples `config.eval.num_samples` with the eval sampler settings
(`sampling.sampler_settings(config, "eval")`) from config.seed's noise, and writes
  eval/sample_nonfinite  the fraction of samples with a non-finite value
  eval/sample_mean, eval/sample_std  of the raw samples (before any VAE decode; over the
                         finite samples, NaN when there is none)
  eval/data_mean, eval/data_std  the same of what the model trains on: the first
                         `DATA_BATCHES` global batches of `data.make_source(config)`, read
                         once when the evaluator is built. A latent source's batches are
                         posteriors (mean x, std s); the step trains on x + s * eps, whose
                         variance is var(x) + mean(s^2), used here exactly (no draw).
  eval/std_ratio         sample_std / data_std: near 1 for a healthy model; a latent model
                         with a wrong vae_scale or a collapsing EMA shows up here.
Class models sample uniform random labels; text models sample captions as the FID
evaluation does (`fid_eval.eval_captions`: config.eval.captions, else the run's own).
Nothing is decoded, so a latent model needs no VAE. The results (and the log line) give
the sampling's cost, `cost` (`sampling.cost`: network evaluations per image).
"""

from __future__ import annotations

import time

import numpy as np
from absl import logging

from fcdm_jax import data, sampling
from fcdm_jax.evaluation.fid_eval import eval_conditions
from fcdm_jax.evaluation.registry import eval_counts
from fcdm_jax.sampling import cost as cost_lib

DATA_BATCHES = 4   # global batches of the training stream the data statistics come from


class Moments:
  """Running count, sum and sum of squares (float64) of array elements."""

  def __init__(self):
    self.count, self.total, self.squares = 0, 0.0, 0.0

  def add(self, x: np.ndarray, extra_variance: np.ndarray | None = None) -> None:
    """Adds the elements of `x`; `extra_variance` (x's shape) is the variance of noise added
    to each element, independent of it (a posterior's std squared)."""
    x = np.asarray(x, np.float64)
    self.count += x.size
    self.total += float(x.sum())
    self.squares += float(np.square(x).sum())
    if extra_variance is not None:
      self.squares += float(np.asarray(extra_variance, np.float64).sum())

  def mean_std(self) -> tuple[float, float]:
    """(mean, std) of the elements added (population std); NaN when none were."""
    if not self.count:
      return float("nan"), float("nan")
    mean = self.total / self.count
    return mean, float(np.sqrt(max(self.squares / self.count - mean * mean, 0.0)))


def data_statistics(config) -> tuple[float, float]:
  """(mean, std) of the elements of the first DATA_BATCHES global batches of the run's
  training stream, latent posteriors counted with their noise (see the module docstring)."""
  source = data.make_source(config)
  moments = Moments()
  for step in range(DATA_BATCHES):
    batch = source.batch(step)
    std = batch.get("x_std")
    moments.add(batch["x"], None if std is None else np.square(std, dtype=np.float64))
  return moments.mean_std()


class SampleStats:
  """Samples config.eval.num_samples; writes eval/sample_nonfinite, eval/sample_mean,
  eval/sample_std, eval/data_mean, eval/data_std and eval/std_ratio."""

  def __init__(self, config, mesh, workdir: str = ""):
    del workdir   # scores go to the writer only
    self.num_samples, self.batch, self.every_steps = eval_counts(config, 1)
    self.seed = int(config.seed)
    self.conditions, empty, _ = eval_conditions(config, self.seed, self.num_samples)
    self.generator = sampling.Generator(config, sampling.sampler_settings(config, "eval"),
                                        mesh, None, empty_embedding=empty)
    self.data_mean, self.data_std = data_statistics(config)
    if not np.isfinite(self.data_std) or self.data_std <= 0:
      raise ValueError(f"the training data's first {DATA_BATCHES} batches have std "
                       f"{self.data_std}: eval/std_ratio needs data that varies")

  def __call__(self, step: int, ema_params, writer) -> dict:
    start = time.time()
    moments, nonfinite = Moments(), 0
    for _, _, raw in self.generator.batches(ema_params, self.seed, self.conditions,
                                            self.batch):
      finite = np.isfinite(raw).reshape(len(raw), -1).all(axis=1)
      nonfinite += int(np.sum(~finite))
      moments.add(raw[finite])
    mean, std = moments.mean_std()
    results = {"sample_nonfinite": nonfinite / self.num_samples, "sample_mean": mean,
               "sample_std": std, "data_mean": self.data_mean, "data_std": self.data_std,
               "std_ratio": std / self.data_std}
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    cost = self.generator.last_cost
    logging.info("eval at step %d: %d samples, %.3f non-finite, mean %.4f, std %.4f (data: "
                 "mean %.4f, std %.4f; ratio %.4f) (%.1f s, %s)", step, self.num_samples,
                 results["sample_nonfinite"], mean, std, self.data_mean, self.data_std,
                 results["std_ratio"], time.time() - start, cost_lib.describe(cost))
    return dict(results, step=int(step), num_samples=self.num_samples, cost=cost)
