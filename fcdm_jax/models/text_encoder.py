"""Prompts -> pooled text embeddings, the condition of a text-conditioned FCDM.

One object serves every place a caption becomes a vector: precomputing the captions of a
dataset (`fcdm_jax.data.captions.write_captions`), the empty caption that guidance and
caption dropout use, and the sampling CLI's `--prompt`. The CLIP text tower and its
tokenizer come from one local Hugging Face folder (`models/clip_text.py`,
`models/clip_tokenizer.py`); `pooling` picks the pooled state at the end-of-text token
('pooled') or its `text_projection` ('projected').
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from fcdm_jax import fileio
from fcdm_jax.models.clip_text import find_clip_text_files, load_clip_text
from fcdm_jax.models.clip_tokenizer import load_clip_tokenizer

POOLINGS = ("pooled", "projected")


class TextEncoder:
  """`encode(prompts)` -> float32 (N, dim): the tokenizer and the CLIP text model, jitted."""

  def __init__(self, model, params, tokenizer, pooling: str = "pooled", identity=None):
    if pooling not in POOLINGS:
      raise ValueError(f"unknown text pooling {pooling!r}; expected one of {POOLINGS}")
    if pooling == "projected" and not model.config.projection_dim:
      raise ValueError("pooling='projected' needs a text_projection, which this CLIP text "
                       "model does not have; use pooling='pooled'")
    self.model, self.params, self.tokenizer, self.pooling = model, params, tokenizer, pooling
    self.identity = dict(identity or {}, pooling=pooling)
    pick = (lambda out: out.text_embeds) if pooling == "projected" else (lambda out: out.pooled)
    self._encode = jax.jit(lambda p, ids: pick(model.apply(p, ids)))

  @property
  def dim(self) -> int:
    c = self.model.config
    return int(c.projection_dim if self.pooling == "projected" else c.hidden_size)

  def encode(self, prompts: Sequence[str], batch: int = 256) -> np.ndarray:
    """Pooled embeddings of `prompts`, in batches of `batch` (the last one padded)."""
    prompts = list(prompts)
    if not prompts:
      return np.zeros((0, self.dim), np.float32)
    out = []
    for start in range(0, len(prompts), batch):
      chunk = prompts[start:start + batch]
      ids = self.tokenizer(chunk + [""] * (min(batch, len(prompts)) - len(chunk)))
      out.append(np.asarray(self._encode(self.params, ids), np.float32)[:len(chunk)])
    return np.concatenate(out)

  def empty(self) -> np.ndarray:
    """The empty caption's embedding (dim,): the unconditional input."""
    return self.encode([""])[0]


def load_text_encoder(path: str, pooling: str = "pooled") -> TextEncoder:
  """The text encoder of a local Hugging Face CLIP folder (weights and tokenizer files)."""
  model, params = load_clip_text(path)
  _, weights = find_clip_text_files(path)
  identity = {"path": fileio.absolute(path), "weights_sha256": fileio.sha256_file(weights)}
  return TextEncoder(model, params, load_clip_tokenizer(path), pooling, identity)
