"""The condition registry: what `config.model.condition` (`FCDM.condition`) may name.

A condition kind is one class (one module here) that
- builds the model's y for a batch (`y_spec`, so `example_y` / `abstract_y` below), checks a
  concrete y (`check_y`) and says whether the model can be guided (`has_null`): the model
  asks it;
- bound to a model (`kind.of(model, empty_embedding)`), checks given conditions, gives the
  guidance null and pads batches: the generator, previews and judges ask it;
- says whether the model trains on captions (`uses_captions`: the data pipeline and the
  evaluators ask), and names the PyTorch layout's text embedder (`torch_text_embedder`).
Adding one is a module with such a class plus its line in CONDITIONS (the model's embedder
for it is chosen in models/fcdm.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fcdm_jax.conditions.class_labels import ClassLabels
from fcdm_jax.conditions.text_embeddings import TextEmbeddings

CONDITIONS = {
    ClassLabels.name: ClassLabels,
    TextEmbeddings.name: TextEmbeddings,
}


def get(name: str):
  """The condition kind `name`; ValueError naming the registered ones."""
  if name not in CONDITIONS:
    raise ValueError(f"unknown condition {name!r}; expected one of {tuple(CONDITIONS)}")
  return CONDITIONS[name]


def of_config(config):
  """The condition kind of a run config's model (configs before conditions: 'class')."""
  return get(config.model.get("condition", ClassLabels.name))


def example_y(model, batch: int) -> jax.Array:
  """Zeros of the y `model` takes, for init and shape-only tracing."""
  shape, dtype = get(model.condition).y_spec(model, batch)
  return jnp.zeros(shape, dtype)


def abstract_y(model, batch: int, sharding=None) -> jax.ShapeDtypeStruct:
  """The y `model` takes for a batch, as an abstract array (with `sharding`)."""
  shape, dtype = get(model.condition).y_spec(model, batch)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def condition_of(model, empty_embedding=None):
  """The condition kind of `model` bound to it: class labels, or text embeddings whose null
  is `empty_embedding` (required for condition='text')."""
  return get(model.condition).of(model, empty_embedding)


__all__ = ["CONDITIONS", "ClassLabels", "TextEmbeddings", "abstract_y", "condition_of",
           "example_y", "get", "of_config"]
