"""`fcdm_jax.extract_latents` on a tiny generated image folder with a tiny random-weight VAE:
the training pipeline reads what it writes, odd images are converted or skipped and
counted, a rerun recomputes only missing shards, and bad input fails clearly."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jax.numpy as jnp

from fcdm_jax import extraction, images
from fcdm_jax.data import LatentDataset, center_crop_arr, make_source
from fcdm_jax.models import vae as vae_lib

from helpers.image_files import write_image_folder
from helpers.model_files import RESOLUTION, TINY_VAE, write_vae_dir
from helpers.training import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What write_image_folder writes, in listing order.
FILES = ["ants/a0.jpg", "ants/a1.png", "ants/a2_cmyk.jpg", "bees/b0_gray.jpg",
         "bees/b1_corrupt.jpg", "bees/b2_rgba.png", "cats/c0.bmp", "cats/nested/c1.png"]
LABELS = [0, 0, 0, 1, 1, 1, 2, 2]
KEPT = [i for i, f in enumerate(FILES) if "corrupt" not in f]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  d = tmp_path_factory.mktemp("extract")
  return dict(vae=write_vae_dir(d / "vae"), images=write_image_folder(d / "images"), base=d)


@pytest.fixture(scope="module")
def extracted(dirs):
  out = str(dirs["base"] / "latents")
  summary = extraction.extract(f"folder:{dirs['images']}", RESOLUTION, dirs["vae"], out,
                                    batch_size=4, shard_size=3, num_workers=2, progress=False)
  return out, summary


def _expected_posterior(dirs, files):
  """Direct encoding of the images and their mirrors, independent of the tool's batching."""
  model, params = vae_lib.load_vae(dirs["vae"])
  crops = []
  for f in files:
    img = Image.open(os.path.join(dirs["images"], f)).convert("RGB")
    crops.append(center_crop_arr(np.asarray(img), RESOLUTION))
  x = np.stack(crops).astype(np.float32) / 127.5 - 1
  both = np.concatenate([x, x[:, :, ::-1]])
  post = model.apply(params, jnp.asarray(both), method=model.encode)
  n = len(files)
  pair = lambda a: np.stack([np.asarray(a)[:n], np.asarray(a)[n:]], axis=1)
  return pair(post.mean), pair(post.std)


def test_extracts_a_dataset_the_training_pipeline_reads(dirs, extracted):
  out, summary = extracted
  assert summary["num_shards"] == 3 and summary["written"] == [0, 1, 2]
  manifest = summary["manifest"]
  assert manifest == json.loads(open(os.path.join(out, "manifest.json")).read())
  assert manifest["count"] == 7 and manifest["shape"] == [8, 8, 4]
  assert manifest["num_classes"] == 4 and manifest["vae_scale"] == 0.5
  assert manifest["stats"] == {"images": 8, "encoded": 7, "skipped_corrupt": 1,
                               "converted_cmyk": 1, "converted_grayscale": 1,
                               "converted_other": 1}
  meta = manifest["metadata"]
  assert meta["class_names"] == ["ants", "bees", "cats", "empty_class"]
  assert meta["skipped_files"] == ["bees/b1_corrupt.jpg"]
  assert meta["ignored_files"] == 1 and meta["resolution"] == RESOLUTION

  # Stored posteriors are those of the crops and their mirrors, in listing order.
  ds = LatentDataset(out)
  rec = ds.read(np.arange(len(ds)))
  np.testing.assert_array_equal(rec["label"], [LABELS[i] for i in KEPT])
  mean, std = _expected_posterior(dirs, [FILES[i] for i in KEPT])
  stored = rec["latent"].astype(np.float32)
  np.testing.assert_allclose(stored[:, :, 0], mean, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(stored[:, :, 1], std, rtol=2e-3, atol=1e-5)
  assert np.abs(mean[:, 0] - mean[:, 1]).max() > 1e-2   # the mirror is really encoded

  # The training input pipeline takes it as a `latents` source.
  config = load_config(batch_size=4, **{"data.path": out, "data.vae_scale": 0.5})  # 8x8x4
  source = make_source(config, process_index=0, process_count=1)
  assert source.num_examples == 7 and source.element_shape == (8, 8, 4)
  batch = next(iter(source.iterate(0)))
  assert batch["x"].shape == (4, 8, 8, 4) and np.all(np.isfinite(batch["x"]))
  assert set(batch["y"].tolist()) <= {0, 1, 2}


def test_rerun_recomputes_only_the_missing_shard(dirs, extracted):
  out, _ = extracted
  shards = [os.path.join(out, f"shard-{i:05d}.npy") for i in range(3)]
  before = [open(p, "rb").read() for p in shards]
  os.utime(shards[0], ns=(1, 1))   # markers: a rewritten file gets a fresh mtime
  os.utime(shards[2], ns=(1, 1))
  os.remove(shards[1])
  os.remove(os.path.join(out, "manifest.json"))
  summary = extraction.extract(f"folder:{dirs['images']}", RESOLUTION, dirs["vae"], out,
                                    batch_size=2, shard_size=3, num_workers=1, progress=False)
  assert summary["written"] == [1] and summary["kept"] == [0, 2]
  assert os.stat(shards[0]).st_mtime_ns == 1 and os.stat(shards[2]).st_mtime_ns == 1
  after = [open(p, "rb").read() for p in shards]
  assert after[0] == before[0] and after[2] == before[2]
  # The recomputed shard holds the same records (another batch size, same numbers).
  assert len(after[1]) == len(before[1])
  np.testing.assert_allclose(np.load(io.BytesIO(after[1]))["latent"].astype(np.float32),
                             np.load(io.BytesIO(before[1]))["latent"].astype(np.float32),
                             rtol=1e-3, atol=1e-3)
  assert LatentDataset(out).count == 7

  # A finished dataset: a rerun writes nothing.
  again = extraction.extract(f"folder:{dirs['images']}", RESOLUTION, dirs["vae"], out,
                                  batch_size=2, shard_size=3, num_workers=1, progress=False)
  assert again["written"] == [] and again["manifest"]["count"] == 7


def test_other_settings_into_the_same_out_are_refused(dirs, extracted):
  out, _ = extracted
  with pytest.raises(ValueError, match=r"other settings .*'shard_size': \(3, 4\)"):
    extraction.extract(f"folder:{dirs['images']}", RESOLUTION, dirs["vae"], out,
                            shard_size=4, progress=False)
  other_vae = write_vae_dir(dirs["base"] / "vae_other", seed=5)
  with pytest.raises(ValueError, match="other settings .*weights_sha256"):
    extraction.extract(f"folder:{dirs['images']}", RESOLUTION, other_vae, out,
                            shard_size=3, progress=False)


def test_decode_rgb_conversions(dirs):
  root = dirs["images"]
  kinds = {f: images.decode_rgb(os.path.join(root, f)).kind for f in FILES if "corrupt" not in f}
  assert kinds == {"ants/a0.jpg": "rgb", "ants/a1.png": "rgb", "ants/a2_cmyk.jpg": "cmyk",
                   "bees/b0_gray.jpg": "grayscale", "bees/b2_rgba.png": "other",
                   "cats/c0.bmp": "rgb", "cats/nested/c1.png": "rgb"}
  gray = images.decode_rgb(os.path.join(root, "bees/b0_gray.jpg")).pixels
  assert gray.shape == (24, 24, 3) and np.array_equal(gray[..., 0], gray[..., 2])
  deep = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
  Image.fromarray(deep).save(dirs["base"] / "deep.png")   # 16-bit grayscale
  px = images.decode_rgb(dirs["base"] / "deep.png").pixels
  np.testing.assert_array_equal(px[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
  with pytest.raises(images.CorruptImageError, match="b1_corrupt.jpg: cannot decode"):
    images.decode_rgb(os.path.join(root, "bees/b1_corrupt.jpg"))
  jpeg = open(os.path.join(root, "ants/a0.jpg"), "rb").read()
  with pytest.raises(images.CorruptImageError):
    images.decode_rgb(jpeg[: len(jpeg) // 2])   # truncated
  with pytest.raises(FileNotFoundError):
    images.decode_rgb(os.path.join(root, "missing.jpg"))


def test_bad_input(dirs, tmp_path):
  run = lambda source=f"folder:{dirs['images']}", vae=dirs["vae"], out=str(tmp_path / "o"), \
      **kw: extraction.extract(source, kw.pop("resolution", RESOLUTION), vae, out,
                                    progress=False, **kw)
  with pytest.raises(FileNotFoundError, match="VAE directory not found"):
    run(vae=str(tmp_path / "no_vae"))
  empty_vae = tmp_path / "empty_vae"
  empty_vae.mkdir()
  (empty_vae / "config.json").write_text(json.dumps(TINY_VAE))
  with pytest.raises(FileNotFoundError, match="no VAE weights"):
    run(vae=str(empty_vae))
  wrong = write_vae_dir(tmp_path / "wrong_vae", dict(TINY_VAE, block_out_channels=[8, 8]))
  with open(os.path.join(wrong, "config.json"), "w") as f:
    json.dump(TINY_VAE, f)   # weights of another config than config.json says
  with pytest.raises(ValueError, match="does not hold AutoencoderKL weights"):
    run(vae=wrong)
  with pytest.raises(ValueError, match="unknown --source 'imagenet'"):
    run(source="imagenet")
  with pytest.raises(FileNotFoundError, match="image folder .*nowhere does not exist"):
    run(source=f"folder:{tmp_path / 'nowhere'}")
  flat = tmp_path / "flat"
  flat.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "x.png")
  with pytest.raises(ValueError, match="no class subfolders"):
    run(source=f"folder:{flat}")
  with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
    run(resolution=15)
  with pytest.raises(ValueError, match="--shard_size must be a positive integer"):
    run(shard_size=0)
  assert not os.path.exists(tmp_path / "o" / "manifest.json")


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fcdm_jax.extract_latents", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli(dirs, tmp_path):
  proc = _cli("--help")
  for flag in ("--source", "--data_dir", "--resolution", "--vae", "--out", "--batch_size",
               "--shard_size", "--dtype"):
    assert flag in proc.stdout
  assert "ImageFolder layout" in proc.stdout
  proc = _cli(f"--source=folder:{dirs['images']}", f"--vae={tmp_path / 'missing'}",
              f"--out={tmp_path / 'o'}", "--resolution=16")
  assert proc.returncode != 0
  assert "error: VAE directory not found" in proc.stderr


@pytest.mark.slow
def test_tfds_source(dirs, tmp_path):
  """A prepared TFDS dataset (built offline here) is encoded in split slices."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class FcdmExtractShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(20, 24, 3)),
          "label": tfds.features.ClassLabel(names=["x", "y"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(n)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "label": i % 2}

  data_dir = str(tmp_path / "tfds")
  builder = FcdmExtractShapes(data_dir=data_dir, file_format="tfrecord")
  builder.download_and_prepare()
  out = str(tmp_path / "lat")
  summary = extraction.extract("tfds:fcdm_extract_shapes", RESOLUTION, dirs["vae"], out,
                                    data_dir=data_dir, batch_size=2, shard_size=2,
                                    progress=False)
  manifest = summary["manifest"]
  assert manifest["count"] == 5 and summary["num_shards"] == 3
  assert manifest["metadata"]["class_names"] == ["x", "y"]
  assert manifest["metadata"]["source"] == "tfds:fcdm_extract_shapes"
  examples = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
  rec = LatentDataset(out).read(np.arange(5))
  np.testing.assert_array_equal(rec["label"], [ex["label"] for ex in examples])
  model, params = vae_lib.load_vae(dirs["vae"])
  x = np.stack([center_crop_arr(ex["image"], RESOLUTION) for ex in examples])
  post = model.apply(params, jnp.asarray(x / 127.5 - 1, jnp.float32), method=model.encode)
  np.testing.assert_allclose(rec["latent"][:, 0, 0].astype(np.float32), np.asarray(post.mean),
                             rtol=2e-3, atol=2e-3)
  with pytest.raises(ValueError, match="has no split 'validation'"):
    extraction.extract("tfds:fcdm_extract_shapes", RESOLUTION, dirs["vae"], out,
                            data_dir=data_dir, split="validation", progress=False)
  with pytest.raises(ValueError, match=r"no feature 'digit' \(--label_key\)"):
    extraction.extract("tfds:fcdm_extract_shapes", RESOLUTION, dirs["vae"], out,
                            data_dir=data_dir, label_key="digit", progress=False)
