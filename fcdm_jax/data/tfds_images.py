"""TFDS image datasets by name and data_dir, in pixel space.

Images go through ADM's centre crop to `config.image_size` (preprocess.py) and are
scaled to [-1, 1]; labels come from the dataset's ClassLabel feature.

Every host reads any example of the split (the global order of pipeline.py), so the
dataset needs random access:
  - prepared in the `array_record` (or another random-access) file format: read with
    `builder.as_data_source(split)`, decoded per batch on a thread pool; any size.
    Prepare with `tfds build NAME --data_dir=DIR --file_format=array_record`.
  - prepared as `tfrecord` (the usual default): the split is decoded and cropped once
    into host memory (uint8), refused above `config.data.max_in_memory_gb`; fine for
    MNIST/CIFAR-sized data, convert larger ones to array_record.
Nothing is downloaded: a dataset that is not prepared in data_dir is an error.
"""

from __future__ import annotations

import logging


import numpy as np

from fcdm_jax import fileio
from fcdm_jax.data import pipeline
from fcdm_jax.data.embedded import to_model_range
from fcdm_jax.data.preprocess import center_crop_arr


def load_builder(name: str, data_dir: str):
  if not name:
    raise ValueError("config.data.tfds_name is empty: name the TFDS dataset (e.g. 'mnist')")
  if data_dir and not fileio.isdir(data_dir):
    raise FileNotFoundError(f"config.data.data_dir {data_dir} does not exist")
  import tensorflow_datasets as tfds   # deferred: heavy, TFDS sources only
  where = f"TFDS dataset {name!r} in data_dir {data_dir or '(TFDS default)'}"
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # tfds raises several kinds of "not found"
    raise FileNotFoundError(f"{where} not found: {e}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"{where} is not prepared (nothing is downloaded at run time): "
                            f"`tfds build {name} --data_dir=DIR --file_format=array_record`")
  return builder, where


def load_image_builder(name: str, data_dir: str, image_key: str, label_key: str,
                       key_flags: tuple[str, str]):
  """(builder, description, ClassLabel feature) of a prepared TFDS image dataset.

  Clear errors for a missing dataset, a missing image or label feature, or a label that
  is not a ClassLabel; `key_flags` names the settings that chose the keys, for the messages.
  """
  builder, where = load_builder(name, data_dir)
  features = builder.info.features
  for key, flag in zip((image_key, label_key), key_flags):
    if key not in features:
      raise ValueError(f"{where} has no feature {key!r} ({flag}); it has "
                       f"{sorted(features.keys())}")
  labels = features[label_key]
  if getattr(labels, "num_classes", None) is None:
    raise ValueError(f"{where}: feature {label_key!r} is not a ClassLabel")
  return builder, where, labels


class TfdsSource(pipeline.Source):
  """Training batches of a prepared TFDS image dataset, centre-cropped, in [-1, 1]."""

  def __init__(self, name: str, *, data_dir: str, split: str, image_key: str,
               label_key: str, num_workers: int, max_in_memory_gb: float,
               expected_shape, num_classes: int, **kwargs):
    builder, where, labels = load_image_builder(
        name, data_dir, image_key, label_key, ("config.data.image_key", "config.data.label_key"))
    ds_classes = labels.num_classes
    channels = builder.info.features[image_key].shape[-1]
    size = expected_shape[0]
    where = f"{where}, split {split!r}"
    pipeline.check_element_shape(
        (size, size, channels), expected_shape, where,
        f"images are centre-cropped to config.image_size={size}; config.model.in_channels="
        f"{expected_shape[2]}")
    pipeline.check_num_classes(ds_classes, num_classes, where)
    self.size, self.image_key, self.label_key = size, image_key, label_key
    self.num_workers = num_workers
    self.images = self.labels = self.data = None
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format == "tfrecord":
      n = builder.info.splits[split].num_examples
      need_gb = n * size * size * channels / 1e9
      if need_gb > max_in_memory_gb:
        raise ValueError(f"{where} is in the tfrecord format, which has no random access, "
                         f"and holding it in memory needs {need_gb:.1f} GB > "
                         f"config.data.max_in_memory_gb={max_in_memory_gb}; prepare it with "
                         f"--file_format=array_record instead")
      self.images, self.labels = self._read_all(builder, split)
      pipeline.check_labels(self.labels, ds_classes, where)
      n = len(self.labels)
    else:
      self.data = builder.as_data_source(split)
      n = len(self.data)
    logging.info("data: %s, %d examples, %s", where, n, file_format)
    super().__init__(element_shape=expected_shape, num_classes=ds_classes, num_examples=n,
                     description=where, **kwargs)

  @classmethod
  def from_config(cls, data, **common):
    return cls(data.tfds_name, data_dir=data.data_dir, split=data.get("split", "train"),
               image_key=data.get("image_key", "image"),
               label_key=data.get("label_key", "label"),
               num_workers=int(data.get("num_workers", 4)),
               max_in_memory_gb=float(data.get("max_in_memory_gb", 8.0)), **common)

  def _read_all(self, builder, split):
    import tensorflow as tf   # deferred (both): heavy, TFDS sources only
    import tensorflow_datasets as tfds
    tf.config.set_visible_devices([], "GPU")  # never let TF take accelerator memory
    images, labels = [], []
    ds = builder.as_dataset(split=split, shuffle_files=False)
    for ex in tfds.as_numpy(ds):
      images.append(center_crop_arr(ex[self.image_key], self.size))
      labels.append(ex[self.label_key])
    return np.stack(images), np.asarray(labels, np.int64)

  def _example(self, ex):
    return center_crop_arr(np.asarray(ex[self.image_key]), self.size), ex[self.label_key]

  def _load(self, indices, flips):
    if self.data is not None:
      examples = self.data.__getitems__([int(i) for i in indices])
      pairs = pipeline.parallel_map(self._example, examples, self.num_workers)
      images = np.stack([p[0] for p in pairs])
      labels = np.asarray([p[1] for p in pairs], np.int64)
    else:
      images, labels = self.images[indices], self.labels[indices]
    x = to_model_range(images)
    x[flips] = x[flips, :, ::-1]
    return {"x": x, "y": labels}
