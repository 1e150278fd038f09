"""Reading the published code's fixtures (NCHW .npz files) and comparing against them."""

import numpy as np


def load_npz(reference_dir, name: str) -> dict:
  """All arrays of `<reference_dir>/<name>` in memory (the file is closed again)."""
  with np.load(reference_dir / name) as data:
    return {k: data[k] for k in data.files}


def nhwc(a):
  """An NCHW fixture array in our channels-last layout."""
  return np.moveaxis(np.asarray(a), -3, -1)


def assert_close(actual, expected, rtol):
  """Relative error against the array's scale (max |expected|), not elementwise: elements
  that happen to sit near zero carry no meaningful relative error in float32."""
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                             atol=rtol * np.max(np.abs(expected)))
