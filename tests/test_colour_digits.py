"""The text-to-image demo's data and judge: held-out phrasings are never trained on, the
prepared folder (text encoder trained here, caption embeddings) is what the run reads and
is refused when made otherwise, the judge scores real colour digits high and wrong prompts
low, and a short run of configs/t2i_demo.py writes its judgement and prompt grid."""

import json
import os

import numpy as np
import pytest

from fcdm_jax.demo import colour_digits as cd
from fcdm_jax.data.captions import CaptionTable
from fcdm_jax.data.embedded import load_embedded
from fcdm_jax.demo import colour_digit_judge as colour_digit_eval
from fcdm_jax.models.text_encoder import load_text_encoder
from helpers.training import TESTS, load_config, seed_classifier

CONFIG = TESTS.parent / "configs" / "t2i_demo.py"


def test_one_phrasing_of_each_pair_is_held_out():
  held = cd.held_out_prompts()
  assert len(held) == len(cd.DIGITS) * len(cd.COLOURS) == len(set(p for p, _, _ in held))
  trained = {t for d in range(10) for c in range(6) for t in cd.training_captions(d, c)}
  assert len(trained) == 60 * (len(cd.TEMPLATES) - 1)
  assert not trained & {p for p, _, _ in held}
  # every phrasing is held out for some pairs and trained with the others
  counts = np.bincount([cd.held_out_template(d, c) for d in range(10) for c in range(6)])
  np.testing.assert_array_equal(counts, [10] * len(cd.TEMPLATES))
  for prompt, d, c in held:
    assert cd.DIGITS[d] in prompt and cd.COLOUR_NAMES[c] in prompt


def test_colours_keep_the_grey_digit_and_the_judge_reads_the_colour():
  grey, _ = load_embedded("test")
  colours = np.arange(len(grey)) % len(cd.COLOURS)
  images = np.round(cd.colourise(grey, colours) * 255).astype(np.uint8)
  np.testing.assert_array_equal(colour_digit_eval.grey_of(images), grey)
  np.testing.assert_array_equal(colour_digit_eval.read_colours(images), colours)
  assert colour_digit_eval.read_colours(np.zeros((2, 32, 32, 3), np.uint8)).tolist() == [-1, -1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, digit_classifier):
  """configs/t2i_demo.py for 8 steps on a data folder that does not exist yet (the run
  prepares it, as a first run does): (data folder, workdir)."""
  from fcdm_jax.evaluation import make_evaluators
  from fcdm_jax.train.loop import train_and_evaluate
  base = tmp_path_factory.mktemp("colour_digits")
  path, workdir = str(base / "prepared"), str(base / "run")
  config = load_config(CONFIG, **{"data.path": path, "num_train_steps": 8,
                                  "optimizer.warmup_steps": 2, "checkpoint_every_steps": 8,
                                  "preview.every_steps": 0, "eval.steps": 2,
                                  "eval.num_samples": 60, "eval.batch_size": 64,
                                  "batch_size": 8})
  seed_classifier(digit_classifier, workdir)
  train_and_evaluate(config, workdir, make_evaluators=make_evaluators)
  return path, workdir


@pytest.fixture(scope="module")
def prepared(demo_run):
  path, _ = demo_run
  with open(os.path.join(path, cd.MARKER)) as f:
    return path, json.load(f)


@pytest.mark.slow
def test_prepared_folder_trains_an_encoder_that_reads_unseen_phrasings(prepared):
  path, marker = prepared
  assert marker["text_encoder"]["held_out_accuracy"] >= 0.95
  assert marker["held_out_prompts"] == [p for p, _, _ in cd.held_out_prompts()]
  table = CaptionTable(os.path.join(path, "captions"), num_examples=24000, dim=cd.TEXT_DIM)
  _, labels = load_embedded("train")
  k = 6 * 123 + 4   # image 123 in colour 4
  texts = table.texts()
  mine = texts[table.offsets[k]:table.offsets[k + 1]]
  assert mine == cd.training_captions(int(labels[123]), 4)
  encoder = load_text_encoder(os.path.join(path, "text_encoder"), cd.POOLING)
  np.testing.assert_allclose(table.embeddings[table.offsets[k]], encoder.encode(mine[:1])[0],
                             atol=1e-5)
  assert cd.prepare(path) == marker                 # kept as it is
  recipe = dict(cd.RECIPE)
  try:
    cd.RECIPE["steps"] += 1
    with pytest.raises(ValueError, match="prepared with another recipe"):
      cd.prepare(path)
  finally:
    cd.RECIPE.clear()
    cd.RECIPE.update(recipe)


@pytest.mark.slow
def test_judge_scores_real_digits_high_and_wrong_prompts_low(tmp_path, digit_classifier):
  seed_classifier(digit_classifier, tmp_path)
  judge = colour_digit_eval.ColourDigitJudge(str(tmp_path))
  assert not judge.digits.trained   # the shared cache was used
  real = judge.real_reference(240)
  assert real["accuracy"] >= 0.95 and real["colour_accuracy"] == 1.0
  assert real["frechet_distance_num_train_images"] == 240
  assert 0 < real["frechet_distance_train_vs_test"] < 20
  grey, labels = load_embedded("test")
  colours = np.arange(len(grey)) % 6
  images = np.round(cd.colourise(grey, colours) * 255).astype(np.uint8)
  rng = np.random.default_rng(0)
  wrong = judge.score(images, rng.permutation(labels), rng.permutation(colours))
  assert wrong["accuracy"] < 0.1 and wrong["colour_accuracy"] < 0.3
  noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
  assert judge.score(noise, labels, colours)["accuracy"] < 0.1


@pytest.mark.slow
def test_short_demo_run_writes_its_judgement_and_grid(demo_run):
  _, workdir = demo_run
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert result["samples_per_prompt"] == 1 and len(result["prompts"]) == 60
  for run in ("guided", "unguided"):
    for key in ("accuracy", "digit_accuracy", "colour_accuracy"):
      assert 0.0 <= result[run][key] <= 1.0
    assert result[run]["num_samples"] == 60
  assert result["guided"]["cfg_scale"] == 4.0 and result["unguided"]["cfg_scale"] == 1.0
  assert result["reference"]["accuracy"] >= 0.95
  from PIL import Image
  grid = np.asarray(Image.open(os.path.join(workdir, "eval_grid.png")))
  assert grid.shape == (10 * 33 - 1, 32, 3)   # one row per digit, one sample each
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))
