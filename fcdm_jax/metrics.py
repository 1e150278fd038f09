"""The metric math of ADM's evaluation suite (guided-diffusion `evaluations/evaluator.py`).

Inputs are feature arrays (Inception pool3, spatial features, softmax outputs); the
network that makes them lives in `fcdm_jax.models.inception`. What ADM does and we copy:

- FID / sFID: `mu = mean(features)`, `sigma = np.cov(features, rowvar=False)`, Frechet
  distance with `scipy.linalg.sqrtm` (retried with `eps` on the diagonal when not finite),
  the sample statistics first.
- Inception Score: the softmax outputs cut into consecutive chunks of `split_size`
  (the last one may be short), `exp(mean KL(p(y|x) || p(y)))` per chunk, then the mean.
- Improved precision/recall (Kynkaanniemi et al.), k = 3: a point's radius is the
  squared distance to its k-th nearest neighbour in its own set (itself excluded by
  taking order statistic k, index 0 being itself); precision is the share of samples
  inside some reference ball, recall the share of references inside some sample ball.
  ADM computes the squared distances in float16 (`|u|^2 - 2 u.v + |v|^2`, clamped at 0)
  and falls back to float32 for a block where float16 overflows. We reproduce that
  arithmetic: the matmul accumulates the float16 inputs in float32 and rounds, every
  elementwise step rounds to float16, and the squared norms are summed in float16 in
  the order TensorFlow's CPU kernel uses (see `fp16_squared_norms`), so a borderline
  point falls on the side where ADM run on a CPU puts it.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

# --------------------------------------------------------------------------- FID / IS


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) as ADM computes them: the mean and `np.cov(rowvar=False)` (float64)."""
  features = np.asarray(features)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"need a (N >= 2, D) feature array, got shape {features.shape}")
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); ADM passes the sample first."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: sqrtm of the covariance product is singular; adding {eps} to the "
                  "diagonals")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
  """ADM's Inception Score: mean over consecutive chunks of exp(mean KL(p(y|x) || p(y)))."""
  probs = np.asarray(probs)
  if probs.ndim != 2 or len(probs) == 0:
    raise ValueError(f"need (N, classes) probabilities, got shape {probs.shape}")
  scores = []
  for i in range(0, len(probs), split_size):
    part = probs[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return float(np.mean(scores))


# --------------------------------------------------------------- float16 distances

# TensorFlow's CPU reduce_sum walks a row in packets of 8 float16 lanes with 4
# partial accumulators, and splits rows longer than this into packet-aligned halves.
_PACKET = 8
_LEAF = 1024


def _fp16_sum_leaf(x: np.ndarray) -> np.ndarray:
  n = x.shape[1]
  lanes = np.zeros((x.shape[0], _PACKET), np.float16)
  start = 0
  block = 4 * _PACKET
  if n >= block:
    accs = [np.zeros((x.shape[0], _PACKET), np.float16) for _ in range(4)]
    end = n // block * block
    for j in range(0, end, block):
      for a in range(4):
        accs[a] = accs[a] + x[:, j + a * _PACKET:j + (a + 1) * _PACKET]
    lanes = accs[0]
    for a in range(1, 4):
      lanes = lanes + accs[a]
    start = end
  while start + _PACKET <= n:
    lanes = lanes + x[:, start:start + _PACKET]
    start += _PACKET
  tail = np.zeros(x.shape[0], np.float16)
  for j in range(start, n):
    tail = tail + x[:, j]
  # The lanes are added in float32 and rounded once.
  return tail + lanes.astype(np.float32).sum(axis=1).astype(np.float16)


def _fp16_sum(x: np.ndarray) -> np.ndarray:
  n = x.shape[1]
  if n <= _LEAF:
    return _fp16_sum_leaf(x)
  half = -(-n // 2)
  split = -(-half // _PACKET) * _PACKET
  return _fp16_sum(x[:, :split]) + _fp16_sum(x[:, split:])


def fp16_squared_norms(features: np.ndarray) -> np.ndarray:
  """Row sums of squares in float16, in TensorFlow's CPU summation order.

  Checked bit for bit against `tf.reduce_sum(tf.square(tf.cast(x, tf.float16)), 1)`
  of TF 2.21 on x86 for rows of up to 1024 values and for 2048 (the pool3 size ADM
  uses); for some other lengths TF's kernel picks another order and a norm can differ
  in its last bit.
  """
  x = np.asarray(features, np.float32).astype(np.float16)
  with np.errstate(over="ignore", invalid="ignore"):
    return _fp16_sum(x * x)


def _round_fp16(x):
  """Rounds float32 to the nearest float16 value (subnormals kept, overflow to inf).

  `reduce_precision` flushes float16 subnormals; below the smallest normal the grid is
  2^-24, which `round` reaches exactly. Neither step is simplified away by XLA, unlike
  a round trip through `astype(float16)` inside a larger fusion.
  """
  small = jnp.abs(x) < 2.0 ** -14
  return jnp.where(small, jnp.round(x * 2.0 ** 24) * 2.0 ** -24,
                   jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10))


@jax.jit
def _distance_block(u16, nu16, v16, nv16, u32, v32):
  """ADM's DistanceBlock for one block pair: float16 when finite, else float32."""
  hi = jax.lax.Precision.HIGHEST
  mm = _round_fp16(jnp.dot(u16, v16.T, precision=hi))
  d16 = _round_fp16(nu16[:, None] - 2.0 * mm)
  d16 = jnp.maximum(_round_fp16(d16 + nv16[None, :]), 0.0)

  def fp32(_):
    nu = jnp.sum(jnp.square(u32), axis=1)
    nv = jnp.sum(jnp.square(v32), axis=1)
    return jnp.maximum(nu[:, None] - 2.0 * jnp.dot(u32, v32.T, precision=hi) + nv[None, :], 0.0)

  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda _: d16, fp32, None)


class _Prepared:
  """A feature set with what every distance block needs, computed once."""

  def __init__(self, features):
    features = np.asarray(features, np.float32)
    if features.ndim != 2:
      raise ValueError(f"need (N, D) features, got shape {features.shape}")
    self.dim = features.shape[1]
    # On the device once, so that the blocks do not copy them again and again.
    self.f32 = jnp.asarray(features)
    self.f16 = jnp.asarray(features.astype(np.float16).astype(np.float32))
    self.norms16 = jnp.asarray(fp16_squared_norms(features).astype(np.float32))

  def __len__(self):
    return self.f32.shape[0]

  def block(self, start, stop):
    return self.f16[start:stop], self.norms16[start:stop], self.f32[start:stop]


def pairwise_sq_distances(a, b) -> np.ndarray:
  """Squared distances between the rows of `a` and `b` with ADM's float16 arithmetic."""
  pa, pb = _Prepared(a), _Prepared(b)
  u16, nu, u32 = pa.block(0, len(pa))
  v16, nv, v32 = pb.block(0, len(pb))
  return np.asarray(_distance_block(u16, nu, v16, nv, u32, v32))


@functools.partial(jax.jit, static_argnames="k")
def _smallest(d, carry, k):
  """Merges the k+1 smallest values of each row of `d` into `carry` (ascending)."""
  both = jnp.concatenate([carry, d], axis=1)
  return -jax.lax.top_k(-both, k + 1)[0]


def manifold_radii(features, k: int = 3, batch_size: int = 10000,
                   _prepared: _Prepared | None = None) -> np.ndarray:
  """Squared distance of each point to its k-th nearest other point of the same set.

  Order statistic k of the row including the point itself (distance 0), as ADM takes
  it; computed in (batch_size x batch_size) blocks so memory stays bounded at 50k.
  """
  p = _prepared or _Prepared(features)
  n = len(p)
  if n <= k:
    raise ValueError(f"need more than k={k} points for the k-NN radius, got {n}")
  radii = np.empty(n, np.float32)
  for r0 in range(0, n, batch_size):
    r1 = min(r0 + batch_size, n)
    u16, nu, u32 = p.block(r0, r1)
    best = jnp.full((r1 - r0, k + 1), jnp.inf, jnp.float32)
    for c0 in range(0, n, batch_size):
      v16, nv, v32 = p.block(c0, min(c0 + batch_size, n))
      best = _smallest(_distance_block(u16, nu, v16, nv, u32, v32), best, k)
    radii[r0:r1] = np.asarray(best[:, k])
  return radii


@jax.jit
def _inside(d, radii_rows, radii_cols):
  """(row inside some column's ball, column inside some row's ball) for one block."""
  rows_in = jnp.any(d <= radii_cols[None, :], axis=1)
  cols_in = jnp.any(d <= radii_rows[:, None], axis=0)
  return rows_in, cols_in


def precision_recall(ref_features, sample_features, k: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
  """ADM's improved precision and recall of the samples against the reference set."""
  ref, sample = _Prepared(ref_features), _Prepared(sample_features)
  if ref.dim != sample.dim:
    raise ValueError(f"feature sizes differ: reference {ref.dim}, samples {sample.dim}")
  ref_radii = manifold_radii(None, k, batch_size, _prepared=ref)
  sample_radii = manifold_radii(None, k, batch_size, _prepared=sample)
  ref_in = np.zeros(len(ref), bool)        # reference inside the sample manifold: recall
  sample_in = np.zeros(len(sample), bool)  # sample inside the reference manifold: precision
  for r0 in range(0, len(ref), batch_size):
    r1 = min(r0 + batch_size, len(ref))
    u16, nu, u32 = ref.block(r0, r1)
    for c0 in range(0, len(sample), batch_size):
      c1 = min(c0 + batch_size, len(sample))
      v16, nv, v32 = sample.block(c0, c1)
      d = _distance_block(u16, nu, v16, nv, u32, v32)
      rows_in, cols_in = _inside(d, ref_radii[r0:r1], sample_radii[c0:c1])
      ref_in[r0:r1] |= np.asarray(rows_in)
      sample_in[c0:c1] |= np.asarray(cols_in)
  return float(np.mean(sample_in)), float(np.mean(ref_in))
