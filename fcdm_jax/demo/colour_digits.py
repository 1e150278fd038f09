"""The text-to-image demo's data: the embedded digits in colour, with captions, and the small
text encoder that reads them. Nothing comes from outside the package.

Images. Every train digit of the embedded MNIST-5k (`data/embedded.py`) appears in each of
the `COLOURS`: ink = the digit's grey level times the colour, on black, 32x32x3; 4,000 x 6 =
24,000 examples, made per batch from the grey digits (nothing stored). Every colour has a
channel at full strength, so the grey digit is the image's per-pixel maximum (how the
demo's judge reads the digit back, `demo/colour_digit_judge.py`).

Captions. `TEMPLATES` phrase a (colour, digit) pair six ways. For each of the 60 pairs one
phrasing is held out: it is never a training caption, and these 60 unseen prompts are what
the demo is judged on (each phrasing is seen with other pairs and each pair with the other
phrasings). An example's captions are its pair's other five phrasings.

Text encoder. A CLIP-architecture text tower (`models/clip_text.py`: width 64, 2 layers,
77 tokens, a BPE vocabulary learned from the captions) trained here for a few seconds to
name the digit and the colour of the training captions: its `text_projection` (16 wide,
no bias, as CLIP's) is trained as the 10 digit and 6 colour logits (cross-entropy with
label smoothing, which keeps them moderate; the empty caption is trained to uniform
logits, so guidance's unconditional input says nothing). Why trained rather than random and frozen: a
random tower maps an unseen phrasing to a point with no relation to the phrasings it was
trained with, while this one maps "a handwritten seven coloured red" where the other
captions of a red seven go. The run conditions on the projected embedding
(`data.text_pooling='projected'`): what a caption says, not how it says it, as CLIP's
projection is meant to be. The tower's accuracy on the held-out phrasings is recorded.

The prepared folder (`prepare(path)`, or `python -m fcdm_jax.demo.prepare`; the data
source prepares it on first use; the default path is `~/.cache/fcdm_jax/colour_digits-v2`
(v = the recipe's version), or `$FCDM_JAX_CACHE/colour_digits-v2`):

  text_encoder/        a transformers CLIPTextModel folder with its tokenizer files
  captions/            the caption folder of the 24,000 examples (`data/captions.py`)
  colour_digits.json   written last: the recipe, the held-out prompts, the encoder's scores
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fcdm_jax import fileio, provenance
from fcdm_jax.data import pipeline
from fcdm_jax.data.captions import SUBFOLDER, write_captions
from fcdm_jax.data.embedded import load_embedded
from fcdm_jax.models import clip_tokenizer
from fcdm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, save_clip_text
from fcdm_jax.models.text_encoder import load_text_encoder

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0)}
COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.asarray(list(COLOURS.values()), np.float32)   # (6, 3)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a {colour} {digit}", "the digit {digit} in {colour}", "a {colour} number {digit}",
             "{digit}, written in {colour} ink", "a handwritten {digit} coloured {colour}",
             "{colour} {digit} on black")
IMAGE_SHAPE = (32, 32, 3)
MARKER = "colour_digits.json"
FORMAT = "fcdm_jax.colour_digits"
# Everything that decides the prepared folder's contents; another recipe is refused.
RECIPE = dict(version=2, seed=0, width=64, layers=2, heads=4, intermediate=128, merges=200,
              steps=150, learning_rate=3e-3, weight_decay=0.01, label_smoothing=0.1)
POOLING = "projected"   # the run's data.text_pooling (configs/t2i_demo.py)
TEXT_DIM = len(DIGITS) + len(COLOURS)   # the projection: digit logits, then colour logits


def default_path() -> str:
  root = os.environ.get("FCDM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "fcdm_jax")
  return fileio.join(root, f"colour_digits-v{RECIPE['version']}")


def resolve_path(path: str) -> str:
  return path or default_path()


def caption(template: int, colour: int, digit: int) -> str:
  return TEMPLATES[template].format(colour=COLOUR_NAMES[colour], digit=DIGITS[digit])


def held_out_template(digit: int, colour: int) -> int:
  """The phrasing of (digit, colour) that is never trained on."""
  return (digit + colour) % len(TEMPLATES)


def held_out_prompts() -> list[tuple[str, int, int]]:
  """(prompt, digit, colour) of the 60 held-out phrasings, digit-major."""
  return [(caption(held_out_template(d, c), c, d), d, c)
          for d in range(len(DIGITS)) for c in range(len(COLOURS))]


def training_captions(digit: int, colour: int) -> list[str]:
  held = held_out_template(digit, colour)
  return [caption(t, colour, digit) for t in range(len(TEMPLATES)) if t != held]


def colourise(grey: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """uint8 grey digits (n, 32, 32, 1) and colour indices (n,) -> float32 [0, 1] RGB."""
  return (grey.astype(np.float32) / 255.0) * PALETTE[np.asarray(colours)][:, None, None, :]


def example_of(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(grey image index, colour index) of dataset examples: example k = image k // 6 in colour k % 6."""
  indices = np.asarray(indices)
  return indices // len(COLOURS), indices % len(COLOURS)


# ------------------------------------------------------------------------ the text encoder


def _encoder_config(vocab_size: int, eos_id: int):
  r = RECIPE
  return CLIPTextConfig(vocab_size=vocab_size, hidden_size=r["width"],
                        intermediate_size=r["intermediate"], num_hidden_layers=r["layers"],
                        num_attention_heads=r["heads"], max_position_embeddings=77,
                        eos_token_id=eos_id, projection_dim=TEXT_DIM)


def train_text_encoder(tokenizer, config, texts, digits, colours, held_out) -> tuple[dict, dict]:
  """(params, scores): the tower trained on `texts` so that its projected embedding is the
  digit logits then the colour logits of the caption; scores = their accuracy on the
  training and the held-out captions."""
  model = CLIPTextModel(config)
  # The pooled state is read at the end-of-text token and attention is causal, so the
  # padding after it changes nothing: train on the captions' own length, not 77.
  everything = tokenizer(list(texts) + [p for p, _, _ in held_out])
  length = int(np.max(np.argmax(everything == tokenizer.eos_id, axis=1))) + 1
  tokens = lambda x: jnp.asarray(tokenizer(x)[:, :length])
  # The empty caption (guidance's unconditional input) is trained to say nothing, uniform
  # logits, as a tenth of the batch (the run's caption dropout).
  empties = max(1, len(texts) // 10)
  ids = tokens(list(texts) + [""] * empties)

  def target(labels, n):
    smoothed = optax.smooth_labels(jax.nn.one_hot(jnp.asarray(labels), n),
                                   RECIPE["label_smoothing"])
    return jnp.concatenate([smoothed, jnp.full((empties, n), 1.0 / n)])

  targets = target(digits, len(DIGITS)), target(colours, len(COLOURS))
  params = model.init(jax.random.PRNGKey(RECIPE["seed"]), ids[:1])

  def logits(p, x):
    h = model.apply(p, x).text_embeds
    return h[:, :len(DIGITS)], h[:, len(DIGITS):]

  def loss_fn(p):
    digit_logits, colour_logits = logits(p, ids)
    return (optax.softmax_cross_entropy(digit_logits, targets[0]).mean()
            + optax.softmax_cross_entropy(colour_logits, targets[1]).mean())

  tx = optax.adamw(optax.cosine_decay_schedule(RECIPE["learning_rate"], RECIPE["steps"]),
                   weight_decay=RECIPE["weight_decay"])
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  for _ in range(RECIPE["steps"]):
    params, opt, loss = step(params, opt)

  def accuracy(x, d, c):
    dl, cl = jax.jit(logits)(params, tokens(x))
    return float(np.mean((np.argmax(dl, -1) == np.asarray(d)) & (np.argmax(cl, -1) == np.asarray(c))))

  held_texts, held_digits, held_colours = zip(*held_out)
  scores = dict(final_loss=float(loss), train_accuracy=accuracy(texts, digits, colours),
                held_out_accuracy=accuracy(list(held_texts), held_digits, held_colours))
  return params, scores


# ----------------------------------------------------------------------- the prepared folder


def _read_marker(path: str) -> dict | None:
  marker = fileio.join(path, MARKER)
  if not fileio.isfile(marker):
    return None
  try:
    return json.loads(fileio.read_text(marker))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{marker} is unreadable ({e}); move the folder {path} aside and it "
                     "will be prepared again") from e


def prepare(path: str = "") -> dict:
  """Makes (or checks) the prepared folder at `path`; returns its colour_digits.json."""
  path = resolve_path(path)
  marker = _read_marker(path)
  if marker is not None:
    provenance.refuse_changes(marker.get("recipe") or {}, provenance.as_json(RECIPE),
                            f"{path} was prepared with another recipe",
                            "use another config.data.path, or move that folder aside")
    return marker
  started = time.time()
  logging.info("colour digits: preparing %s (text encoder and captions)", path)
  pairs = [(d, c) for d in range(len(DIGITS)) for c in range(len(COLOURS))]
  texts = [t for d, c in pairs for t in training_captions(d, c)]
  digits = [d for d, c in pairs for _ in training_captions(d, c)]
  colours = [c for d, c in pairs for _ in training_captions(d, c)]
  encoder_dir = fileio.join(path, "text_encoder")
  merges = clip_tokenizer.learn_merges(texts, RECIPE["merges"])
  vocab = clip_tokenizer.write_tokenizer_folder(encoder_dir, merges)
  tokenizer = clip_tokenizer.load_clip_tokenizer(encoder_dir)
  config = _encoder_config(len(vocab), tokenizer.eos_id)
  params, scores = train_text_encoder(tokenizer, config, texts, digits, colours,
                                      held_out_prompts())
  save_clip_text(encoder_dir, config, params, pad_token_id=tokenizer.pad_id,
                 bos_token_id=tokenizer.bos_id)
  logging.info("colour digits: text encoder trained (held-out caption accuracy %.3f)",
               scores["held_out_accuracy"])
  _, labels = load_embedded("train")
  image, colour = example_of(np.arange(len(labels) * len(COLOURS)))
  captions = [training_captions(int(labels[i]), int(c)) for i, c in zip(image, colour)]
  write_captions(fileio.join(path, SUBFOLDER), captions,
                 load_text_encoder(encoder_dir, POOLING))
  marker = dict(format=FORMAT, recipe=provenance.as_json(RECIPE), text_encoder=scores,
                held_out_prompts=[p for p, _, _ in held_out_prompts()],
                num_examples=len(captions), seconds=round(time.time() - started, 2))
  fileio.atomic_write_bytes(fileio.join(path, MARKER), json.dumps(marker, indent=1).encode())
  return marker


class ColourDigitsSource(pipeline.Source):
  """Training batches of the colour digits in pixel space ([-1, 1], 32x32x3); the captions
  (and so y) come from the prepared folder's caption table, attached by `make_source`."""

  def __init__(self, path: str, *, expected_shape, num_classes: int, **kwargs):
    del num_classes   # text-conditioned: there are no class labels
    self.path = resolve_path(path)
    if _read_marker(self.path) is None and kwargs.get("process_count", 1) > 1:
      raise FileNotFoundError(f"{self.path} is not prepared; prepare it once before a "
                              "multi-process run: python -m fcdm_jax.demo.prepare "
                              f"--path={self.path}")
    prepare(self.path)   # makes the folder, or checks its recipe
    self.grey, self.labels = load_embedded("train")
    where = f"the colour digits ({self.path})"
    pipeline.check_element_shape(
        IMAGE_SHAPE, expected_shape, where,
        f"config.image_size={expected_shape[0]}, config.model.in_channels={expected_shape[2]}")
    super().__init__(element_shape=IMAGE_SHAPE, num_classes=0,
                     num_examples=len(self.labels) * len(COLOURS), description=where, **kwargs)

  @classmethod
  def from_config(cls, data, **common):
    return cls(data.get("path", ""), **common)

  @classmethod
  def caption_folder(cls, data) -> str:
    """The prepared folder's captions."""
    return fileio.join(resolve_path(data.get("path", "")), SUBFOLDER)

  def _load(self, indices, flips):
    image, colour = example_of(indices)
    x = colourise(self.grey[image], colour) * 2.0 - 1.0
    x[flips] = x[flips, :, ::-1]
    return {"x": x, "y": np.zeros(len(indices), np.int32)}
