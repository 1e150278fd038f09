"""The one generator (`fcdm_jax.sampling`): the sampling CLI, training previews and the
in-training evaluation draw the same images from the same weights, seed and labels."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from fcdm_jax import sample, sampling
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.evaluation import demo_eval
from fcdm_jax.models import FCDM
from fcdm_jax.train import preview as preview_lib
from fcdm_jax.train import sharding

from test_sample import make_workdir
from train_helpers import TESTS, load_config

DEMO_CONFIG = TESTS.parent / "configs" / "demo.py"


def demo_shaped_config():
  """The demo's shape (32x32x1 digits, 10 classes) with a model of a few channels."""
  config = load_config(DEMO_CONFIG, "ddpm")
  config.seed = 11
  config.model.update(hidden_size=8, depth=(1, 1, 1, 1, 1), dwconv_impl="xla")
  config.preview.update(sampler="ddim", steps=3, cfg_scale=4.0, eta=0.0, num_classes_shown=10,
                        per_class=1)
  config.eval.update(sampler="ddim", steps=3, cfg_scale=4.0, num_samples=10, batch_size=16)
  return config


def test_cli_preview_and_eval_give_identical_images(tmp_path):
  config = demo_shaped_config()
  workdir, ema = make_workdir(tmp_path / "run", config, seed=2)
  mesh = sharding.create_mesh(config)
  params = jax.device_put(ema, sharding.replicated(mesh))
  labels = np.arange(10, dtype=np.int32)   # the grid's rows, and the eval's balanced labels

  summary = sample.sample(str(tmp_path / "out"), 10, workdir=workdir, labels="balanced",
                          seed=config.seed, batch_size=16, sampler="ddim", steps=3,
                          cfg_scale=4.0, eta=0.0, progress=False)
  with np.load(summary["npz"]) as z:
    from_cli = z["arr_0"][..., :1]   # grey digits, stored as RGB
    np.testing.assert_array_equal(z["arr_1"], labels)

  previews = preview_lib.PreviewWriter(config, mesh, str(tmp_path / "run"), writer=None)
  np.testing.assert_array_equal(previews.labels, labels)
  from_preview = previews.images(params)

  [(_, eval_cfg)] = demo_eval.check_demo_eval(config, previews.generator.model,
                                              make_objective(config), workdir)
  generator = sampling.Generator(config, eval_cfg, mesh)
  from_eval, bad = demo_eval.sample_images(generator, config, params,
                                           demo_eval.balanced_labels(10), 16, "guided")

  assert from_cli.shape == (10, 32, 32, 1) and from_cli.std() > 10 and bad == 0
  np.testing.assert_array_equal(from_preview, from_cli)
  np.testing.assert_array_equal(from_eval, from_cli)
  # The samples are the labels' own: other labels give other images.
  other, _ = previews.generator.generate(params, config.seed, np.arange(10), labels[::-1])
  assert np.abs(other.astype(int) - from_cli.astype(int)).mean() > 1


def test_a_sample_depends_on_seed_and_index_only():
  config = demo_shaped_config()
  mesh = sharding.create_mesh(config)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: FCDM(**config.model).init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), np.zeros((1,), np.float32),
      np.zeros((1,), np.int32)))
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        nn.unbox(shapes)["params"])
  params = jax.device_put(params, sharding.replicated(mesh))
  generator = sampling.Generator(config, preview_lib.sample_settings(config), mesh)
  labels = np.asarray([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], np.int32)
  images, _ = generator.generate(params, 5, np.arange(10), labels)
  # Samples 4..7 alone, in a batch of their own: the same images.
  part, _ = generator.generate(params, 5, np.arange(4, 8), labels[4:8])
  diff = np.abs(part.astype(int) - images[4:8].astype(int))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99
  other_seed, _ = generator.generate(params, 6, np.arange(10), labels)
  assert np.abs(other_seed.astype(int) - images.astype(int)).mean() > 1
  with pytest.raises(ValueError, match=r"labels \[10\] are outside \[0, 10\)"):
    generator.generate(params, 5, np.arange(2), np.asarray([1, 10]))
  with pytest.raises(ValueError, match="3 sample indices but 2 conditions"):
    generator.generate(params, 5, np.arange(3), np.asarray([1, 2]))

