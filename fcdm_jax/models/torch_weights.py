"""PyTorch tensors -> nested Flax variables, for the networks loaded from PyTorch files."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np


def check_state_dict(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                     what: str) -> None:
  """One ValueError naming every missing, unexpected and misshapen key, so that weights of
  another model or config are recognised as such at once; `what` starts the message."""
  missing = set(shapes) - set(given)
  unexpected = set(given) - set(shapes)
  wrong = [f"{k} {tuple(np.shape(given[k]))} (expected {tuple(shapes[k])})"
           for k in set(shapes) & set(given) if tuple(np.shape(given[k])) != tuple(shapes[k])]
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing keys: {_describe(missing)}")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected keys: {_describe(unexpected)}")
  if wrong:
    parts.append(f"{len(wrong)} keys of the wrong shape: {_describe(wrong)}")
  if parts:
    raise ValueError(f"{what}: " + "; ".join(parts))


def _describe(keys: Sequence[str], limit: int = 8) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def nest_from_torch(layout: Mapping[str, tuple[tuple[str, ...], Any]],
                    given: Mapping[str, Any]) -> dict:
  """`layout` maps each PyTorch key to (Flax path, shape). Conv kernels OIHW -> HWIO,
  linear weights transposed, everything else as is; float32."""
  tree: dict = {}
  for key, (names, _) in layout.items():
    a = np.asarray(given[key], np.float32)
    if a.ndim == 4:
      a = a.transpose(2, 3, 1, 0)
    elif a.ndim == 2:
      a = a.T
    node = tree
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = jnp.asarray(a)
  return tree
