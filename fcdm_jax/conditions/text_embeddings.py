"""Text conditioning: y is one pooled text embedding (text_dim,) per sample (CLIP's, say),
projected per level by the model's text embedder; guidance uses the empty caption's
embedding, what the model was trained with for dropped captions."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class TextEmbeddings:
  """The text condition kind; an instance is a model's (its width and null embedding)."""
  dim: int
  null: np.ndarray

  name: ClassVar[str] = "text"
  uses_captions: ClassVar[bool] = True   # the data pipeline feeds caption embeddings

  # --- the model's side (static: they take the FCDM module) ---------------------------
  @staticmethod
  def y_spec(model, batch: int) -> tuple[tuple[int, ...], jnp.dtype]:
    """(shape, dtype) of y for a batch."""
    return (batch, model.text_dim), jnp.float32

  @staticmethod
  def has_null(model) -> bool:
    """A text model is guided with the empty caption's embedding: always possible."""
    del model
    return True

  @staticmethod
  def check_y(model, y, n: int) -> None:
    """y (N, text_dim) floats."""
    if y.shape != (n, model.text_dim) or not jnp.issubdtype(y.dtype, jnp.floating):
      hint = " (class labels? this model has condition='text')" if y.ndim == 1 else ""
      raise ValueError(f"condition='text' takes y as ({n}, text_dim={model.text_dim}) float "
                       f"pooled text embeddings, got {y.dtype} of shape {y.shape}{hint}")

  @staticmethod
  def torch_text_embedder(model) -> str:
    """The PyTorch layout's condition embedder: the model's text embedder ('linear', 'mlp')."""
    return model.text_embedder

  # --- sampling's side (an instance) ------------------------------------------------
  @classmethod
  def of(cls, model, empty_embedding=None) -> "TextEmbeddings":
    if empty_embedding is None:
      raise ValueError("a text-conditioned model samples with the empty caption's embedding "
                       "as its guidance null: pass empty_embedding (the run's captions hold it)")
    null = np.asarray(empty_embedding, np.float32)
    if null.shape != (int(model.text_dim),):
      raise ValueError(f"the empty caption's embedding has shape {null.shape}; the model takes "
                       f"text_dim={model.text_dim}")
    return cls(int(model.text_dim), null)

  def check(self, values) -> np.ndarray:
    """Given embeddings as float32 (N, dim); ValueError for other shapes or non-finite ones."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != self.dim or \
       not np.issubdtype(values.dtype, np.floating):
      raise ValueError(f"text conditions must be float embeddings of shape (N, {self.dim}), "
                       f"got {values.dtype} {values.shape}")
    if not np.all(np.isfinite(values)):
      raise ValueError("text embeddings have non-finite values")
    return values.astype(np.float32)

  def pad(self, values: np.ndarray, size: int) -> np.ndarray:
    """`values` filled up to `size` samples with the null (the padding's samples are dropped)."""
    out = np.broadcast_to(self.null, (size, self.dim)).copy()
    out[:len(values)] = values
    return out

  def abstract(self, size: int, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((size, self.dim), jnp.float32, sharding=sharding)

  def key(self) -> str:
    """What a compiled sampler depends on beyond the model config: the null embedding."""
    return hashlib.sha256(self.null.tobytes()).hexdigest()
