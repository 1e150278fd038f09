"""Shared pieces of the training-system tests: a tiny latent dataset and config loading.

tests/configs/tiny.py is the one tiny config; the variants below are it (or configs/demo.py
with its model) with a few fields overridden through `load_config`."""

import importlib.util
import pathlib

import numpy as np

from fcdm_jax.data import LatentShardWriter

TESTS = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = TESTS / "configs" / "tiny.py"


def load_config(path=TINY_CONFIG, arg=None, **overrides):
  spec = importlib.util.spec_from_file_location("test_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


DEMO_CONFIG = TESTS.parent / "configs" / "demo.py"


def tiny_model_overrides():
  """tiny.py's model width, depth and depthwise-conv formulation, as `load_config` overrides
  (`{"model.hidden_size": 8, ...}`) for another config."""
  model = load_config().model
  return {f"model.{k}": model[k] for k in ("hidden_size", "depth", "dwconv_impl")}


def tiny_demo_config(objective, **overrides):
  """configs/demo.py (32x32x1 embedded digits, 10 classes, its previews and judge) with
  tiny.py's model."""
  return load_config(DEMO_CONFIG, objective, **{**tiny_model_overrides(), **overrides})


def sampling_config(latent=False, objective="ddpm", **overrides):
  """tiny.py as the sampling tests take it: a pixel-space (8x8x1, like configs/demo.py) or
  latent (4x4x4) model of 3 classes, sampled in 3 steps."""
  return load_config(TINY_CONFIG, objective, **{
      "image_size": 8, "latent_size": 4 if latent else 8,
      "model.in_channels": 4 if latent else 1, "model.num_classes": 3,
      "data.source": "latents" if latent else "embedded", "data.vae_scale": 0.5,
      "sample.steps": 3, **overrides})


def make_latent_dataset(directory, count=64, shape=(8, 8, 4), num_classes=4, seed=0,
                        shard_size=32):
  """Random posterior means/stds in our latent format."""
  rng = np.random.default_rng(seed)
  writer = LatentShardWriter(directory, shape=shape, num_classes=num_classes, dtype="float32")
  shards = (count + shard_size - 1) // shard_size
  for i in range(shards):
    n = min(shard_size, count - i * shard_size)
    mean = rng.standard_normal((n, 2) + tuple(shape)).astype(np.float32) * 5
    std = np.full((n, 2) + tuple(shape), 0.1, np.float32)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    writer.write_shard(i, mean, std, labels)
  writer.finalize(shards)
  return str(directory)


def seed_classifier(digit_classifier, workdir) -> None:
  """Copies the shared judge classifier (conftest's `digit_classifier`) into `workdir`."""
  import os
  import shutil
  os.makedirs(workdir, exist_ok=True)
  shutil.copytree(digit_classifier, os.path.join(workdir, digit_classifier.name))
