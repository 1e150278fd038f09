"""CLIP score of text-to-image samples: how well each image shows its prompt, as judged by
a whole CLIP model (both towers and both projections) from one local folder.

    score(image, prompt) = max(100 * cos(image_embeds, text_embeds), 0)

Hessel et al.'s CLIPScore with w = 100, the definition torchmetrics documents; torchmetrics
itself clamps the mean of the raw scores rather than each score, which gives the same mean
unless some cosine is negative (rare for a trained CLIP). Images go through
`clip_vision.preprocess` (PIL bicubic, as transformers' PIL processor), prompts through
our CLIP tokenizer: 77 tokens, longer prompts cut before the end-of-text token as Stable
Diffusion cuts them (torchmetrics cuts the row after 77 tokens, end-of-text included).

    scorer = CLIPScorer("/path/to/clip-vit-large-patch14")
    result = scorer.score(images_uint8, prompts)   # result.per_image (N,), result.mean

The folder is a transformers `CLIPModel` one: config.json with `text_config` and
`vision_config`, model.safetensors (or pytorch_model.bin), and the tokenizer's vocab.json
and merges.txt. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcdm_jax.models import clip_text, clip_vision
from fcdm_jax.models.clip_tokenizer import load_clip_tokenizer

WEIGHT = 100.0   # CLIPScore's w


class CLIPScores(NamedTuple):
  """`per_image` float32 (N,), each image's score against its own prompt; `mean`, theirs."""
  per_image: np.ndarray
  mean: float


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScorer:
  """`score(images, prompts)` -> CLIPScores, from a local whole-CLIPModel folder.

  One jitted program scores a batch; the last batch is padded to the same size, so a run
  compiles once per batch size (min(batch, N)). `dtype` is the towers' compute dtype (float32 by default).
  """

  def __init__(self, path: str, dtype: Any = jnp.float32):
    config_path, _ = clip_vision.find_clip_vision_files(path)
    raw = clip_vision.read_config(config_path)
    if "vision_config" not in raw or "text_config" not in raw:
      raise ValueError(f"{config_path} is not a whole CLIPModel's config (model_type "
                       f"{raw.get('model_type')!r}, no text_config and vision_config): the "
                       "CLIP score needs one folder with both towers and both projections, "
                       "as openai/clip-vit-large-patch14 ships")
    self.vision, self.vision_params = clip_vision.load_clip_vision(path, dtype)
    self.text, self.text_params = clip_text.load_clip_text(path, dtype)
    self.tokenizer = load_clip_tokenizer(path, self.text.config.max_position_embeddings)
    self._check_tokenizer(path)
    self._batch_scores = jax.jit(self._scores)

  def _check_tokenizer(self, path: str) -> None:
    """The tokenizer must be the text tower's: ids within its table, and the end-of-text id
    it pools at (unless the legacy rule, the largest id, applies)."""
    cfg, tok = self.text.config, self.tokenizer
    largest = max(tok.vocab.values())
    if largest >= cfg.vocab_size:
      raise ValueError(f"{path}: the tokenizer has ids up to {largest} but the text encoder "
                       f"has vocab_size {cfg.vocab_size}: tokenizer and model do not belong "
                       "together")
    if cfg.eos_token_id != clip_text.LEGACY_EOS_TOKEN_ID and cfg.eos_token_id != tok.eos_id:
      raise ValueError(f"{path}: the tokenizer's end-of-text id is {tok.eos_id} but the text "
                       f"encoder pools at eos_token_id {cfg.eos_token_id}")

  def _scores(self, vision_params, text_params, pixel_values, input_ids):
    image = self.vision.apply(vision_params, pixel_values).image_embeds
    text = self.text.apply(text_params, input_ids).text_embeds
    cosine = jnp.sum(_unit(image) * _unit(text), axis=-1)
    return jnp.maximum(WEIGHT * cosine, 0.0)

  def score(self, images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str],
            batch: int = 64) -> CLIPScores:
    """images uint8 (N, H, W, 3) (or N arrays (H, W, 3) of any sizes), prompts N strings,
    image i scored against prompt i; `batch` images go through the towers at a time."""
    if isinstance(prompts, str):
      raise TypeError("prompts must be a sequence of strings, one per image, not one string")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
      raise ValueError(f"batch must be a positive integer, got {batch!r}")
    n = len(images)
    if n == 0:
      raise ValueError("no images to score")
    if len(prompts) != n:
      raise ValueError(f"{n} images but {len(prompts)} prompts: one prompt per image")
    batch = min(batch, n)
    size = self.vision.config.image_size
    out = np.empty(n, np.float32)
    for start in range(0, n, batch):
      stop = min(start + batch, n)
      pixels = clip_vision.preprocess(images[start:stop], size)
      ids = self.tokenizer(list(prompts[start:stop]))
      pad = batch - (stop - start)
      if pad:
        pixels = np.concatenate([pixels, np.zeros((pad,) + pixels.shape[1:], pixels.dtype)])
        ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
      scores = self._batch_scores(self.vision_params, self.text_params, pixels, ids)
      out[start:stop] = np.asarray(scores)[:stop - start]
    return CLIPScores(out, float(out.mean()))
