"""Counting the work of a forward pass with XLA's cost analysis.

The paper's "GFLOPs" are multiply-adds (MACs) of convolutions and matmuls. XLA's
whole-program cost analysis also counts elementwise ops, and counts the body of a
scanned (while) loop once. So `matmul_macs` walks the jaxpr, asks XLA for the cost of
each convolution / dot on its own (compiled for its exact shapes, padding counted as
the paper counts it), and multiplies by the trip count of the enclosing scans.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.extend import core as jcore

MAC_PRIMITIVES = ("conv_general_dilated", "dot_general")


def cost_analysis(compiled) -> dict[str, float]:
  """`compiled.cost_analysis()` as one dict (older jax returned a list of one)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return dict(ca or {})


_FLOPS_CACHE: dict[tuple, float] = {}


def _unpadded(eqn) -> tuple[list[jax.ShapeDtypeStruct], dict]:
  """The equation's operands and params, a convolution's zero padding moved into its input.

  XLA counts only the taps that land inside the input; the paper (like fvcore) counts
  every tap at every output position. Padding the input by hand makes them agree.
  """
  args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
  params = dict(eqn.params)
  if eqn.primitive.name == "conv_general_dilated":
    shape = list(args[0].shape)
    spatial = params["dimension_numbers"].lhs_spec[2:]
    for dim, (lo, hi) in zip(spatial, params["padding"]):
      shape[dim] += lo + hi
    args[0] = jax.ShapeDtypeStruct(tuple(shape), args[0].dtype)
    params["padding"] = tuple((0, 0) for _ in params["padding"])
  return args, params


def _counting_sharding():
  """Where each equation is compiled to be counted: the CPU, whatever the default backend.
  The count must not depend on the chip: the benchmark on an H200 (jax 0.11.2, counting on
  the GPU) printed 49.66 GMACs for FCDM-XL/256 against 64.53 on a CPU (jax 0.10.2); which of
  the two, the GPU's cost analysis or the newer jax, undercounts was not separated
  (docs/performance.md, "Accelerators"). None (the default device) only where JAX was
  started without its CPU backend."""
  try:
    return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  except RuntimeError:
    return None


def _primitive_flops(eqn) -> float:
  """XLA's flop count of one equation compiled alone for its exact shapes (cached)."""
  args, params = _unpadded(eqn)
  key = (eqn.primitive.name, tuple((a.shape, str(a.dtype)) for a in args),
         tuple(sorted((k, _hashable(v)) for k, v in params.items())))
  if key not in _FLOPS_CACHE:
    sharding = _counting_sharding()
    if sharding is not None:
      args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    fn = jax.jit(lambda *xs: eqn.primitive.bind(*xs, **params))
    _FLOPS_CACHE[key] = cost_analysis(fn.lower(*args).compile()).get("flops", 0.0)
  return _FLOPS_CACHE[key]


def _hashable(v):
  if isinstance(v, (list, tuple)):
    return tuple(_hashable(x) for x in v)
  if isinstance(v, dict):
    return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
  try:
    hash(v)
    return v
  except TypeError:
    return repr(v)


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def _walk(jaxpr, multiplier: int) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in MAC_PRIMITIVES:
      total += multiplier * _primitive_flops(eqn) / 2
      continue
    inner = multiplier * (eqn.params["length"] if name == "scan" else 1)
    if name == "while":
      raise ValueError("cannot count MACs through a while loop of unknown trip count")
    for sub in _subjaxprs(eqn):
      total += _walk(sub, inner)
  return total


def matmul_macs(fn: Callable, *args) -> float:
  """Multiply-adds of the convolutions and matmuls of `fn(*args)`, from XLA per op."""
  closed = jax.make_jaxpr(fn)(*args)
  return _walk(closed.jaxpr, 1)


def fcdm_forward_macs(model: nn.Module, latent_size: int, batch: int = 1) -> float:
  """MACs of one FCDM forward on `batch` latents of `latent_size`^2 (the paper's GFLOPs x 1e9).

  Counted on the grouped-conv formulation of the depthwise conv (the shifted form
  does the same multiply-adds as elementwise ops).
  """
  model = model.clone(dwconv_impl="xla")
  x = jnp.zeros((batch, latent_size, latent_size, model.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.float32)
  y = model.example_y(batch)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x, t, y)["params"]))
  return matmul_macs(lambda p: model.apply({"params": p}, x, t, y), params)
