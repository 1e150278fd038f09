"""The 'sample_stats' evaluator: a tiny run writes the health scalars of its EMA samples
next to the same statistics of its training data (numpy's, on the same batches, latent
posteriors counted with their noise), a text model samples the run's captions, and a bad
setup fails when the evaluator is built."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from fcdm_jax import conditions, sampling, sharding
from fcdm_jax.data import make_source
from fcdm_jax.data.captions import write_captions
from fcdm_jax.evaluation import make_evaluators
from fcdm_jax.evaluation.sample_stats import DATA_BATCHES, SampleStats
from fcdm_jax.models import FCDM
from fcdm_jax.train import loop

from helpers.runs import scalars
from helpers.training import load_config, make_latent_dataset

TAGS = ("sample_nonfinite", "sample_mean", "sample_std", "data_mean", "data_std", "std_ratio")


def stats_config(dataset, **overrides):
  """tiny.py (8x8x4 latents, 4 classes) with sample_stats on 6 samples every 2 of 4 steps."""
  return load_config(**{"data.path": dataset, "num_train_steps": 4, "eval.enabled": True,
                        "eval.kind": "sample_stats", "eval.every_steps": 2,
                        "eval.num_samples": 6, "eval.batch_size": 4, "eval.steps": 2,
                        **overrides})


@pytest.mark.slow
def test_a_tiny_run_writes_sample_and_data_statistics(tmp_path):
  config = stats_config(make_latent_dataset(tmp_path / "latents"))
  workdir = str(tmp_path / "run")
  summary = loop.train_and_evaluate(config, workdir, make_evaluators=make_evaluators)
  written = scalars(workdir)
  for tag in TAGS:
    assert sorted(written[f"eval/{tag}"]) == [2, 4], (tag, written.get(f"eval/{tag}"))
  [result] = summary["eval"]
  assert result["step"] == 4 and result["num_samples"] == 6
  for tag in TAGS:
    assert written[f"eval/{tag}"][4] == pytest.approx(result[tag], rel=1e-6, abs=1e-7)

  # The data statistics: numpy's over the same batches; the step trains on x + x_std * eps.
  source = make_source(config)
  batches = [source.batch(step) for step in range(DATA_BATCHES)]
  x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
  noise = np.concatenate([b["x_std"] for b in batches]).astype(np.float64) ** 2
  assert result["data_mean"] == pytest.approx(x.mean(), rel=1e-9)
  assert result["data_std"] == pytest.approx(np.sqrt(x.var() + noise.mean()), rel=1e-9)
  assert result["data_std"] != pytest.approx(x.std(), rel=1e-5)   # the noise counts

  # The sample statistics: numpy's over the same samples of the final EMA params.
  generator = sampling.Generator(config, sampling.sampler_settings(config, "eval"),
                                 sharding.create_mesh(config))
  labels = sampling.random_labels(config.seed, 6, config.model.num_classes)
  _, raw = generator.generate_all(summary["state"].ema_params, config.seed, labels, 4)
  assert result["sample_nonfinite"] == 0
  assert result["sample_mean"] == pytest.approx(raw.astype(np.float64).mean(), rel=1e-6)
  assert result["sample_std"] == pytest.approx(raw.astype(np.float64).std(), rel=1e-6)
  assert np.isfinite(result["std_ratio"]) and result["std_ratio"] > 0
  assert result["std_ratio"] == pytest.approx(result["sample_std"] / result["data_std"])


class FakeTextEncoder:
  """A text encoder whose embedding of a caption is a fixed random vector per caption."""
  identity = {"name": "fake", "weights_sha256": "0", "pooling": "pooled"}

  def encode(self, texts, batch):
    del batch
    return np.stack([np.random.default_rng(list(t.encode())).standard_normal(8)
                     for t in texts]).astype(np.float32)

  def empty(self):
    return np.zeros(8, np.float32)


class Recorder:
  def __init__(self):
    self.written = {}

  def write_scalars(self, step, values):
    self.written[step] = dict(values)


def test_a_text_model_samples_the_runs_captions(tmp_path):
  dataset = make_latent_dataset(tmp_path / "latents", count=16)
  captions = [[f"example {i}", f"caption {i}"] for i in range(16)]
  write_captions(str(tmp_path / "latents" / "captions"), captions, FakeTextEncoder())
  config = stats_config(dataset, **{"model.condition": "text", "model.text_dim": 8,
                                    "eval.num_samples": 5})
  mesh = sharding.create_mesh(config)
  [evaluator] = make_evaluators(config, mesh, str(tmp_path / "run"))
  assert isinstance(evaluator, SampleStats)
  table = make_source(config).captions
  assert evaluator.conditions.shape == (5, 8)
  for row in evaluator.conditions:   # every sample is conditioned on one of the captions
    assert np.any(np.all(table.embeddings == row, axis=1))
  model = FCDM(**config.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 4), np.float32),
                               np.zeros((1,), np.float32),
                               conditions.example_y(model, 1))["params"])
  writer = Recorder()
  result = evaluator(3, params, writer)
  assert sorted(writer.written[3]) == sorted(f"eval/{tag}" for tag in TAGS)
  assert result["sample_nonfinite"] == 0 and result["num_samples"] == 5
  assert np.isfinite(result["std_ratio"]) and result["std_ratio"] > 0


def test_bad_setups_fail_when_built(tmp_path):
  dataset = make_latent_dataset(tmp_path / "latents", count=16)
  mesh = sharding.create_mesh(stats_config(dataset))
  for overrides, error, match in (
      ({"eval.num_samples": 0}, ValueError, "config.eval.num_samples must be an integer >= 1"),
      ({"eval.sampler": "nope"}, ValueError, "nope"),
      ({"data.path": str(tmp_path / "none")}, FileNotFoundError,
       re.escape(f"{tmp_path / 'none'} does not exist"))):
    with pytest.raises(error, match=match):
      make_evaluators(stats_config(dataset, **overrides), mesh, str(tmp_path / "run"))
