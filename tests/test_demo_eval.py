"""The demo's classifier-based metric: real digits score well, wrong labels and noise do not;
the classifier cache is reused and rebuilt when stale; run_demo_eval writes finite numbers."""

import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcdm_jax.data import load_embedded
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.demo import digit_judge as demo_eval
from fcdm_jax.models import FCDM
from fcdm_jax import sampling, sharding
from helpers.training import DEMO_CONFIG, load_config, seed_classifier, tiny_demo_config

QUICK_RECIPE = dict(epochs=1)  # 62 steps: for the cache mechanics only


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, digit_classifier):
  """A workdir holding the real recipe's classifier, trained once per test run (conftest)."""
  folder = str(tmp_path_factory.mktemp("demo_eval"))
  seed_classifier(digit_classifier, folder)
  return folder


@pytest.fixture(scope="module")
def judge(workdir):
  """The real recipe's classifier (the accuracy claims need it), from the workdir's cache."""
  return demo_eval.load_or_train_classifier(workdir)


def _balanced_train_subset(n, seed=1):
  images, labels = load_embedded("train")
  perm = np.random.default_rng(seed).permutation(len(labels))
  idx = np.concatenate([perm[labels[perm] == k][:n // 10] for k in range(10)])
  return images[idx], labels[idx]


@pytest.mark.slow
def test_classifier_is_trained_accurate_and_cached(judge, workdir):
  assert not judge.trained   # conftest's digit_classifier trained it into an empty folder
  assert judge.info["test_accuracy"] >= demo_eval.MIN_TEST_ACCURACY
  folder = os.path.join(workdir, demo_eval.CLASSIFIER_DIR)
  with open(os.path.join(folder, demo_eval.META_FILE)) as f:
    meta = json.load(f)
  assert meta["test_accuracy"] == judge.info["test_accuracy"]
  assert meta["data_sha256"] == demo_eval.data_fingerprint()
  assert os.path.getsize(os.path.join(folder, demo_eval.PARAMS_FILE)) > 10_000


@pytest.mark.slow
def test_real_held_out_digits_score_high_accuracy_and_low_distance(judge, workdir):
  images, labels = load_embedded("test")
  held_out = demo_eval.evaluate_samples(images, labels, workdir)
  assert held_out["num_samples"] == 1000 and held_out["accuracy"] >= 0.95
  # Real digits the test statistics were not fitted on: near the reference floor.
  real = demo_eval.evaluate_samples(*_balanced_train_subset(1000), workdir)
  floor = judge.real_reference(1000)
  assert real["accuracy"] >= 0.95
  assert real["frechet_distance"] < 2 * floor["frechet_distance_train_vs_test"]
  assert floor["classifier_test_accuracy"] == pytest.approx(held_out["accuracy"])
  # Float input in [-1, 1] is judged like the same uint8 images.
  as_float = demo_eval.evaluate_samples(images.astype(np.float32) / 127.5 - 1, labels, workdir)
  assert as_float["accuracy"] == held_out["accuracy"]
  assert as_float["frechet_distance"] == pytest.approx(held_out["frechet_distance"], abs=1e-6)


@pytest.mark.slow
def test_wrong_labels_and_noise_score_badly(judge, workdir):
  images, labels = _balanced_train_subset(1000)
  real = judge.score(images, labels)
  shuffled = judge.score(images, np.random.default_rng(0).permutation(labels))
  assert shuffled["accuracy"] < 0.2  # chance is 0.1
  assert shuffled["frechet_distance"] == pytest.approx(real["frechet_distance"])  # same images
  # Digits moved off-centre by 4 pixels are still read, but are further from real digits.
  moved = judge.score(np.roll(images, 4, axis=2), labels)
  assert moved["accuracy"] > 0.8
  assert 5 * real["frechet_distance"] < moved["frechet_distance"]
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
  blank = np.zeros_like(images)
  for fake in (noise, blank):
    scores = judge.score(fake, labels)
    assert scores["accuracy"] < 0.3
    assert scores["frechet_distance"] > 3 * moved["frechet_distance"]


@pytest.mark.slow
def test_cache_is_reused_on_rerun(judge, workdir):
  path = os.path.join(workdir, demo_eval.CLASSIFIER_DIR, demo_eval.PARAMS_FILE)
  before = os.stat(path).st_mtime_ns
  again = demo_eval.load_or_train_classifier(workdir)
  assert not again.trained
  assert os.stat(path).st_mtime_ns == before
  for a, b in zip(jax.tree.leaves(judge.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _corrupt_params(folder):
  path = os.path.join(folder, demo_eval.PARAMS_FILE)
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(blob[:len(blob) // 2])


def _corrupt_meta(folder):
  with open(os.path.join(folder, demo_eval.META_FILE), "w") as f:
    f.write("{not json")


def _stale_data(folder):
  path = os.path.join(folder, demo_eval.META_FILE)
  with open(path) as f:
    meta = json.load(f)
  meta["data_sha256"] = "0" * 64
  with open(path, "w") as f:
    json.dump(meta, f)


@pytest.mark.slow
def test_unusable_cache_is_retrained(tmp_path):
  workdir = str(tmp_path)
  folder = os.path.join(workdir, demo_eval.CLASSIFIER_DIR)
  first = demo_eval.load_or_train_classifier(workdir, QUICK_RECIPE)
  assert first.trained
  assert not demo_eval.load_or_train_classifier(workdir, QUICK_RECIPE).trained
  for damage in (_corrupt_params, _corrupt_meta, _stale_data):
    damage(folder)
    rebuilt = demo_eval.load_or_train_classifier(workdir, QUICK_RECIPE)
    assert rebuilt.trained
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(rebuilt.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # deterministic
    assert not demo_eval.load_or_train_classifier(workdir, QUICK_RECIPE).trained
  # Another recipe is another classifier: the cache is not used for it.
  assert demo_eval.load_or_train_classifier(workdir, dict(QUICK_RECIPE, seed=1)).trained


@pytest.mark.slow
def test_bad_inputs_are_refused(judge):
  images, labels = load_embedded("test")
  with pytest.raises(ValueError, match="NHWC"):
    judge.score(images[..., 0], labels)
  with pytest.raises(ValueError, match="pass uint8"):
    judge.score(images.astype(np.float32), labels)
  with pytest.raises(ValueError, match="not digits"):
    judge.score(images, labels + 1)
  with pytest.raises(ValueError, match="one per image"):
    judge.score(images, labels[:-1])
  with pytest.raises(ValueError, match="unknown classifier recipe"):
    demo_eval.load_or_train_classifier("/nonexistent", dict(epoch=1))


def test_judged_runs_are_the_preview_settings_with_eval_overrides():
  config = load_config(DEMO_CONFIG, "ddpm")
  config.preview.update(eta=0.5, steps=7, cfg_scale=2.0)
  config.eval.update(steps=3, cfg_scale=5.0, sampler="ddpm", batch_size=8, unguided=False)
  [(name, cfg)] = demo_eval.guidance_runs(config)
  assert name == "guided" and cfg == sampling.sampler_settings(config, "eval")
  assert cfg["eta"] == 0.5 and cfg["steps"] == 3 and cfg["cfg_scale"] == 5.0
  assert cfg["sampler"] == "ddpm"
  for key in ("every_steps", "per_class", "num_samples", "enabled", "batch_size", "kind",
              "inception", "reference", "vae_dir"):
    assert key not in cfg
  config.eval.update(steps=None, unguided=True)   # unset: the preview's
  (_, guided), (name, unguided) = demo_eval.guidance_runs(config)
  assert guided["steps"] == 7 and name == "unguided" and unguided == dict(guided, cfg_scale=1.0)
  config.eval.cfg_scale = 1.0   # nothing to compare without guidance: one run
  assert [name for name, _ in demo_eval.guidance_runs(config)] == ["conditional"]


class _Recorder:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))


def _tiny_run(objective="ddpm"):
  """A tiny demo-shaped FCDM with random weights everywhere (the output conv too, so that
  guidance changes the samples), replicated over the mesh as the training loop holds it.
  Random weights from the shapes: jitted or eager init of even this FCDM costs ~15 s here."""
  config = tiny_demo_config(objective, **{"model.hidden_size": 16,
                                          "model.dwconv_impl": "auto"})  # the demo's own
  config.eval.update(num_samples=12, steps=2, cfg_scale=4.0, batch_size=8, unguided=True)
  model = FCDM(**config.model)
  mesh = sharding.create_mesh(config)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,)),
      jnp.zeros((1,), jnp.int32))))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  params = jax.device_put(params, sharding.replicated(mesh))
  return config, model, make_objective(config), mesh, params


@pytest.mark.slow
def test_run_demo_eval_writes_finite_numbers(judge, workdir, tmp_path):
  run_dir = str(tmp_path)
  shutil.copytree(os.path.join(workdir, demo_eval.CLASSIFIER_DIR),
                  os.path.join(run_dir, demo_eval.CLASSIFIER_DIR))
  config, model, objective, mesh, params = _tiny_run()
  writer = _Recorder()
  out = demo_eval.run_demo_eval(config, model, objective, params, mesh, run_dir, writer, step=7)
  with open(os.path.join(run_dir, demo_eval.EVAL_FILE)) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(out))
  assert saved["step"] == 7 and saved["num_samples"] == 12
  assert not saved["classifier"]["trained_now"]  # the copied cache was used
  # The demo's DDPM judge samples with the previews' sampler.
  assert saved["sampler"]["steps"] == 2 and saved["sampler"]["sampler"] == "unipc"
  assert saved["guided"]["cfg_scale"] == 4.0 and saved["unguided"]["cfg_scale"] == 1.0
  numbers = [saved["accuracy"], saved["frechet_distance"]]
  for run in ("guided", "unguided"):
    numbers += [saved[run]["accuracy"], saved[run]["frechet_distance"]]
    assert saved[run]["non_finite_samples"] == 0
  numbers += [v for v in saved["reference"].values()]
  assert all(math.isfinite(v) for v in numbers), numbers
  assert 0.0 <= saved["accuracy"] <= 1.0 and saved["frechet_distance"] >= 0.0
  assert saved["guided"]["frechet_distance"] != saved["unguided"]["frechet_distance"]
  assert saved["reference"]["frechet_distance_num_train_images"] == 12
  assert saved["reference"]["classifier_test_accuracy"] == pytest.approx(
      judge.info["test_accuracy"])
  [(step, scalars)] = writer.scalars
  assert step == 7 and scalars["eval/accuracy"] == saved["accuracy"]
  assert scalars["eval/unguided_frechet_distance"] == saved["unguided"]["frechet_distance"]


@pytest.mark.slow
def test_run_demo_eval_with_flow_judges_guided_samples_only_by_default(workdir, tmp_path):
  run_dir = str(tmp_path)
  shutil.copytree(os.path.join(workdir, demo_eval.CLASSIFIER_DIR),
                  os.path.join(run_dir, demo_eval.CLASSIFIER_DIR))
  config, model, objective, mesh, params = _tiny_run("flow")
  config.eval.unguided = load_config(DEMO_CONFIG, "flow").eval.unguided   # the default
  config.eval.update(num_samples=10, batch_size=16)  # one batch, padded past the samples
  out = demo_eval.run_demo_eval(config, model, objective, params, mesh, run_dir, _Recorder(),
                                step=3)
  assert out["sampler"]["sampler"] == "ode" and "unguided" not in out
  assert out["num_samples"] == 10 and math.isfinite(out["frechet_distance"])
  assert out["guided"]["accuracy"] == out["accuracy"]


@pytest.mark.parametrize("change, message", [
    (dict(source="latents"), "embedded MNIST digits only"),
    (dict(num_classes=5), "num_classes=5"),
    (dict(workdir="gs://bucket/run"), "local directory"),
    (dict(num_samples=1), "num_samples"),
    (dict(batch_size=0), "batch_size"),
    (dict(sampler="euler"), "unknown sampler"),
])
def test_bad_eval_setups_fail_before_any_work(change, message):
  config = load_config(DEMO_CONFIG)
  config.data.source = change.get("source", "embedded")
  config.model.num_classes = change.get("num_classes", 10)
  for key in ("num_samples", "batch_size", "sampler"):
    if key in change:
      config.eval[key] = change[key]
  model = FCDM(**config.model)
  with pytest.raises(ValueError, match=message):
    demo_eval.run_demo_eval(config, model, make_objective(config), None, None,
                            change.get("workdir", "/nonexistent"), _Recorder(), 0)
