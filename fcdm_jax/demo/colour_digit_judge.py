"""Judges the text-to-image demo: samples for prompts the model never trained on, scored for
the digit and the colour they name.

The prompts are the 60 held-out phrasings of `demo/colour_digits.py` (one per digit and
colour; the model trained on the other phrasings of each pair). Each sample is read back
two ways:
  digit   the demo's digit classifier (`demo/digit_judge.py`, cached in the workdir) on the
          sample's per-pixel maximum over channels, which is the grey digit for every
          colour of the palette;
  colour  the mean colour of the sample's ink pixels (maximum > 0.5), scaled to a full
          channel, matched to the nearest palette colour.
A sample is right when both are. The same noise is sampled with guidance
(`config.eval.cfg_scale`) and without (cfg_scale 1, when `config.eval.unguided`), and
real colourised test digits give the ceiling. Writes `<workdir>/eval.json` (each run with its
cost: network evaluations per image, `sampling.cost`), `eval/*`
scalars, and `<workdir>/eval_grid.png`: one row per digit, its prompt's samples.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from fcdm_jax import conditions, fileio, provenance
from fcdm_jax.data.captions import CaptionTable, caption_folder
from fcdm_jax.data.embedded import load_embedded
from fcdm_jax.demo import colour_digits
from fcdm_jax.demo import digit_judge
from fcdm_jax.evaluation.registry import check_count
from fcdm_jax.models.text_encoder import load_text_encoder
from fcdm_jax.images import image_grid

GRID_FILE = "eval_grid.png"
INK = 0.5   # a pixel whose brightest channel is above this is ink


def read_colours(images: np.ndarray) -> np.ndarray:
  """Palette index of each uint8 RGB image's ink (-1 when it has no ink)."""
  x = images.astype(np.float32) / 255.0
  ink = x.max(axis=-1, keepdims=True) > INK
  count = ink.sum(axis=(1, 2, 3))
  mean = (x * ink).sum(axis=(1, 2)) / np.maximum(count, 1)[:, None]
  mean = mean / np.maximum(mean.max(axis=-1, keepdims=True), 1e-6)
  nearest = np.argmin(((mean[:, None, :] - colour_digits.PALETTE[None]) ** 2).sum(-1), axis=1)
  return np.where(count > 0, nearest, -1)


def grey_of(images: np.ndarray) -> np.ndarray:
  """uint8 (n, 32, 32, 3) colour digits -> the grey digits (n, 32, 32, 1) the classifier reads."""
  return images.max(axis=-1, keepdims=True)


class ColourDigitJudge:
  """Digit and colour of uint8 RGB samples, against what their prompts asked for."""

  def __init__(self, workdir: str):
    self.digits = digit_judge.load_or_train_classifier(workdir)

  def score(self, images: np.ndarray, digits, colours) -> dict:
    digits, colours = np.asarray(digits), np.asarray(colours)
    if images.dtype != np.uint8 or images.shape[1:] != colour_digits.IMAGE_SHAPE:
      raise ValueError(f"colour digit samples must be uint8 (n, 32, 32, 3), got "
                       f"{images.dtype} {images.shape}")
    if not len(images) == len(digits) == len(colours):
      raise ValueError(f"{len(images)} images for {len(digits)} digits and {len(colours)} "
                       "colours")
    grey = grey_of(images)
    _, predicted = self.digits.predict(grey)
    digit_right = predicted == digits
    colour_right = read_colours(images) == colours
    fd = self.digits.score(grey, digits)["frechet_distance"] if len(images) > 1 else None
    return dict(accuracy=float(np.mean(digit_right & colour_right)),
                digit_accuracy=float(np.mean(digit_right)),
                colour_accuracy=float(np.mean(colour_right)),
                frechet_distance=fd, num_samples=int(len(images)))

  def real_reference(self, num_samples: int, seed: int = 0) -> dict:
    """What real digits score, each in a random palette colour: accuracy on the held-out
    test digits (a ceiling), and the Frechet distance of `num_samples` train digits to the
    test digits (a floor with the samples' small-sample bias, as in digit_judge)."""
    rng = np.random.default_rng(seed)
    colourise = lambda grey, colours: np.round(
        colour_digits.colourise(grey, colours) * 255).astype(np.uint8)
    grey, labels = load_embedded("test")
    colours = rng.integers(0, len(colour_digits.COLOURS), len(labels))
    real = self.score(colourise(grey, colours), labels, colours)
    grey, labels = load_embedded("train")
    pick = rng.choice(len(labels), min(int(num_samples), len(labels)), replace=False)
    colours = rng.integers(0, len(colour_digits.COLOURS), len(pick))
    train = self.score(colourise(grey[pick], colours), labels[pick], colours)
    return dict(real, frechet_distance=None,
                frechet_distance_train_vs_test=train["frechet_distance"],
                frechet_distance_num_train_images=int(len(pick)))


def prompt_grid(images: np.ndarray, per_prompt: int, num_colours: int) -> np.ndarray:
  """One row per digit (its samples for the prompt of colour digit % num_colours)."""
  rows = [images[(d * num_colours + d % num_colours) * per_prompt:][:per_prompt]
          for d in range(len(colour_digits.DIGITS))]
  return image_grid(np.concatenate(rows), len(rows))


class ColourDigitEvaluator:
  """The training hook (config.eval.kind='colour_digits'): held-out prompts, sampled with the
  EMA params with and without guidance, judged for digit and colour."""

  def __init__(self, config, mesh, workdir: str):
    problems = []
    if config.data.source != "colour_digits":
      problems.append(f"config.data.source={config.data.source!r} (needs 'colour_digits')")
    if not conditions.of_config(config).uses_captions:
      problems.append(f"a {conditions.of_config(config).name}-conditioned model (needs "
                      "model.condition='text')")
    if "://" in workdir:
      problems.append(f"workdir {workdir!r} (needs a local directory)")
    if problems:
      raise ValueError("the colour-digit evaluation judges a text-conditioned model of the "
                       "colour digits; this run has " + ", ".join(problems) +
                       ". Set config.eval.enabled=False.")
    self.config, self.workdir = config, workdir
    self.every_steps = int(config.eval.every_steps)
    self.prompts = colour_digits.held_out_prompts()
    self.per_prompt = max(1, check_count("num_samples", config.eval.num_samples, 2)
                          // len(self.prompts))
    folder = colour_digits.resolve_path(config.data.get("path", ""))
    colour_digits.prepare(folder)   # evaluators are built before the data: prepare it now
    self.encoder_dir = fileio.join(folder, "text_encoder")
    table = CaptionTable(caption_folder(config), dim=int(config.model.text_dim))
    encoder = load_text_encoder(self.encoder_dir, config.data.get("text_pooling", "pooled"))
    embeddings = encoder.encode([p for p, _, _ in self.prompts])
    self.conditions = np.repeat(embeddings, self.per_prompt, axis=0)
    self.digits = np.repeat([d for _, d, _ in self.prompts], self.per_prompt)
    self.colours = np.repeat([c for _, _, c in self.prompts], self.per_prompt)
    self.runs = digit_judge.guidance_runs(config)
    self.sampled = digit_judge.GuidanceRuns(config, self.runs, mesh, empty_embedding=table.empty)

  def __call__(self, step: int, ema_params, writer) -> dict:
    started = time.time()
    judge = ColourDigitJudge(self.workdir)
    results, first_images = self.sampled.judge(
        ema_params, self.conditions,
        lambda images: judge.score(images, self.digits, self.colours))
    reference = judge.real_reference(len(self.conditions))
    first = results[self.runs[0][0]]
    summary = dict(step=int(step), accuracy=first["accuracy"], cost=first["cost"], **results,
                   reference=reference,
                   prompts=[p for p, _, _ in self.prompts], samples_per_prompt=self.per_prompt,
                   text_encoder=self.encoder_dir, sampler=provenance.as_json(self.runs[0][1]),
                   seconds=round(time.time() - started, 2))
    scalars = {f"eval/{name}_{k}": r[k] for name, r in results.items()
               for k in ("accuracy", "digit_accuracy", "colour_accuracy")}
    scalars["eval/accuracy"] = first["accuracy"]
    scalars["eval/real_accuracy"] = reference["accuracy"]
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      grid = prompt_grid(first_images, self.per_prompt, len(colour_digits.COLOURS))
      fileio.write_png(fileio.join(self.workdir, GRID_FILE), grid)
      writer.write_images(step, {"eval_prompts": grid[None]})
    digit_judge.write_eval_file(self.workdir, summary)
    return summary
