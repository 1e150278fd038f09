"""ADM's metric math against `tests/reference/adm_metrics.npz` (computed by ADM's code)."""

import numpy as np
import pytest

from fcdm_jax import metrics


@pytest.fixture(scope="module")
def adm(reference_dir):
  with np.load(reference_dir / "adm_metrics.npz") as z:
    return dict(z)


def test_fid_matches_adm(adm):
  mu_s, sigma_s = metrics.fid_statistics(adm["sample_features"])
  mu_r, sigma_r = metrics.fid_statistics(adm["ref_features"])
  fid = metrics.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
  np.testing.assert_allclose(fid, float(adm["fid"]), rtol=1e-6)
  assert metrics.frechet_distance(mu_r, sigma_r, mu_r, sigma_r) == pytest.approx(0, abs=1e-6)


def test_inception_score_matches_adm(adm):
  score = metrics.inception_score(adm["is_probs"], int(adm["is_split_size"]))
  np.testing.assert_allclose(score, float(adm["inception_score"]), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [10000, 1000])
def test_precision_recall_match_adm_exactly(adm, batch_size):
  precision, recall = metrics.precision_recall(adm["ref_features"], adm["sample_features"],
                                               batch_size=batch_size)
  assert precision == float(adm["precision"][0])
  assert recall == float(adm["recall"][0])


def _brute_force_pr(ref, sample, k=3):
  """Float64 reference: radius = k-th nearest other point, squared distances."""
  def sq(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
  r_sample = np.sort(sq(sample, sample), axis=1)[:, k]
  d = sq(ref, sample)
  return (d <= r_ref[:, None]).any(0).mean(), (d <= r_sample[None, :]).any(1).mean()


def test_precision_recall_fall_back_to_float32_where_float16_overflows(adm):
  # Squared norms of ~6e7 overflow float16, so ADM's DistanceBlock switches to float32;
  # the scale is a power of two, so the decisions are those of exact arithmetic.
  ref = adm["ref_features"][:600].astype(np.float64) * 1024
  sample = adm["sample_features"][:400].astype(np.float64) * 1024
  expected = _brute_force_pr(ref, sample)
  assert metrics.precision_recall(ref, sample) == pytest.approx(expected, abs=0)


def test_radius_is_kth_nearest_other_point():
  x = np.array([[0.0], [1.0], [2.0], [4.0], [8.0], [16.0]], np.float32)
  d = (x - x.T) ** 2
  expected = np.sort(d, axis=1)[:, 3]   # index 0 is the point itself
  np.testing.assert_array_equal(metrics.manifold_radii(x, k=3, batch_size=4), expected)
  assert expected[0] == 16.0
  with pytest.raises(ValueError, match="more than k=3"):
    metrics.manifold_radii(x[:3], k=3)


def test_distances_use_float16_unless_it_overflows():
  # 100.03 is 100.0 in float16, so ADM's float16 distance to 100 is exactly 0; to 101 it
  # is 8, not 1: |a|^2 - 2ab + |b|^2 with values near 10^4 rounded to float16's grid of 8.
  d = metrics.pairwise_sq_distances(np.array([[100.03]]), np.array([[100.0], [101.0]]))
  assert d.dtype == np.float32
  np.testing.assert_array_equal(d, [[0.0, 8.0]])
  # |a|^2 = 2049^2 overflows float16: the block is recomputed in float32 from the
  # unrounded features (every value here is exact in float32).
  a = np.array([[2049.0, 0.0]], np.float32)
  b = np.array([[0.0, 0.0], [2048.0, 1.0]], np.float32)
  np.testing.assert_array_equal(metrics.pairwise_sq_distances(a, b), [[2049.0 ** 2, 2.0]])


def test_fp16_squared_norms_match_tensorflow():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(0)
  for dim in (64, 2048):   # the fixture's size and Inception pool3
    x = np.abs(rng.normal(size=(257, dim))).astype(np.float32) * 0.6
    expected = tf.reduce_sum(tf.square(tf.cast(x, tf.float16)), axis=1).numpy()
    np.testing.assert_array_equal(metrics.fp16_squared_norms(x), expected)


def test_bad_shapes_are_reported():
  with pytest.raises(ValueError, match="different sizes"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="feature sizes differ"):
    metrics.precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="N >= 2"):
    metrics.fid_statistics(np.zeros((1, 3)))
