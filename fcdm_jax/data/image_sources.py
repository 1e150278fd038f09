"""Images to extract or score, read the same way from an ImageFolder tree, MS-COCO 2014
or a prepared TFDS dataset: (name, bytes, label, captions) records, decoded and ADM
centre-cropped a shard at a time with corrupt files counted and left out.

`open_source(spec)` takes `folder:PATH` (PATH/CLASS/**/IMAGE, labels by sorted class
folder, ImageFolder's file order), `coco:ROOT` (ROOT/<split>/ and
annotations/captions_<split>.json, ascending image id, captions in annotation id order,
labels 0) or `tfds:NAME` (a prepared dataset; captions from a text feature path with
`captions_key`, '/' stepping into Sequences). `load_shard` decodes examples [start, end) on
a thread pool, converting CMYK/grayscale/other modes to RGB as ADM's loader does. Latent
extraction and reference statistics both read images through here, so they crop and skip
alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from concurrent import futures
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from fcdm_jax import fileio, images
from fcdm_jax.data.preprocess import center_crop_arr
from fcdm_jax.data.tfds_images import load_builder, load_image_builder

COUNTERS = ("images", "encoded", "skipped_corrupt", "converted_cmyk", "converted_grayscale",
            "converted_other")
_KIND_COUNTER = {images.CMYK: "converted_cmyk", images.GRAYSCALE: "converted_grayscale",
                 images.OTHER: "converted_other"}


# ------------------------------------------------------------------------------- sources


class RawExample(NamedTuple):
  data: str | bytes   # a file path or the encoded image bytes
  label: int
  name: str           # how a skipped example is reported
  captions: tuple[str, ...] = ()   # a captioned source's captions of this image


class FolderImages:
  """The ImageFolder layout: ROOT/CLASS/**/IMAGE, labels by sorted class-folder name."""

  has_captions = False

  def __init__(self, root: str):
    self.root = fileio.absolute(root)
    listing = images.list_image_folder(self.root)
    if not listing.files:
      raise ValueError(f"no image files ({', '.join(images.IMAGE_EXTENSIONS)}) under the "
                       f"class folders of {self.root}")
    self.class_names = listing.class_names
    self.files, self.labels = listing.files, listing.labels
    self.num_examples = len(self.files)
    digest = hashlib.sha256()
    for f, label in zip(self.files, self.labels):
      digest.update(f"{f}\t{label}\n".encode())
    self.identity = {"source": f"folder:{self.root}", "num_examples": self.num_examples,
                     "listing_sha256": digest.hexdigest()}
    self.metadata = {"ignored_files": listing.ignored}

  def examples(self, start: int, end: int) -> list[RawExample]:
    return [RawExample(fileio.join(self.root, self.files[i]), self.labels[i], self.files[i])
            for i in range(start, end)]


class CocoImages:
  """MS-COCO (2014) from its official files: ROOT/<split>/<file_name> images and the
  captions of ROOT/annotations/captions_<split>.json, in ascending image id order."""

  has_captions = True

  def __init__(self, root: str, split: str):
    self.root, self.split = fileio.absolute(root), split
    self.image_dir = fileio.join(self.root, split)
    self.annotations = fileio.join(self.root, "annotations", f"captions_{split}.json")
    missing = [p for p in (self.image_dir, self.annotations) if not fileio.exists(p)]
    if missing:
      raise FileNotFoundError(
          f"coco:{self.root} with --split={split} reads the images of {self.image_dir} and "
          f"the captions of {self.annotations}; missing: {', '.join(missing)} (MS-COCO 2014 "
          "splits: --split=train2014 or --split=val2014)")
    try:
      data = json.loads(fileio.read_text(self.annotations))
      listed = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
      notes = [(int(a["image_id"]), int(a["id"]), str(a["caption"]))
               for a in data["annotations"]]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{self.annotations} is not a COCO captions file ({{'images': [{{'id', "
                       f"'file_name'}}], 'annotations': [{{'image_id', 'id', 'caption'}}]}}): "
                       f"{type(e).__name__}: {e}") from e
    files = dict(listed)
    if len(files) != len(listed):
      raise ValueError(f"{self.annotations} lists some image ids more than once")
    by_image: dict[int, list[tuple[int, str]]] = {i: [] for i in files}
    unknown = sorted({i for i, _, _ in notes if i not in files})
    if unknown:
      raise ValueError(f"{self.annotations}: captions of image ids {unknown[:8]} that are not "
                       "in its 'images'")
    for image_id, note_id, caption in notes:
      if caption.strip():   # an empty caption would be the unconditional input
        by_image[image_id].append((note_id, caption.strip()))
    self.ids = sorted(files)
    self.files = [files[i] for i in self.ids]
    self.captions = [tuple(c for _, c in sorted(by_image[i])) for i in self.ids]
    bare = [f"{files[i]} (id {i})" for i, c in zip(self.ids, self.captions) if not c]
    if bare:
      raise ValueError(f"{self.annotations}: {len(bare)} images have no caption, e.g. "
                       f"{', '.join(bare[:5])}: a text-to-image dataset needs one per image "
                       "(is this the captions file of this split?)")
    present = set(fileio.listdir(self.image_dir))
    absent = [f for f in self.files if f not in present]
    if absent:
      raise FileNotFoundError(f"{len(absent)} images of {self.annotations} are not in "
                              f"{self.image_dir}, e.g. {absent[:5]}")
    self.class_names = ["coco"]
    self.num_examples = len(self.ids)
    digest = hashlib.sha256()
    for i, f, c in zip(self.ids, self.files, self.captions):
      digest.update((json.dumps([i, f, c]) + "\n").encode())
    self.identity = {"source": f"coco:{self.root}", "split": split,
                     "num_examples": self.num_examples, "listing_sha256": digest.hexdigest()}
    self.metadata = {"annotations": self.annotations,
                     "num_captions": sum(len(c) for c in self.captions)}

  def examples(self, start: int, end: int) -> list[RawExample]:
    return [RawExample(fileio.join(self.image_dir, self.files[i]), 0,
                       f"{self.split}/{self.files[i]}", self.captions[i])
            for i in range(start, end)]


def _split_key(keys, key: str) -> tuple[str | None, str]:
  """(the longest '/'-prefix of `key` that is one of `keys`, the rest): TFDS names features
  'image/id' as well as nesting them ('captions' -> 'text')."""
  parts = key.split("/")
  for i in range(len(parts), 0, -1):
    head = "/".join(parts[:i])
    if head in keys:
      return head, "/".join(parts[i:])
  return None, key


def _text_feature(features, key: str, where: str):
  """Checks that `key` names a text feature (inside Sequences and FeaturesDicts)."""
  from tensorflow_datasets.core.features import Sequence   # deferred: heavy, TFDS only
  node, rest = features, key
  while True:
    while isinstance(node, Sequence):
      node = node.feature
    if not rest:
      break
    head, rest = _split_key(list(node.keys()) if hasattr(node, "keys") else [], rest)
    if head is None:
      raise ValueError(f"{where} has no feature {key!r} (--captions_key); it has "
                       f"{sorted(features.keys())} (TFDS coco_captions: captions/text)")
    node = node[head]
  if getattr(getattr(node, "tf_dtype", None), "name", None) != "string":
    raise ValueError(f"{where}: feature {key!r} (--captions_key) is {type(node).__name__}, "
                     "not text")


def _texts_at(example, key: str) -> tuple[str, ...]:
  """The strings under `key` of a decoded (numpy) TFDS example, stripped, empty ones left out."""
  node, rest = example, key
  while rest:
    head, rest = _split_key(node, rest)
    node = node[head]
  texts = (t.decode("utf-8") if isinstance(t, bytes) else str(t)
           for t in np.atleast_1d(np.asarray(node, dtype=object)).reshape(-1))
  return tuple(t.strip() for t in texts if t.strip())


class TfdsImages:
  """A prepared TFDS image dataset, read by split slices with the images left encoded.

  With `captions_key` (e.g. 'captions/text' of coco_captions) each example carries the
  captions under that feature path and every label is 0 (no ClassLabel is needed)."""

  def __init__(self, name: str, data_dir: str, split: str, image_key: str, label_key: str,
               captions_key: str = ""):
    import tensorflow as tf   # deferred: TensorFlow is heavy and only TFDS sources need it
    tf.config.set_visible_devices([], "GPU")  # TF must never take accelerator memory
    self.captions_key = captions_key
    self.has_captions = bool(captions_key)
    if captions_key:
      self.builder, where = load_builder(name, data_dir)
      features = self.builder.info.features
      if image_key not in features:
        raise ValueError(f"{where} has no feature {image_key!r} (--image_key); it has "
                         f"{sorted(features.keys())}")
      _text_feature(features, captions_key, where)
      names = [name]
    else:
      self.builder, where, labels = load_image_builder(name, data_dir, image_key, label_key,
                                                       ("--image_key", "--label_key"))
      names = labels.names
    splits = self.builder.info.splits
    if split not in splits:
      raise ValueError(f"{where} has no split {split!r}; it has {sorted(splits.keys())}")
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    self.class_names = list(names)
    self.num_examples = int(splits[split].num_examples)
    self.identity = {"source": f"tfds:{name}", "version": str(self.builder.info.version),
                     "split": split, "num_examples": self.num_examples}
    if captions_key:
      self.identity["captions_key"] = captions_key
    self.metadata = {"data_dir": data_dir}

  def examples(self, start: int, end: int) -> list[RawExample]:
    import tensorflow_datasets as tfds   # deferred: heavy, TFDS sources only
    ds = self.builder.as_dataset(
        split=f"{self.split}[{start}:{end}]", shuffle_files=False,
        decoders={self.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=1))
    out = []
    for j, ex in enumerate(tfds.as_numpy(ds)):
      where = f"{self.name}/{self.split}[{start + j}]"
      if self.captions_key:
        captions = _texts_at(ex, self.captions_key)
        if not captions:
          raise ValueError(f"TFDS {where} has no caption under {self.captions_key!r}: a "
                           "text-to-image dataset needs one per image")
        out.append(RawExample(bytes(ex[self.image_key]), 0, where, captions))
      else:
        out.append(RawExample(bytes(ex[self.image_key]), int(ex[self.label_key]), where))
    if len(out) != end - start:
      raise RuntimeError(f"TFDS {self.name} {self.split}[{start}:{end}] gave {len(out)} "
                         f"examples, expected {end - start}")
    return out


def open_source(spec: str, data_dir: str = "", split: str = "train", image_key: str = "image",
                label_key: str = "label", captions_key: str = ""):
  kind, _, arg = spec.partition(":")
  if captions_key and kind != "tfds":
    raise ValueError(f"--captions_key={captions_key} is for tfds: sources (coco: reads the "
                     "captions of its annotations file; folder: has none)")
  if kind == "folder" and arg:
    return FolderImages(arg)
  if kind == "coco" and arg:
    return CocoImages(arg, split)
  if kind == "tfds" and arg:
    return TfdsImages(arg, data_dir, split, image_key, label_key, captions_key)
  raise ValueError(f"unknown --source {spec!r}: expected folder:PATH (ImageFolder layout), "
                   "coco:ROOT (MS-COCO 2014 images and captions JSON) or tfds:NAME (a "
                   "prepared TFDS dataset in --data_dir)")


# ------------------------------------------------------------------------- loading images


@dataclasses.dataclass
class ShardImages:
  pixels: np.ndarray            # uint8 (n, R, R, 3), the images that decoded
  labels: np.ndarray            # int64 (n,)
  stats: dict[str, Any]
  captions: list[tuple[str, ...]] = dataclasses.field(default_factory=list)  # of the n kept


def _prepare(example: RawExample, resolution: int):
  try:
    decoded = images.decode_rgb(example.data)
  except images.CorruptImageError as e:
    return None, "corrupt", str(e)
  return center_crop_arr(decoded.pixels, resolution), decoded.kind, None


def load_shard(source, start: int, end: int, resolution: int,
               pool: futures.Executor) -> ShardImages:
  """Decode and centre-crop examples [start, end) on the pool; corrupt ones are left out."""
  examples = source.examples(start, end)
  prepared = list(pool.map(lambda e: _prepare(e, resolution), examples))
  stats: dict[str, Any] = {k: 0 for k in COUNTERS}
  stats["images"] = len(examples)
  stats["skipped_files"] = []
  pixels, labels, captions = [], [], []
  for example, (crop, kind, error) in zip(examples, prepared):
    if crop is None:
      logging.warning("skipping %s", error)
      stats["skipped_corrupt"] += 1
      stats["skipped_files"].append(example.name)
      continue
    if kind in _KIND_COUNTER:
      stats[_KIND_COUNTER[kind]] += 1
    pixels.append(crop)
    labels.append(example.label)
    captions.append(tuple(example.captions))
  stats["encoded"] = len(pixels)
  shape = (0, resolution, resolution, 3)
  return ShardImages(np.stack(pixels) if pixels else np.zeros(shape, np.uint8),
                     np.asarray(labels, np.int64), stats, captions)
