"""The 'npz' data source: an ADM-format .npz image batch trains as its images (scaled to
[-1, 1], flipped where the stream says, in the stream's order, split over hosts), whether
written by np.savez, np.savez_compressed or the sampling command's writer, and bad files
fail when the source is built with errors naming the file."""

import re

import jax
import numpy as np
import pytest

from fcdm_jax import fileio
from fcdm_jax.data import make_source
from fcdm_jax.sampling import adm_npz
from fcdm_jax.train import loop

from helpers.training import load_config

N, SIZE = 10, 8


def npz_config(path, channels=3, **overrides):
  """tiny.py as a pixel model of SIZE x SIZE x channels images from the .npz at `path`."""
  return load_config(**{"data.source": "npz", "data.path": str(path), "image_size": SIZE,
                        "latent_size": SIZE, "model.in_channels": channels, **overrides})


def images(channels=3, n=N, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, channels), np.uint8)


def expected_batch(source, step, x, y):
  idx, flips = source.indices(step), source.flips(step)
  want = x[idx].astype(np.float32) / 127.5 - 1
  want[flips] = want[flips, :, ::-1]
  return want, y[idx]


@pytest.mark.parametrize("writer", ["savez", "savez_compressed", "adm_npz"])
def test_batches_are_the_files_images_in_stream_order(tmp_path, writer):
  x, y = images(), np.arange(N) % 4
  path = tmp_path / "batch.npz"
  if writer == "adm_npz":
    adm_npz.write_batch(str(path), (N, SIZE, SIZE), [x[:6], x[6:]], y)
  else:
    getattr(np, writer)(path, arr_0=x, arr_1=y, mu=np.zeros(3))   # other arrays: ignored
  config = npz_config(path, **{"data.random_flip": True})
  source = make_source(config)
  assert (source.num_examples, source.element_shape) == (N, (SIZE, SIZE, 3))
  assert (source.images is None) == (writer != "savez_compressed")   # else read per batch
  flipped = 0
  for step in range(6):   # batches of 8 over 10 images: epochs straddled
    batch = source.batch(step)
    want_x, want_y = expected_batch(source, step, x, y)
    np.testing.assert_array_equal(batch["x"], want_x)
    np.testing.assert_array_equal(batch["y"], want_y)
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    flipped += int(source.flips(step).sum())
  assert 0 < flipped < 6 * 8   # the flips were exercised, both ways
  halves = [make_source(config, process_index=p, process_count=2).batch(3) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves]), source.batch(3)["x"])


def test_a_batch_in_a_bucket_reads_as_the_local_one(gcs, tmp_path):
  local = tmp_path / "batch.npz"
  np.savez(local, arr_0=images(), arr_1=np.arange(N) % 4)
  remote = f"{gcs('npz')}/batch.npz"
  fileio.upload(str(local), remote)
  here, there = (make_source(npz_config(p)) for p in (local, remote))
  assert there.images is None   # read per batch, by byte ranges
  for step in range(3):
    for key, value in here.batch(step).items():
      np.testing.assert_array_equal(there.batch(step)[key], value)


def test_grey_images_without_labels_are_class_zero(tmp_path):
  x = images(channels=1)
  np.savez(tmp_path / "grey.npz", arr_0=x)
  source = make_source(npz_config(tmp_path / "grey.npz", channels=1))
  batch = source.batch(1)
  want_x, _ = expected_batch(source, 1, x, np.zeros(N))
  np.testing.assert_array_equal(batch["x"], want_x)
  assert batch["y"].dtype == np.int32 and not batch["y"].any()


@pytest.mark.slow
def test_trains_two_steps_on_an_npz_batch(tmp_path):
  np.savez(tmp_path / "batch.npz", arr_0=images(n=16), arr_1=np.arange(16) % 4)
  config = npz_config(tmp_path / "batch.npz", num_train_steps=2)
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["end_step"] == 2 and summary["stopped_by"] == "completed"
  params = jax.device_get(summary["state"].params)
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_bad_batches_fail_with_the_file_named(tmp_path):
  def fails(arrays, error, match, **overrides):
    path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.npz"
    np.savez(path, **arrays)
    with pytest.raises(error, match=match.replace("PATH", re.escape(str(path)))):
      make_source(npz_config(path, **overrides))

  missing = re.escape(str(tmp_path / "none.npz"))
  with pytest.raises(FileNotFoundError, match=f"npz image batch {missing} does not exist"):
    make_source(npz_config(tmp_path / "none.npz"))
  with pytest.raises(FileNotFoundError, match="config.data.path is empty"):
    make_source(npz_config(""))
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(ValueError, match="text.npz is not an .npz file"):
    make_source(npz_config(tmp_path / "text.npz"))
  x = images()
  fails({"images": x}, ValueError, r"PATH has no 'arr_0' array \(it holds \['images'\]\)")
  fails({"arr_0": x}, ValueError,
        r"PATH holds elements of shape \(8, 8, 3\).*trains on \(16, 16, 3\) "
        r"\(config.image_size=16, config.model.in_channels=3\)",
        image_size=16, latent_size=16)
  fails({"arr_0": x}, ValueError, r"PATH holds .* \(8, 8, 3\) .* \(8, 8, 1\)",
        **{"model.in_channels": 1})
  fails({"arr_0": x.astype(np.float32)}, ValueError, "PATH: 'arr_0' has dtype float32")
  fails({"arr_0": images(channels=4)}, ValueError, r"PATH: 'arr_0' has shape \(10, 8, 8, 4\)")
  fails({"arr_0": x, "arr_1": np.arange(N)}, ValueError,
        r"PATH: labels \[4, 5, 6, 7, 8, 9\] are outside \[0, 4\)")
  fails({"arr_0": x, "arr_1": np.zeros((N, 2), int)}, ValueError,
        r"PATH: 'arr_1' must be integer class labels of shape \(10,\)")
  path = tmp_path / "big.npz"
  np.savez_compressed(path, arr_0=x)
  with pytest.raises(ValueError, match="stores 'arr_0' compressed .*max_in_memory_gb=1e-09"):
    make_source(npz_config(path, **{"data.max_in_memory_gb": 1e-9}))
