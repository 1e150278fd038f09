"""Input pipelines (fcdm_jax/data): every source on tiny data made here, the deterministic
and resumable order, host splits, flips, latent posteriors, the latent writer, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fcdm_jax import config_base
from fcdm_jax.data import (SOURCES, LatentDataset, LatentShardWriter, SourceSpec,
                           center_crop_arr, embedded, load_embedded, make_source, pipeline,
                           source_spec)

SHAPE = (4, 4, 2)       # tiny latents (H, W, C)
SHARDS = (5, 3, 4)      # 12 examples over three shards of unequal size
CLASSES = 3


def latent_arrays(n, seed):
  """Posteriors whose mean identifies the example: mean[k, flip] = 10*id + flip + pattern."""
  rng = np.random.default_rng(seed)
  pattern = rng.normal(size=(n, 2) + SHAPE) * 0.25
  mean = pattern + (10.0 * np.arange(n)[:, None] + np.arange(2)[None, :])[..., None, None, None]
  std = np.exp(rng.normal(size=(n, 2) + SHAPE) * 0.2) * 0.5
  return mean, std


def write_latents(directory, shards=SHARDS, dtype="float32", num_classes=CLASSES,
                  vae_scale=0.5, finalize=True):
  writer = LatentShardWriter(directory, shape=SHAPE, num_classes=num_classes,
                             vae_scale=vae_scale, dtype=dtype)
  mean, std = latent_arrays(sum(shards), seed=0)
  labels = np.arange(sum(shards)) % num_classes
  start = 0
  for i, n in enumerate(shards):
    sl = slice(start, start + n)
    assert writer.write_shard(i, mean[sl], std[sl], labels[sl], stats={"skipped": i})
    start += n
  if finalize:
    writer.finalize(len(shards), metadata={"resolution": 32})
  return writer, mean, std, labels


def make_config(source="latents", batch_size=4, **data):
  c = config_base.get_config("S", 256)
  c.batch_size = batch_size
  c.seed = 1
  c.data.source = source
  c.data.prefetch = 0
  if source in SOURCES and source_spec(source).latent:
    c.latent_size, c.model.in_channels, c.model.num_classes = SHAPE[0], SHAPE[2], CLASSES
    c.data.vae_scale = 0.5
  elif source == "embedded":
    c.image_size, c.model.in_channels, c.model.num_classes = 32, 1, 10
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture
def latent_dir(tmp_path):
  write_latents(tmp_path / "lat")
  return tmp_path / "lat"


def stream(config, steps, start=0, process_index=0, process_count=1):
  src = make_source(config, process_index=process_index, process_count=process_count)
  with src.iterate(start) as it:
    return [next(it) for _ in range(steps)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["x"], y["x"])
    np.testing.assert_array_equal(x["y"], y["y"])


# --- the latent format -----------------------------------------------------------------------
def test_latent_roundtrip_and_manifest(tmp_path):
  writer, mean, std, labels = write_latents(tmp_path / "d", dtype="float16")
  manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
  assert manifest["count"] == 12 and manifest["shape"] == list(SHAPE)
  assert manifest["dtype"] == "float16" and manifest["vae_scale"] == 0.5
  assert [s["count"] for s in manifest["shards"]] == list(SHARDS)
  assert manifest["stats"] == {"skipped": 0 + 1 + 2}
  assert manifest["metadata"] == {"resolution": 32}
  ds = LatentDataset(tmp_path / "d")
  idx = np.array([11, 0, 5, 4, 7, 5])
  rec = ds.read(idx)
  np.testing.assert_array_equal(rec["label"], labels[idx])
  np.testing.assert_array_equal(rec["latent"][:, :, 0], mean[idx].astype(np.float16))
  np.testing.assert_array_equal(rec["latent"][:, :, 1], std[idx].astype(np.float16))


def test_latent_writer_resumes_shard_by_shard(tmp_path):
  d = tmp_path / "d"
  mean, std = latent_arrays(6, seed=3)
  labels = np.zeros(6, int)
  w = LatentShardWriter(d, shape=SHAPE, num_classes=CLASSES)
  assert w.write_shard(0, mean[:3], std[:3], labels[:3])
  (d / ".shard-00001.npy.x.tmp").write_bytes(b"half a shard from a killed run")
  with pytest.raises(FileNotFoundError, match=r"1 of 2 shards .* \[1\]"):
    w.finalize(2)
  with pytest.raises(FileNotFoundError, match="unfinished extraction"):
    LatentDataset(d)
  # A new writer (a restarted run) sees shard 0 as done and skips it.
  w = LatentShardWriter(d, shape=SHAPE, num_classes=CLASSES)
  assert w.is_complete(0) and not w.is_complete(1)
  mtime = os.stat(w.shard_path(0)).st_mtime_ns
  assert not w.write_shard(0, mean[:3] + 1, std[:3], labels[:3])
  assert os.stat(w.shard_path(0)).st_mtime_ns == mtime
  assert w.write_shard(1, mean[3:], std[3:], labels[3:])
  assert w.finalize(2)["count"] == 6
  # Deleting a shard makes only that one pending again; a changed layout is not "complete".
  os.unlink(w.shard_path(1))
  assert [i for i in range(2) if not w.is_complete(i)] == [1]
  assert not LatentShardWriter(d, shape=SHAPE, num_classes=CLASSES, dtype="float32").is_complete(0)


@pytest.mark.parametrize("change, match", [
    (dict(mean_shape=(3, 4, 4, 2)), r"mean has shape \(3, 4, 4, 2\), expected \(3, 2, 4, 4, 2\)"),
    (dict(std_sign=-1.0), "negative"),
    (dict(nan=True), "non-finite"),
    (dict(label=CLASSES), r"labels \[3\] are outside \[0, 3\)"),
])
def test_latent_writer_rejects_bad_shards(tmp_path, change, match):
  mean, std = latent_arrays(3, seed=0)
  labels = np.zeros(3, int)
  if "mean_shape" in change:
    mean = mean[:, 0]
  if "std_sign" in change:
    std = -std
  if "nan" in change:
    mean[1, 0, 0, 0, 0] = np.nan
  if "label" in change:
    labels[2] = change["label"]
  with pytest.raises(ValueError, match=match):
    LatentShardWriter(tmp_path, shape=SHAPE, num_classes=CLASSES).write_shard(
        0, mean, std, labels)
  assert not (tmp_path / "shard-00000.npy").exists()


def test_latent_source_hands_over_the_posterior_of_the_chosen_flip(latent_dir):
  mean, std = latent_arrays(12, seed=0)
  labels = np.arange(12) % CLASSES
  src = make_source(make_config(batch_size=12, path=str(latent_dir), random_flip=True))
  seen_flips = set()
  for step in range(3):  # a global batch of 12 = one epoch of the 12 examples
    idx, flips = src.indices(step), src.flips(step)
    b = src.batch(step)
    np.testing.assert_array_equal(b["y"], labels[idx])
    # mean and std of the example and flip chosen, times vae_scale (stored as float32 here).
    np.testing.assert_allclose(b["x"], mean[idx, flips.astype(int)] * 0.5, rtol=1e-6)
    np.testing.assert_allclose(b["x_std"], std[idx, flips.astype(int)] * 0.5, rtol=1e-6)
    seen_flips.update(flips.tolist())
  assert seen_flips == {True, False}


def test_the_step_draws_the_posterior_by_step_and_position():
  """eps ~ N(0, 1), its own per example, fresh per step, and the same whatever the device
  layout of the batch (so whatever the number of hosts)."""
  import jax
  from fcdm_jax import sharding
  from fcdm_jax.train.step import posterior_sample
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(16,) + SHAPE).astype(np.float32),
           "x_std": np.exp(rng.normal(size=(16,) + SHAPE)).astype(np.float32)}
  draw = jax.jit(posterior_sample)
  keys = [jax.random.fold_in(jax.random.key(0), step) for step in range(3)]
  eps = [(np.asarray(draw(batch, k)) - batch["x"]) / batch["x_std"] for k in keys]
  all_eps = np.concatenate(eps)
  assert abs(all_eps.mean()) < 0.1 and abs(all_eps.std() - 1) < 0.1
  assert np.abs(eps[0][1:] - eps[0][:-1]).mean() > 0.5      # each example its own noise
  assert np.abs(eps[0] - eps[1]).mean() > 0.5                # each step fresh noise
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(8, 1), ("data", "fsdp"))
  sharded = draw(sharding.global_batch(batch, mesh), keys[0])
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(draw(batch, keys[0])))
  # Without x_std (a pixel or pre-sampled source) the batch is taken as it is.
  np.testing.assert_array_equal(np.asarray(draw({"x": batch["x"]}, keys[0])), batch["x"])


def test_latents_without_flip_use_the_unmirrored_posterior(latent_dir):
  src = make_source(make_config(path=str(latent_dir), random_flip=False))
  assert not src.flips(0).any()
  b = src.batch(0)
  ids = np.round(b["x"].mean(axis=(1, 2, 3)) / 0.5 / 10).astype(int)  # mean ~ 10*id + flip
  np.testing.assert_array_equal(ids, src.indices(0))


# --- order, resume, host split -----------------------------------------------------------------
@pytest.mark.parametrize("source", ["latents", "embedded"])
def test_same_seed_and_step_same_batch_and_resume(latent_dir, source):
  config = make_config(source, batch_size=8, path=str(latent_dir), random_flip=True)
  full = stream(config, 7)
  assert_batches_equal(stream(config, 7), full)
  assert_batches_equal(stream(config, 3, start=4), full[4:])
  config.data.prefetch = 3  # the thread changes nothing
  assert_batches_equal(stream(config, 3, start=4), full[4:])
  config.seed = 2
  other = stream(config, 2)
  assert not np.array_equal(other[0]["x"], full[0]["x"])


def test_host_slices_are_disjoint_and_make_up_the_global_batch(latent_dir):
  config = make_config(batch_size=8, path=str(latent_dir), random_flip=True)
  whole = stream(config, 6)
  hosts = [stream(config, 6, process_index=p, process_count=4) for p in range(4)]
  srcs = [make_source(config, process_index=p, process_count=4) for p in range(4)]
  for step in range(6):
    parts = [srcs[p].indices(step) for p in range(4)]
    assert all(len(p) == 2 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), srcs[0].indices(step, np.arange(8)))
    # Flips and latent noise are keyed by global position, not by host: same global batch.
    np.testing.assert_array_equal(np.concatenate([h[step]["x"] for h in hosts]),
                                  whole[step]["x"])
    np.testing.assert_array_equal(np.concatenate([h[step]["y"] for h in hosts]),
                                  whole[step]["y"])
  # 6 steps of 8 = 4 epochs of 12: each epoch is a permutation, batches straddle epochs.
  seen = np.concatenate([srcs[0].indices(s, np.arange(8)) for s in range(6)])
  for e in range(4):
    assert sorted(seen[12 * e:12 * (e + 1)]) == list(range(12))
  assert not np.array_equal(seen[:12], seen[12:24])  # reshuffled every epoch


def test_batches_do_not_depend_on_process_count_for_embedded():
  config = make_config("embedded", batch_size=6, random_flip=True)
  whole = stream(config, 2, start=100)
  parts = [stream(config, 2, start=100, process_index=p, process_count=3) for p in range(3)]
  for step in range(2):
    np.testing.assert_array_equal(np.concatenate([p[step]["x"] for p in parts]),
                                  whole[step]["x"])


def test_random_flip_mirrors_pixels():
  images, labels = load_embedded("train")
  src = make_source(make_config("embedded", batch_size=64, random_flip=True))
  b, idx, flips = src.batch(3), src.indices(3), src.flips(3)
  assert 10 < flips.sum() < 54
  want = embedded.to_model_range(images[idx])
  want[flips] = want[flips][:, :, ::-1]
  np.testing.assert_array_equal(b["x"], want)
  np.testing.assert_array_equal(b["y"], labels[idx])
  src = make_source(make_config("embedded", batch_size=64, random_flip=False))
  np.testing.assert_array_equal(src.batch(3)["x"], embedded.to_model_range(images[idx]))


def test_prefetch_thread_reraises_errors_and_stops():
  calls = []

  def make_batch(step):
    calls.append(step)
    if step == 3:
      raise RuntimeError("bad shard")
    return {"step": step}

  it = pipeline.BatchIterator(make_batch, 1, prefetch=2)
  assert [next(it)["step"] for _ in range(2)] == [1, 2]
  with pytest.raises(RuntimeError, match="bad shard"):
    next(it)
  it.close()
  it = pipeline.BatchIterator(lambda s: {"step": s}, 0, prefetch=2)
  next(it)
  it.close()
  assert not it._thread.is_alive()


# --- the embedded dataset ----------------------------------------------------------------------
def test_embedded_dataset_ships_with_a_held_out_split():
  assert embedded.PATH.stat().st_size < 3e6
  for split, n in (("train", 4000), ("test", 1000)):
    x, y = load_embedded(split)
    assert x.shape == (n, 32, 32, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
    assert x[:, :2].max() == 0 and x[:, -2:].max() == 0  # the 28 -> 32 padding
    assert x.max() == 255
  train = {r.tobytes() for r in load_embedded("train")[0]}
  test = load_embedded("test")[0]
  assert sum(r.tobytes() in train for r in test) < 5  # held out (MNIST has a few duplicates)
  assert "CC BY-SA 3.0" in embedded.embedded_info()["license"]
  with pytest.raises(ValueError, match="unknown embedded split 'valid'"):
    load_embedded("valid")
  src = make_source(make_config("embedded", split="test", batch_size=10))
  assert src.element_shape == (32, 32, 1) and src.num_examples == 1000
  assert src.num_classes == 10
  b = src.batch(0)
  assert b["x"].min() == -1.0 and b["x"].max() == 1.0 and b["x"].dtype == np.float32


# --- TFDS --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
  """A tiny TFDS dataset built offline, once as array_record and once as tfrecord."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class FcdmTestShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(20, 24, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(9), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(n)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "label": i % 3}

  dirs = {}
  for fmt in ("array_record", "tfrecord"):
    dirs[fmt] = str(tmp_path_factory.mktemp(fmt))
    FcdmTestShapes(data_dir=dirs[fmt], file_format=fmt).download_and_prepare()
  return dirs


def tfds_config(data_dir, **kw):
  c = make_config("tfds", batch_size=4, **{"tfds_name": "fcdm_test_shapes",
                                           "data_dir": data_dir, **kw})
  c.image_size, c.model.in_channels, c.model.num_classes = 16, 3, 3
  return c


def test_tfds_source_both_file_formats_agree(tfds_dirs):
  import tensorflow_datasets as tfds
  config = tfds_config(tfds_dirs["array_record"], random_flip=True)
  src = make_source(config)
  assert src.element_shape == (16, 16, 3) and src.num_examples == 9 and src.num_classes == 3
  assert src.data is not None  # random access, nothing held in memory
  ref = tfds.builder("fcdm_test_shapes", data_dir=tfds_dirs["array_record"]
                     ).as_data_source("train")
  b, idx, flips = src.batch(5), src.indices(5), src.flips(5)
  want = np.stack([center_crop_arr(ref[int(i)]["image"], 16) for i in idx])
  want = want.astype(np.float32) / 127.5 - 1
  want[flips] = want[flips][:, :, ::-1]
  np.testing.assert_allclose(b["x"], want, atol=1e-6)
  np.testing.assert_array_equal(b["y"], [ref[int(i)]["label"] for i in idx])
  in_memory = make_source(tfds_config(tfds_dirs["tfrecord"], random_flip=True))
  assert in_memory.images is not None
  assert_batches_equal([in_memory.batch(s) for s in range(4)], [src.batch(s) for s in range(4)])


def test_tfds_errors(tfds_dirs, tmp_path):
  with pytest.raises(FileNotFoundError, match="data_dir .*nope does not exist"):
    make_source(tfds_config(str(tmp_path / "nope")))
  with pytest.raises(FileNotFoundError, match="'fcdm_test_shapes' .* not prepared"):
    make_source(tfds_config(str(tmp_path)))
  with pytest.raises(ValueError, match="tfds_name is empty"):
    make_source(tfds_config(tfds_dirs["array_record"], tfds_name=""))
  with pytest.raises(ValueError, match=r"no feature 'img' \(config.data.image_key\)"):
    make_source(tfds_config(tfds_dirs["array_record"], image_key="img"))
  with pytest.raises(ValueError, match="feature 'image' is not a ClassLabel"):
    make_source(tfds_config(tfds_dirs["array_record"], label_key="image"))
  c = tfds_config(tfds_dirs["array_record"])
  c.model.in_channels = 4
  with pytest.raises(ValueError, match=r"\(16, 16, 3\) .* \(16, 16, 4\)"):
    make_source(c)
  c = tfds_config(tfds_dirs["tfrecord"], max_in_memory_gb=1e-6)
  with pytest.raises(ValueError, match="array_record"):
    make_source(c)


def test_center_crop_is_adms():
  img = np.arange(64 * 40 * 3, dtype=np.uint32).reshape(64, 40, 3).astype(np.uint8)
  out = center_crop_arr(img, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  # Box-halve 64x40 -> 32x20 (short side 20 < 32 stops), bicubic to 26x16, crop rows 5..20.
  from PIL import Image
  pil = Image.fromarray(img).resize((20, 32), Image.BOX).resize((16, 26), Image.BICUBIC)
  np.testing.assert_array_equal(out, np.asarray(pil)[5:21])
  flat = np.full((30, 30, 1), 77, np.uint8)
  np.testing.assert_array_equal(center_crop_arr(flat, 8), np.full((8, 8, 1), 77, np.uint8))
  np.testing.assert_array_equal(center_crop_arr(img[:16, :16], 16), img[:16, :16])


# --- the published PyTorch code's latents ------------------------------------------------------
def write_torch_features(root, n=7, rename_label=None):
  """The published extractor's layout: <root>/imagenet256_{features,labels}/<rank>-<i>.npy."""
  rng = np.random.default_rng(5)
  latents = rng.normal(size=(n, SHAPE[2], SHAPE[0], SHAPE[1])).astype(np.float32)  # NCHW
  labels = rng.integers(0, CLASSES, n)
  (root / "imagenet256_features").mkdir(parents=True)
  (root / "imagenet256_labels").mkdir()
  names = [f"{i % 2}-{i // 2}.npy" for i in range(n)]
  for i, name in enumerate(names):
    np.save(root / "imagenet256_features" / name, latents[i:i + 1])   # (1, C, H, W)
    label_name = rename_label if (rename_label and i == 0) else name
    np.save(root / "imagenet256_labels" / label_name, labels[i:i + 1])  # (1,)
  order = np.argsort(names)  # files are read in sorted name order
  return latents[order].transpose(0, 2, 3, 1), labels[order]


def test_torch_features_folders(tmp_path):
  latents, labels = write_torch_features(tmp_path / "feat")
  for path in (tmp_path / "feat", tmp_path / "feat" / "imagenet256_features"):
    src = make_source(make_config("torch_features", batch_size=4, path=str(path),
                                  random_flip=True))
    assert src.element_shape == SHAPE and src.num_examples == 7
    for step in range(3):
      b, idx, flips = src.batch(step), src.indices(step), src.flips(step)
      want = latents[idx].copy()
      want[flips] = want[flips][:, :, ::-1]
      np.testing.assert_array_equal(b["x"], want)
      np.testing.assert_array_equal(b["y"], labels[idx])


def test_torch_features_errors(tmp_path):
  write_torch_features(tmp_path / "a", rename_label="x-9.npy")
  with pytest.raises(ValueError, match=r"do not pair by name .*\['0-0.npy'\].*\['x-9.npy'\]"):
    make_source(make_config("torch_features", path=str(tmp_path / "a")))
  write_torch_features(tmp_path / "b")
  c = make_config("torch_features", path=str(tmp_path / "b"))
  c.model.num_classes = 2
  with pytest.raises(ValueError, match=r"labels \[2\] are outside \[0, 2\)"):
    make_source(c)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    make_source(make_config("torch_features", path=str(tmp_path / "missing")))


def test_torch_zarr_store(tmp_path):
  zarr = pytest.importorskip("zarr")
  rng = np.random.default_rng(2)
  n = 10
  latents = rng.normal(size=(n, SHAPE[2], SHAPE[0], SHAPE[1])).astype(np.float32)
  labels = rng.integers(0, CLASSES, n).astype(np.int64)
  # As the published save_zarr.py writes it (zarr v2 group, chunks along N).
  root = zarr.open_group(str(tmp_path / "l.zarr"), mode="w", zarr_format=2)
  root.create_array("latents", shape=latents.shape, chunks=(4,) + latents.shape[1:],
                    dtype="float32")[...] = latents
  root.create_array("labels", shape=(n,), chunks=(4,), dtype="int64")[...] = labels
  config = make_config("torch_zarr", batch_size=4, path=str(tmp_path / "l.zarr"),
                       random_flip=True)
  src = make_source(config)
  assert isinstance(src.latents, np.ndarray)  # small: held in memory
  b, idx, flips = src.batch(2), src.indices(2), src.flips(2)
  want = latents[idx].transpose(0, 2, 3, 1).copy()
  want[flips] = want[flips][:, :, ::-1]
  np.testing.assert_array_equal(b["x"], want)
  np.testing.assert_array_equal(b["y"], labels[idx])
  config.data.max_in_memory_gb = 0.0
  chunked = make_source(config)
  assert not isinstance(chunked.latents, np.ndarray)
  assert_batches_equal([chunked.batch(s) for s in range(5)], [src.batch(s) for s in range(5)])
  del root["labels"]
  with pytest.raises(ValueError, match=r"no \['labels'\] array"):
    make_source(config)


# --- the registry -------------------------------------------------------------------------------
def test_registry_says_what_each_source_is_without_loading_it():
  for name, spec in SOURCES.items():
    assert spec.name == name
    cls = spec.load()
    assert issubclass(cls, pipeline.Source) and "from_config" in vars(cls), name
  assert {n for n, s in SOURCES.items() if s.latent} == {"latents", "torch_features",
                                                         "torch_zarr"}
  assert [n for n, s in SOURCES.items() if s.posterior] == ["latents"]
  c = make_config("embedded")
  c.latent_size = 8
  assert source_spec("embedded").element_shape(c) == (32, 32, 1)
  assert source_spec("latents").element_shape(c) == (8, 8, 1)
  # Naming sources loads none of their modules, nor their optional dependencies.
  code = ("import sys, fcdm_jax.data as d; d.source_spec('tfds'); d.source_spec('torch_zarr');"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow_datasets', 'zarr', 'torch') or m in ('fcdm_jax.data.tfds_images', "
          "'fcdm_jax.data.torch_latents', 'fcdm_jax.demo.colour_digits')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_a_source_is_one_registry_line(monkeypatch):
  monkeypatch.setitem(SOURCES, "digits", SourceSpec("digits",
                                                    "fcdm_jax.data.embedded:EmbeddedSource"))
  config = make_config("digits", batch_size=6, split="test")
  config.image_size, config.model.in_channels, config.model.num_classes = 32, 1, 10
  src = make_source(config)
  assert isinstance(src, embedded.EmbeddedSource) and src.num_examples == 1000
  assert src.batch(0)["x"].shape == (6, 32, 32, 1)


# --- bad input gets a clear error before any work ----------------------------------------------
def test_unknown_source():
  with pytest.raises(ValueError, match="unknown config.data.source 'imagenet'; expected one of "
                                       r"\('latents', 'tfds', 'embedded'"):
    make_source(make_config("imagenet"))


def test_global_batch_not_divisible_by_process_count(latent_dir):
  with pytest.raises(ValueError, match="batch_size 6 .* not divisible .* 4"):
    make_source(make_config(batch_size=6, path=str(latent_dir)), process_index=0,
                process_count=4)
  with pytest.raises(ValueError, match="process_index 2 is not in"):
    make_source(make_config(path=str(latent_dir)), process_index=2, process_count=2)


@pytest.mark.parametrize("source", ["latents", "torch_zarr", "torch_features"])
def test_missing_dataset_path(tmp_path, source):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    make_source(make_config(source, path=str(tmp_path / "nowhere")))
  with pytest.raises(FileNotFoundError, match="config.data.path is empty"):
    make_source(make_config(source, path=""))


def test_latent_shape_does_not_fit_config(latent_dir):
  c = make_config(path=str(latent_dir))
  c.latent_size = 8  # a config for 8x8x2 latents, a dataset of 4x4x2
  with pytest.raises(ValueError, match=r"\(4, 4, 2\) .* \(8, 8, 2\) .*latent_size=8"):
    make_source(c)
  c = make_config(path=str(latent_dir))
  c.model.in_channels = 4
  with pytest.raises(ValueError, match=r"\(4, 4, 2\) .* \(4, 4, 4\)"):
    make_source(c)
  c = make_config("embedded")
  c.image_size = 28
  with pytest.raises(ValueError, match=r"\(32, 32, 1\) .* \(28, 28, 1\)"):
    make_source(c)


def test_labels_outside_num_classes(tmp_path):
  write_latents(tmp_path / "d", num_classes=5)
  c = make_config(path=str(tmp_path / "d"))  # num_classes = 3 < the dataset's 5
  with pytest.raises(ValueError, match="has 5 classes but config.model.num_classes is 3"):
    make_source(c)
  c = make_config("embedded")
  c.model.num_classes = 8
  with pytest.raises(ValueError, match="has 10 classes but config.model.num_classes is 8"):
    make_source(c)


def test_latent_vae_scale_mismatch_and_unfinished_dataset(tmp_path, latent_dir):
  c = make_config(path=str(latent_dir))
  c.data.vae_scale = 0.18215
  with pytest.raises(ValueError, match="vae_scale 0.5 but config.data.vae_scale is 0.18215"):
    make_source(c)
  write_latents(tmp_path / "partial", finalize=False)
  with pytest.raises(FileNotFoundError, match="3 shards present: an unfinished extraction"):
    make_source(make_config(path=str(tmp_path / "partial")))
