"""Class conditioning (the published FCDM): y is one int32 label per sample; guidance uses
the null class, the extra embedding row of a model trained with label dropout."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ClassLabels:
  """The class condition kind; an instance is a model's (its class count and null class)."""
  num_classes: int
  null: int | None    # the extra embedding row of models trained with label dropout

  name: ClassVar[str] = "class"
  uses_captions: ClassVar[bool] = False   # the data pipeline feeds labels

  # --- the model's side (static: they take the FCDM module) ---------------------------
  @staticmethod
  def y_spec(model, batch: int) -> tuple[tuple[int, ...], jnp.dtype]:
    """(shape, dtype) of y for a batch."""
    del model
    return (batch,), jnp.int32

  @staticmethod
  def has_null(model) -> bool:
    """Whether the model can be guided: it learned a null class (label dropout > 0)."""
    return model.has_null_class

  @staticmethod
  def check_y(model, y, n: int) -> None:
    """y (N,) labels in [0, num_classes] (the null class included), checked when concrete."""
    if y.shape != (n,):
      raise ValueError(f"y must have shape ({n},) (class labels), got {y.shape}")
    if isinstance(y, jax.core.Tracer):
      return
    hi = model.num_classes + int(model.has_null_class)
    labels = np.asarray(y).ravel()
    bad = labels[(labels < 0) | (labels >= hi)].tolist()
    if bad:
      null = f", null label = {model.num_classes}" if hi > model.num_classes else ""
      raise ValueError(f"labels {bad[:8]} out of range [0, {hi - 1}] (num_classes="
                       f"{model.num_classes}{null})")

  @staticmethod
  def torch_text_embedder(model) -> None:
    """The PyTorch layout's condition embedder: the published label table (no text key)."""
    del model
    return None

  # --- sampling's side (an instance) ------------------------------------------------
  @classmethod
  def of(cls, model, empty_embedding=None) -> "ClassLabels":
    del empty_embedding   # class models guide with their null class
    return cls(int(model.num_classes),
               int(model.num_classes) if cls.has_null(model) else None)

  def check(self, values) -> np.ndarray:
    """Given labels as int32 (N,); ValueError for labels outside [0, num_classes)."""
    values = np.asarray(values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"class labels must be a 1-D integer array, got {values.dtype} "
                       f"{values.shape}")
    bad = values[(values < 0) | (values >= self.num_classes)]
    if bad.size:
      raise ValueError(f"labels {sorted(set(bad.tolist()))[:8]} are outside [0, "
                       f"{self.num_classes}) (the model's num_classes)")
    return values.astype(np.int32)

  def pad(self, values: np.ndarray, size: int) -> np.ndarray:
    """`values` filled up to `size` samples with class 0 (the padding's samples are dropped)."""
    out = np.zeros((size,) + values.shape[1:], values.dtype)
    out[:len(values)] = values
    return out

  def abstract(self, size: int, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sharding)

  def key(self) -> None:
    """What a compiled sampler depends on beyond the model config: nothing."""
    return None
