"""PyTorch tensors -> nested Flax variables, for the networks loaded from PyTorch files."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np


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
