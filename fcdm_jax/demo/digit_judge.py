"""Judges the demo's class-conditional samples with a small digit classifier trained here.

Why a classifier of our own: Inception features mean little on 32x32 grey digits and
would need a download. A small CNN trained in JAX on the embedded MNIST-5k train split
(4,000 images; `fcdm_jax.data.load_embedded`) reads digits reliably (>= 98% on the 1,000
held-out test images) and trains in seconds on a CPU, so every workdir can make its own.

Two numbers per sample set:
  accuracy          share of samples the classifier assigns to the class they were
                    generated for (conditional accuracy)
  frechet_distance  Frechet distance between Gaussians fitted to the classifier's
                    penultimate features of the samples and of the held-out test images
                    (FID's formula, `fcdm_jax.metrics`, in this classifier's feature space)

The classifier is cached in `<workdir>/eval_classifier/` (params.msgpack + meta.json with
its recipe, test accuracy, a sha256 of the data and of the params file). A cache whose
recipe or data differ, or whose files are unreadable or do not match their hash, is
retrained and rewritten.

`run_demo_eval` is the end-of-training hook: it samples `config.eval.num_samples`
class-balanced digits from the EMA params with guidance (`config.eval.cfg_scale`) and,
when `config.eval.unguided` is True, also without it from the same noise (off by default:
it costs half as much again as the guided run, whose every step runs the batch twice), and
writes `<workdir>/eval.json` and `eval/*` scalars next to the real-data reference numbers;
each judged run records its cost (`cost`: network evaluations per image, `sampling.cost`).
Its sampling of the judged runs (`guidance_runs`, `GuidanceRuns`) serves the coloured-digit
judge too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fcdm_jax import conditions, fileio, metrics, sampling, provenance
from fcdm_jax.data.embedded import IMAGE_SHAPE, NUM_CLASSES, load_embedded, to_model_range
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.evaluation.registry import check_count
from fcdm_jax.models import FCDM
from fcdm_jax.sampling import cost as cost_lib

CLASSIFIER_DIR = "eval_classifier"
PARAMS_FILE = "params.msgpack"
META_FILE = "meta.json"
EVAL_FILE = "eval.json"
MIN_TEST_ACCURACY = 0.98  # below this the metric is not trustworthy: warn

# Everything that decides the trained weights; a cache made with another recipe is retrained.
RECIPE = dict(
    version=1,
    seed=0,
    stem_features=32,       # 5x5 stride-2 conv: 32x32 -> 16x16
    features=(64, 64),      # 3x3 conv + 2x2 max-pool each: 16 -> 8 -> 4
    feature_dim=64,         # the penultimate layer: the Frechet distance's feature space
    dropout=0.3,
    epochs=10,
    batch_size=64,
    learning_rate=3e-3,     # adam, one warmup epoch (at most half), cosine decay to 0
    max_shift=2,            # random translation, pixels
)
_BATCH = 500  # classifier inference batch (padded, so it compiles once)


class DigitClassifier(nn.Module):
  """A small CNN for 32x32x1 digits in [-1, 1] (NHWC); returns (logits, features)."""
  num_classes: int = NUM_CLASSES
  stem_features: int = 32
  features: tuple[int, ...] = (64, 64)
  feature_dim: int = 64
  dropout: float = 0.3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.stem_features, (5, 5), strides=2, name="stem")(x))
    for i, width in enumerate(self.features):
      x = nn.relu(nn.Conv(width, (3, 3), name=f"conv_{i}")(x))
      n, h, w, c = x.shape
      x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))  # 2x2 max-pool
    x = x.reshape(x.shape[0], -1)
    feats = nn.relu(nn.Dense(self.feature_dim, name="penultimate")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(feats)
    return nn.Dense(self.num_classes, name="logits")(h), feats


def _recipe(overrides: dict | None) -> dict:
  recipe = dict(RECIPE)
  unknown = set(overrides or {}) - set(recipe)
  if unknown:
    raise ValueError(f"unknown classifier recipe keys {sorted(unknown)}; known: {sorted(recipe)}")
  recipe.update(overrides or {})
  recipe["features"] = tuple(int(f) for f in recipe["features"])
  return recipe


def _module(recipe: dict) -> DigitClassifier:
  return DigitClassifier(stem_features=recipe["stem_features"], features=recipe["features"],
                         feature_dim=recipe["feature_dim"], dropout=recipe["dropout"])


@functools.lru_cache(maxsize=None)
def _forward_fn(module: DigitClassifier):
  """Jitted (logits, features) of one batch; one compile per architecture."""
  return jax.jit(lambda params, x: module.apply({"params": params}, x))


def _init_params(module: DigitClassifier, seed: int):
  return module.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + IMAGE_SHAPE))["params"]


def data_fingerprint() -> str:
  """sha256 of the embedded train and test splits: a cache of other data is stale."""
  h = hashlib.sha256()
  for split in ("train", "test"):
    for array in load_embedded(split):
      h.update(f"{array.dtype}{array.shape}".encode())
      h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()


def as_model_input(images) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] images (n, 32, 32, 1) -> float32 [-1, 1], checked."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"images must be NHWC (n, 32, 32, 1) digits, got shape {images.shape}")
  if images.dtype == np.uint8:
    return to_model_range(images)
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
  if not np.isfinite(images).all():
    raise ValueError(f"{int(np.sum(~np.isfinite(images)))} image values are NaN or inf")
  lo, hi = float(images.min()), float(images.max())
  if lo < -1.5 or hi > 1.5:
    raise ValueError(f"float images must be in [-1, 1] (the model range), got values in "
                     f"[{lo:.3g}, {hi:.3g}]; pass uint8 for [0, 255] pixels")
  return np.clip(images, -1.0, 1.0).astype(np.float32)


def _check_labels(labels, n: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be {n} integers (one per image), got {labels.dtype} "
                     f"of shape {labels.shape}")
  bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
  if bad.size:
    raise ValueError(f"labels {bad[:8].tolist()} are not digits 0..{NUM_CLASSES - 1}")
  return labels.astype(np.int32)


def _shift(x, key, max_shift: int):
  """Each image moved by up to `max_shift` pixels, background (-1) filled in."""
  if max_shift <= 0:
    return x
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)),
                   constant_values=-1.0)
  offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


_ADAM = optax.scale_by_adam()  # the learning rate is applied in the step, from the schedule


@functools.lru_cache(maxsize=4)
def _train_step(module: DigitClassifier, max_shift: int):
  """The jitted step of an architecture; the schedule is an input so a retrain, or a
  recipe with other epochs or seed, does not recompile."""

  @jax.jit
  def step(params, opt_state, x, y, key, learning_rate):
    shift_key, dropout_key = jax.random.split(key)
    x = _shift(x, shift_key, max_shift)

    def loss_fn(p):
      logits, _ = module.apply({"params": p}, x, train=True, rngs={"dropout": dropout_key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _ADAM.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
    return params, opt_state, loss

  return step


def train_classifier(recipe: dict | None = None):
  """(params, info) of a classifier trained on the embedded train split, scored on test."""
  recipe = _recipe(recipe)
  module = _module(recipe)
  x_train, y_train = load_embedded("train")
  x_train = to_model_range(x_train)
  batch = recipe["batch_size"]
  steps_per_epoch = len(x_train) // batch
  total = recipe["epochs"] * steps_per_epoch
  if total <= 0:
    raise ValueError(f"classifier recipe trains no steps on {len(x_train)} images: {recipe}")
  schedule = optax.warmup_cosine_decay_schedule(0.0, recipe["learning_rate"],
                                                min(steps_per_epoch, total // 2), total)
  learning_rates = np.asarray(schedule(np.arange(total)), np.float32)
  step = _train_step(module, recipe["max_shift"])
  params = _init_params(module, recipe["seed"])
  opt_state = _ADAM.init(params)
  order = np.random.default_rng(recipe["seed"])
  key = jax.random.PRNGKey(recipe["seed"] + 1)
  start = time.time()
  for epoch in range(recipe["epochs"]):
    perm = order.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      idx = perm[i * batch:(i + 1) * batch]
      k = epoch * steps_per_epoch + i
      params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx],
                                     jax.random.fold_in(key, k), learning_rates[k])
      losses.append(loss)
    logging.info("eval classifier: epoch %d/%d, loss %.4f (%.1f s)", epoch + 1,
                 recipe["epochs"], float(np.mean(jax.device_get(losses))), time.time() - start)
  seconds = time.time() - start
  x_test, y_test = load_embedded("test")
  _, predicted = _predict(module, params, to_model_range(x_test))
  accuracy = float(np.mean(predicted == y_test))
  info = dict(recipe=provenance.as_json(recipe), test_accuracy=accuracy,
              train_seconds=round(seconds, 2),
              num_train=int(len(x_train)), num_test=int(len(x_test)))
  logging.info("eval classifier: trained in %.1f s, held-out accuracy %.4f", seconds, accuracy)
  if accuracy < MIN_TEST_ACCURACY:
    logging.warning("eval classifier: held-out accuracy %.4f is below %.2f; its judgement of "
                    "samples is less reliable", accuracy, MIN_TEST_ACCURACY)
  return params, info


def _predict(module, params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(features float64 (n, D), predicted classes (n,)) in padded fixed-size batches."""
  forward = _forward_fn(module)
  feats, preds = [], []
  for i in range(0, len(x), _BATCH):
    chunk = x[i:i + _BATCH]
    pad = _BATCH - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    logits, f = jax.device_get(forward(params, chunk))
    feats.append(np.asarray(f[:_BATCH - pad], np.float64))
    preds.append(np.argmax(logits[:_BATCH - pad], axis=-1))
  return np.concatenate(feats), np.concatenate(preds).astype(np.int32)


class Judge:
  """A trained classifier and the held-out reference it scores samples against."""

  def __init__(self, params, info: dict, recipe: dict, trained: bool, directory: str):
    self.params, self.info, self.recipe = params, info, recipe
    self.trained = trained  # True when this call trained it (no usable cache)
    self.directory = directory
    self.module = _module(recipe)

  def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (n, D), predicted classes (n,)) of uint8 or [-1, 1] images."""
    return _predict(self.module, self.params, as_model_input(images))

  @functools.cached_property
  def _test(self) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(mu, sigma, classifier accuracy, count) of the held-out test images."""
    images, labels = load_embedded("test")
    feats, preds = self.predict(images)
    mu, sigma = metrics.fid_statistics(feats)
    return mu, sigma, float(np.mean(preds == labels)), len(labels)

  def score(self, images, labels) -> dict:
    """Conditional accuracy and Frechet distance to the held-out test images."""
    feats, preds = self.predict(images)
    labels = _check_labels(labels, len(feats))
    if len(feats) < 2:
      raise ValueError(f"the Frechet distance needs at least 2 images, got {len(feats)}")
    mu_ref, sigma_ref, _, _ = self._test
    mu, sigma = metrics.fid_statistics(feats)
    return dict(accuracy=float(np.mean(preds == labels)),
                frechet_distance=metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref),
                num_samples=int(len(feats)))

  def real_reference(self, num_samples: int) -> dict:
    """What real digits score: a floor for the Frechet distance, a ceiling for accuracy.

    The distance is that of `num_samples` class-balanced train images (seeded choice) to
    the test images, so it has the sample size (and so the small-sample bias) of a sample
    set of that size; accuracy is the classifier's on the held-out test images.
    """
    images, labels = load_embedded("train")
    wanted = balanced_labels(min(int(num_samples), len(labels)))
    perm = np.random.default_rng(self.recipe["seed"]).permutation(len(labels))
    chosen = np.concatenate([perm[labels[perm] == k][:np.sum(wanted == k)]
                             for k in range(NUM_CLASSES)])
    real = self.score(images[chosen], labels[chosen])
    return dict(classifier_test_accuracy=self._test[2],
                frechet_distance_train_vs_test=real["frechet_distance"],
                frechet_distance_num_train_images=real["num_samples"],
                num_test_images=self._test[3])


def _load_cache(directory: str, recipe: dict, fingerprint: str, module) -> tuple[Any, dict]:
  """(params, info) from the cache; raises ValueError saying why it cannot be used."""
  meta_path = fileio.join(directory, META_FILE)
  params_path = fileio.join(directory, PARAMS_FILE)
  if not fileio.exists(meta_path) or not fileio.exists(params_path):
    raise ValueError("no cached classifier")
  try:
    meta = json.loads(fileio.read_text(meta_path))
    if not isinstance(meta, dict):
      raise ValueError(f"{META_FILE} holds {type(meta).__name__}, not an object")
  except (OSError, ValueError) as e:
    raise ValueError(f"{meta_path} is unreadable: {e}") from e
  provenance.refuse_changes(meta.get("recipe") or {}, provenance.as_json(recipe),
                          "the classifier recipe changed", "retraining")
  if meta.get("data_sha256") != fingerprint:
    raise ValueError("the embedded data changed since the classifier was trained")
  blob = fileio.read_bytes(params_path)
  if hashlib.sha256(blob).hexdigest() != meta.get("params_sha256"):
    raise ValueError(f"{params_path} does not match the sha256 in {META_FILE} (corrupt)")
  template = _init_params(module, recipe["seed"])
  try:
    params = flax.serialization.from_bytes(template, blob)
  except Exception as e:  # msgpack raises a variety of types on bad bytes
    raise ValueError(f"{params_path} does not deserialize: {e}") from e
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, str(a.dtype)), tree)
  if shapes(params) != shapes(template):
    raise ValueError(f"{params_path} holds parameters of another shape")
  if not isinstance(meta.get("test_accuracy"), (int, float)):
    raise ValueError(f"{META_FILE} has no test_accuracy")
  return params, meta


def load_or_train_classifier(workdir: str, recipe: dict | None = None) -> Judge:
  """The workdir's cached classifier, or a newly trained one (written to the cache).

  `recipe` overrides `RECIPE` fields (tests use a shorter training).
  """
  recipe = _recipe(recipe)
  directory = fileio.join(workdir, CLASSIFIER_DIR)
  fingerprint = data_fingerprint()
  module = _module(recipe)
  try:
    params, info = _load_cache(directory, recipe, fingerprint, module)
    logging.info("eval classifier: using the cache in %s (held-out accuracy %.4f)", directory,
                 info["test_accuracy"])
    return Judge(params, info, recipe, trained=False, directory=directory)
  except (OSError, ValueError) as e:
    if fileio.isdir(directory):
      logging.warning("eval classifier: retraining; the cache in %s is not usable: %s",
                      directory, e)
    else:
      logging.info("eval classifier: none cached in %s; training one", directory)
  params, info = train_classifier(recipe)
  if jax.process_index() == 0:
    blob = flax.serialization.to_bytes(jax.device_get(params))
    info = dict(info, data_sha256=fingerprint, params_sha256=hashlib.sha256(blob).hexdigest())
    fileio.atomic_write_bytes(fileio.join(directory, PARAMS_FILE), blob)
    fileio.atomic_write_bytes(fileio.join(directory, META_FILE),
                              json.dumps(info, indent=2).encode())
  return Judge(params, info, recipe, trained=True, directory=directory)


def balanced_labels(num_samples: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """0, 1, ..., 9, 0, 1, ...: every class equally often (to within one)."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def evaluate_samples(images, labels, workdir: str) -> dict:
  """{accuracy, frechet_distance, num_samples} of digit images generated for `labels`.

  images: uint8 [0, 255] or float [-1, 1], NHWC (n, 32, 32, 1); labels: (n,) ints 0..9.
  The classifier comes from (or is trained into) `<workdir>/eval_classifier/`.
  """
  return load_or_train_classifier(workdir).score(images, labels)


# ------------------------------------------------------------------ the judges' sampling
# (shared with the coloured-digit judge)


def guidance_runs(config) -> list[tuple[str, dict]]:
  """(name, sampler settings) of the runs a demo judge scores, all from the same noise:
  config.eval's settings ('guided', or 'conditional' at cfg_scale 1) and, with
  config.eval.unguided, the same at cfg_scale 1 ('unguided')."""
  guided = sampling.sampler_settings(config, "eval")
  cfg_scale = float(guided.get("cfg_scale", 1.0))
  runs = [("guided" if cfg_scale != 1.0 else "conditional", guided)]
  if cfg_scale != 1.0 and config.eval.unguided:
    runs.append(("unguided", dict(guided, cfg_scale=1.0)))
  return runs


def sample_images(generator, config, params, conditions, batch: int, name: str
                  ) -> tuple[np.ndarray, int]:
  """(uint8 images for `conditions` from config.seed, how many samples were not finite)."""
  start = time.time()
  log = lambda done, total: logging.info("eval %s: %d/%d samples (%.1f s)", name, done, total,
                                         time.time() - start)
  _, samples = generator.generate_all(params, config.seed, conditions, batch, progress=log)
  bad = int(np.sum(~np.isfinite(samples).all(axis=(1, 2, 3))))
  samples = np.nan_to_num(samples, nan=-1.0, posinf=1.0, neginf=-1.0)
  return sampling.to_uint8(samples), bad


class GuidanceRuns:
  """A demo judge's samples: one generator per guidance run (`guidance_runs`), each run
  sampled from config.seed's noise and scored."""

  def __init__(self, config, runs: list[tuple[str, dict]], mesh, empty_embedding=None):
    self.config, self.runs = config, runs
    self.batch = check_count("batch_size", config.eval.batch_size, 1)
    self.generators = [sampling.Generator(config, cfg, mesh, empty_embedding=empty_embedding)
                       for _, cfg in runs]

  def judge(self, params, conditions, score: Callable[[np.ndarray], dict]
            ) -> tuple[dict, np.ndarray]:
    """({run name: score(uint8 images) with cfg_scale, non_finite_samples, seconds, cost},
    the first run's images)."""
    results, first = {}, None
    for (name, cfg), generator in zip(self.runs, self.generators):
      t0 = time.time()
      images, bad = sample_images(generator, self.config, params, conditions, self.batch, name)
      if bad:
        logging.warning("eval %s: %d of %d samples are not finite (scored as black images)",
                        name, bad, len(images))
      first = images if first is None else first
      results[name] = dict(score(images), cfg_scale=float(cfg.get("cfg_scale", 1.0)),
                           non_finite_samples=bad, seconds=round(time.time() - t0, 2),
                           cost=generator.last_cost)
      logging.info("eval %s (cfg_scale %g): %s (%s)", name, results[name]["cfg_scale"],
                   ", ".join(f"{k} {v:.4f}" for k, v in results[name].items()
                             if k.endswith(("accuracy", "distance")) and v is not None),
                   cost_lib.describe(generator.last_cost))
    return results, first


def write_eval_file(workdir: str, summary: dict):
  """`<workdir>/eval.json` (host 0)."""
  if jax.process_index() == 0:
    fileio.atomic_write_bytes(fileio.join(workdir, EVAL_FILE),
                              json.dumps(summary, indent=2).encode())


# ------------------------------------------------------------------ the training hook


def check_demo_eval(config, model, objective, workdir: str) -> list[tuple[str, dict]]:
  """Checks `config.eval` against the run; returns the (name, sample config) runs to judge.

  Cheap and without side effects: call it when training starts, so that a run whose
  evaluation cannot work fails then rather than after training.
  """
  problems = []
  if config.data.source != "embedded":
    problems.append(f"config.data.source={config.data.source!r} (needs 'embedded')")
  if model.in_channels != IMAGE_SHAPE[-1] or config.image_size != IMAGE_SHAPE[0]:
    problems.append(f"images {config.image_size}x{config.image_size}x{model.in_channels} "
                    f"(needs 32x32x1)")
  if model.num_classes != NUM_CLASSES:
    problems.append(f"num_classes={model.num_classes} (needs {NUM_CLASSES})")
  if "://" in workdir:
    problems.append(f"workdir {workdir!r} (needs a local directory)")
  if problems:
    raise ValueError("the demo evaluation judges samples of the embedded MNIST digits only; "
                     "this run has " + ", ".join(problems) + ". Set config.eval.enabled=False.")
  check_count("num_samples", config.eval.num_samples, 2)   # a covariance needs 2
  check_count("batch_size", config.eval.batch_size, 1)
  runs = guidance_runs(config)
  null = conditions.condition_of(model).null
  for _, cfg in runs:
    objective.make_sampler(cfg, null)  # raises on bad sampler settings
  return runs


def run_demo_eval(config, model, objective, ema_params, mesh, workdir: str, writer,
                  step: int) -> dict:
  """Samples, judges and records the demo model at the end of training (`config.eval`).

  config.eval: num_samples (>= 2), batch_size, sampler overrides (sampler, steps,
  cfg_scale; the others come from config.preview) and unguided (True also judges
  cfg_scale=1 samples from the same noise, unless cfg_scale is 1). Writes
  `<workdir>/eval.json` (host 0) and `eval/*` scalars; returns what eval.json holds.
  """
  started = time.time()
  runs = check_demo_eval(config, model, objective, workdir)
  num_samples = int(config.eval.num_samples)
  sampled = GuidanceRuns(config, runs, mesh)
  judge = load_or_train_classifier(workdir)
  reference = judge.real_reference(num_samples)
  labels = balanced_labels(num_samples)
  results, _ = sampled.judge(ema_params, labels, lambda images: judge.score(images, labels))

  first = results[runs[0][0]]
  summary = dict(
      step=int(step),
      accuracy=first["accuracy"],
      frechet_distance=first["frechet_distance"],
      num_samples=num_samples,
      cost=first["cost"],
      **results,
      reference=reference,
      sampler=provenance.as_json(runs[0][1]),
      classifier=dict(directory=judge.directory, trained_now=judge.trained,
                      test_accuracy=judge.info["test_accuracy"],
                      train_seconds=judge.info.get("train_seconds")),
      seconds=round(time.time() - started, 2),
  )
  logging.info("eval at step %d: accuracy %.4f, Frechet distance %.3f (real digits: accuracy "
               "%.4f, distance %.3f)", step, summary["accuracy"], summary["frechet_distance"],
               reference["classifier_test_accuracy"], reference["frechet_distance_train_vs_test"])
  scalars = {"eval/accuracy": summary["accuracy"],
             "eval/frechet_distance": summary["frechet_distance"],
             "eval/real_accuracy": reference["classifier_test_accuracy"],
             "eval/real_frechet_distance": reference["frechet_distance_train_vs_test"]}
  if "unguided" in results:
    scalars["eval/unguided_accuracy"] = results["unguided"]["accuracy"]
    scalars["eval/unguided_frechet_distance"] = results["unguided"]["frechet_distance"]
  writer.write_scalars(step, scalars)
  write_eval_file(workdir, summary)
  return summary


class DemoJudge:
  """The training hook: `run_demo_eval` with the run's EMA params (config.eval.kind='demo')."""

  def __init__(self, config, mesh, workdir: str):
    self.config, self.mesh, self.workdir = config, mesh, workdir
    self.model, self.objective = FCDM(**config.model), make_objective(config)
    self.every_steps = int(config.eval.every_steps)
    check_demo_eval(config, self.model, self.objective, workdir)

  def __call__(self, step: int, ema_params, writer) -> dict:
    return run_demo_eval(self.config, self.model, self.objective, ema_params, self.mesh,
                         self.workdir, writer, step)
