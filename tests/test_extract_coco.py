"""`fcdm_jax.extract_latents` on captioned sources: a tiny MS-COCO 2014 tree in its official
layout (`coco:ROOT`) and a TFDS builder with coco_captions' feature layout
(`tfds:NAME --captions_key=captions/text`), with the tiny VAE and a tiny text encoder:
latents of the decodable images, per-shard caption sidecars, and the caption folder the
text-to-image run trains on; resuming keeps it, another encoder is refused."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from fcdm_jax import extraction
from fcdm_jax.data import image_sources
from fcdm_jax.data import LatentDataset
from fcdm_jax.data.captions import CaptionTable
from fcdm_jax.models.text_encoder import load_text_encoder
from helpers.image_files import (CORRUPT, IMAGES, KEPT, SPLIT, captions_of, file_name,
                                  write_coco)
from helpers.model_files import RESOLUTION, write_vae_dir
from helpers.text import write_text_encoder

TEXT_DIM = 16   # write_text_encoder's default width


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  d = tmp_path_factory.mktemp("coco")
  return dict(vae=write_vae_dir(d / "vae"), coco=write_coco(d / "coco"),
              text=write_text_encoder(d / "text"), base=d)


def run(dirs, out, source=None, **kw):
  kw = dict(dict(split=SPLIT, batch_size=4, shard_size=2, num_workers=2, text_batch_size=4,
                 progress=False), **kw)
  return extraction.extract(source or f"coco:{dirs['coco']}", RESOLUTION, dirs["vae"],
                                 str(out), **kw)


def files_of(folder, prefix=""):
  """{name: (mtime, bytes)} of the files in `folder` whose names start with `prefix`."""
  names = [n for n in sorted(os.listdir(folder)) if n.startswith(prefix)
           and os.path.isfile(os.path.join(folder, n))]
  return {n: (os.stat(os.path.join(folder, n)).st_mtime_ns,
              open(os.path.join(folder, n), "rb").read()) for n in names}


def check_caption_folder(folder, encoder_dir, captions):
  table = CaptionTable(folder, num_examples=len(captions), dim=TEXT_DIM)
  texts = [c for cs in captions for c in cs]
  assert table.texts() == texts
  np.testing.assert_array_equal(np.diff(table.offsets), [len(c) for c in captions])
  encoder = load_text_encoder(encoder_dir)
  assert table.manifest["encoder"] == encoder.identity
  np.testing.assert_allclose(table.embeddings, encoder.encode(texts), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(table.empty, encoder.empty(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def extracted(dirs):
  """Latents and sidecars first, then the same command with --text_encoder."""
  out = dirs["base"] / "latents"
  first = run(dirs, out)
  first["had_caption_folder"] = os.path.exists(out / "captions")
  second = run(dirs, out, text_encoder=dirs["text"])
  return str(out), first, second


def test_coco_latents_sidecars_then_caption_folder(dirs, extracted):
  out, first, second = extracted
  manifest = first["manifest"]
  assert first["written"] == [0, 1, 2] and first["captions"] is None
  assert not first["had_caption_folder"]
  assert manifest["count"] == len(KEPT) and manifest["num_classes"] == 1
  assert manifest["stats"]["skipped_corrupt"] == 1 and manifest["stats"]["images"] == 6
  meta = manifest["metadata"]
  assert meta["class_names"] == ["coco"] and meta["source"] == f"coco:{dirs['coco']}"
  assert meta["skipped_files"] == [f"{SPLIT}/{file_name(CORRUPT)}"]
  assert meta["num_captions"] == sum(len(c) for _, c in IMAGES.values())
  ds = LatentDataset(out)
  assert len(ds) == len(KEPT) and ds.shape == (8, 8, 4)
  assert ds.read(np.arange(len(ds)))["label"].tolist() == [0] * len(KEPT)
  # Sidecars: the kept examples' captions of each shard (ids 3 7 | 19 25 | 42 88).
  sidecars = [json.loads(open(extraction.sidecar_path(out, i)).read()) for i in range(3)]
  assert sidecars == [[captions_of(3), captions_of(7)], [captions_of(25)],
                      [captions_of(42), captions_of(88)]]

  # The rerun with --text_encoder encodes no image and writes the caption folder.
  assert second["written"] == [] and second["captions_written"]
  check_caption_folder(os.path.join(out, "captions"), dirs["text"],
                       [captions_of(i) for i in KEPT])


def test_rerun_keeps_everything_and_refuses_another_encoder(dirs, extracted):
  out, _, _ = extracted
  folder = os.path.join(out, "captions")
  for name in os.listdir(out):
    if name.startswith("shard-"):
      os.utime(os.path.join(out, name), ns=(1, 1))   # a rewritten file gets a fresh mtime
  shards = files_of(out, "shard-")
  captions = files_of(folder)
  again = run(dirs, out, text_encoder=dirs["text"])
  assert again["written"] == [] and not again["captions_written"]
  assert again["captions"]["num_examples"] == len(KEPT)
  assert files_of(folder) == captions

  other = write_text_encoder(dirs["base"] / "text_other", seed=1)
  with pytest.raises(ValueError, match="holds captions encoded otherwise.*weights_sha256"):
    run(dirs, out, text_encoder=other)
  with pytest.raises(ValueError, match="holds captions encoded otherwise.*projected"):
    run(dirs, out, text_encoder=dirs["text"], text_pooling="projected")
  assert files_of(folder) == captions

  # A changed annotation file is other settings: refused before anything is encoded.
  ann = os.path.join(dirs["coco"], "annotations", f"captions_{SPLIT}.json")
  saved = open(ann).read()
  data = json.loads(saved)
  data["annotations"][0]["caption"] = "an edited caption"
  try:
    with open(ann, "w") as f:
      json.dump(data, f)
    with pytest.raises(ValueError, match="other settings .*listing_sha256"):
      run(dirs, out, text_encoder=dirs["text"])
  finally:
    with open(ann, "w") as f:
      f.write(saved)
  assert files_of(out, "shard-") == shards
  assert files_of(folder) == captions


def test_bad_coco_input(dirs, tmp_path):
  out = tmp_path / "o"
  ann = os.path.join(dirs["coco"], "annotations", "captions_val2014.json")
  with pytest.raises(FileNotFoundError, match=f"val2014 .*{ann}; missing: .*val2014.*{ann}"):
    run(dirs, out, split="val2014")
  with pytest.raises(FileNotFoundError, match="missing: .*/train, .*captions_train.json"):
    run(dirs, out, split="train")    # the TFDS default split names no COCO split
  folder = tmp_path / "folder" / "cls"
  folder.mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "x.png")
  with pytest.raises(ValueError, match="--text_encoder: folder:.* has no captions"):
    run(dirs, out, source=f"folder:{folder.parent}", text_encoder=dirs["text"])
  with pytest.raises(ValueError, match="--captions_key=captions/text is for tfds"):
    run(dirs, out, captions_key="captions/text")

  # An image without a caption is an error naming it.
  root = tmp_path / "coco"
  write_coco(root)
  path = root / "annotations" / f"captions_{SPLIT}.json"
  original = path.read_text()
  data = json.loads(original)
  data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 88]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=f"1 images have no caption, e.g. {file_name(88)}"):
    image_sources.CocoImages(str(root), SPLIT)
  path.write_text(original)
  os.remove(root / SPLIT / file_name(7))   # listed, but not in the image folder
  with pytest.raises(FileNotFoundError, match=f"1 images .* are not in .*{file_name(7)}"):
    image_sources.CocoImages(str(root), SPLIT)
  assert not os.path.exists(out / "manifest.json")


def test_tfds_coco_captions_layout(dirs, tmp_path):
  """A TFDS builder with the features of TFDS coco_captions (its COCO features plus
  `captions`: Sequence({'text', 'id'})), prepared offline: captions from captions/text."""
  tfds = pytest.importorskip("tensorflow_datasets")
  captions = [["a red zero", " the digit zero "], ["green one", "a one", "one"],
              ["a blue two"], ["yellow three", "three in yellow"]]

  class FcdmCocoCaptionsLayout(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "image/filename": tfds.features.Text(),
          "image/id": np.int64,
          "objects": tfds.features.Sequence({
              "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
              "label": tfds.features.ClassLabel(num_classes=80), "is_crowd": np.bool_}),
          "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(4)
      for i, caps in enumerate(captions):
        yield i, {"image": rng.integers(0, 256, (20 + 2 * i, 24, 3), dtype=np.uint8),
                  "image/filename": f"{i}.jpg", "image/id": 100 + i,
                  "objects": [{"id": i, "area": 4, "label": i, "is_crowd": False,
                               "bbox": tfds.features.BBox(0.1, 0.1, 0.5, 0.5)}],
                  "captions": [{"text": t, "id": 10 * i + j} for j, t in enumerate(caps)]}

  data_dir = str(tmp_path / "tfds")
  builder = FcdmCocoCaptionsLayout(data_dir=data_dir, file_format="tfrecord")
  builder.download_and_prepare()
  out = tmp_path / "lat"
  tfds_run = lambda **kw: run(dirs, out, "tfds:fcdm_coco_captions_layout", data_dir=data_dir,
                              split="train", shard_size=3, **kw)
  with pytest.raises(ValueError, match=r"no feature 'label' \(--label_key\)"):
    tfds_run()   # without --captions_key it wants a ClassLabel
  with pytest.raises(ValueError, match=r"no feature 'captions/caption' \(--captions_key\)"):
    tfds_run(captions_key="captions/caption")
  with pytest.raises(ValueError, match="feature 'captions/id' .* not text"):
    tfds_run(captions_key="captions/id")
  summary = tfds_run(captions_key="captions/text", text_encoder=dirs["text"])
  manifest = summary["manifest"]
  assert manifest["count"] == 4 and summary["num_shards"] == 2 and summary["captions_written"]
  assert manifest["metadata"]["class_names"] == ["fcdm_coco_captions_layout"]
  assert manifest["metadata"]["captions_key"] == "captions/text"
  assert LatentDataset(str(out)).read(np.arange(4))["label"].tolist() == [0] * 4
  # In the split's order (TFDS orders examples by a hash of their key), each example's
  # captions in their Sequence order, stripped.
  order = [int(ex["image/id"]) - 100 for ex in
           tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False))]
  assert sorted(order) == [0, 1, 2, 3]
  check_caption_folder(str(out / "captions"), dirs["text"],
                       [[t.strip() for t in captions[i]] for i in order])
