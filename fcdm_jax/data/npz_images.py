"""ADM-format `.npz` image batches as training data (`config.data.source='npz'`).

The file at `config.data.path` (local or gs://) holds `arr_0`, uint8 (N, H, W, C) images
with C 1 or 3, and optionally `arr_1`, (N,) integer class labels (else every label is 0):
ADM's sample and reference batches, `np.savez` of such arrays, or what
`fcdm_jax.sample` writes (`sampling.adm_npz`, whose reader streams 3-channel batches in
order and so cannot serve random access). Other arrays in the file are ignored.

Guarantees: pixel space, images scaled to [-1, 1] as every pixel source does
(`embedded.to_model_range`); the order, flips and host split are the pipeline's
(`pipeline.Source`); the element shape, dtype and labels are checked when the source is
built, with errors naming the file. An uncompressed `arr_0` (`np.savez`, ADM's writer) is
read per batch, one byte range per image, so a 50k-image batch need not fit in memory; a
compressed one (`np.savez_compressed`) is decompressed into host memory once, refused above
`config.data.max_in_memory_gb`. A text-conditioned run names its caption folder in
`config.data.captions` (a file has no folder beside it to default to).
"""

from __future__ import annotations

import logging
import struct
import zipfile

import numpy as np

from fcdm_jax import fileio
from fcdm_jax.data import pipeline
from fcdm_jax.data.embedded import to_model_range

IMAGES, LABELS = "arr_0", "arr_1"
_LOCAL_HEADER = struct.Struct("<4s22xHH")   # zip local file header: signature .. name, extra


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) of the .npy stream `f`, left at its data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)


class NpzImageSource(pipeline.Source):
  """Training batches of an ADM-format `.npz` image batch, in [-1, 1]."""

  def __init__(self, path: str, *, max_in_memory_gb: float, expected_shape, num_classes: int,
               **kwargs):
    found = pipeline.data_path(path, "npz image batch", "an ADM-format .npz image batch "
                               "(arr_0 uint8 (N, H, W, C) images, optional arr_1 labels)")
    if not fileio.isfile(found):
      raise FileNotFoundError(f"npz image batch {found} is a directory, not an .npz file")
    self.path = str(path)
    where = f"npz image batch {path}"
    self.images = None      # uint8 (N, H, W, C) in memory, for a compressed arr_0
    self.offset = None      # else where arr_0's data starts in the file
    try:
      with fileio.open_read(path) as fh, zipfile.ZipFile(fh) as z:
        members = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
        if IMAGES not in members:
          raise ValueError(f"{where} has no '{IMAGES}' array (it holds {sorted(members)}); "
                           f"the images must be '{IMAGES}', uint8 (N, H, W, C)")
        info = z.getinfo(members[IMAGES])
        with z.open(info) as f:
          shape, fortran, dtype = _npy_header(f)
          header_bytes = f.tell()
        self._check_images(shape, fortran, dtype, where)
        pipeline.check_element_shape(shape[1:], expected_shape, where,
                                     f"config.image_size={expected_shape[0]}, "
                                     f"config.model.in_channels={expected_shape[2]}")
        if info.compress_type == zipfile.ZIP_STORED:
          fh.seek(info.header_offset)
          magic, name_len, extra_len = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
          if magic != b"PK\x03\x04":
            raise ValueError(f"{where}: the zip entry of '{IMAGES}' has a bad local header")
          if info.file_size < header_bytes + int(np.prod(shape)):
            raise ValueError(f"{where}: '{IMAGES}' is truncated ({info.file_size} bytes for "
                             f"{shape} uint8)")
          self.offset = (info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                         + header_bytes)
        else:
          gb = np.prod(shape) / 1e9
          if gb > max_in_memory_gb:
            raise ValueError(f"{where} stores '{IMAGES}' compressed ({gb:.1f} GB decompressed, "
                             f"more than config.data.max_in_memory_gb={max_in_memory_gb}); "
                             "save it with np.savez (uncompressed: read per batch)")
          with z.open(info) as f:
            self.images = np.lib.format.read_array(f, allow_pickle=False)
        labels = None
        if LABELS in members:
          with z.open(members[LABELS]) as f:
            labels = np.lib.format.read_array(f, allow_pickle=False)
    except zipfile.BadZipFile as e:
      raise ValueError(f"{where} is not an .npz file: {e}") from e
    n = shape[0]
    if labels is None:
      labels = np.zeros(n, np.int32)
    elif labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{where}: '{LABELS}' must be integer class labels of shape ({n},), "
                       f"got {labels.dtype} {labels.shape}")
    pipeline.check_labels(labels, num_classes, where)
    self.labels = labels.astype(np.int32)
    self.image_bytes = int(np.prod(shape[1:]))
    if self.images is None:
      logging.info("data: %s: reading uncompressed '%s' per batch", where, IMAGES)
    super().__init__(element_shape=shape[1:], num_classes=num_classes, num_examples=n,
                     description=where, **kwargs)

  @staticmethod
  def _check_images(shape, fortran: bool, dtype: np.dtype, where: str) -> None:
    if dtype != np.uint8:
      raise ValueError(f"{where}: '{IMAGES}' has dtype {dtype}; images must be uint8 in 0..255")
    if len(shape) != 4 or shape[-1] not in (1, 3):
      raise ValueError(f"{where}: '{IMAGES}' has shape {shape}; images must be (N, H, W, C) "
                       "with C 1 or 3, channels last")
    if fortran:
      raise ValueError(f"{where}: '{IMAGES}' is stored in Fortran order; save it C-contiguous")

  @classmethod
  def from_config(cls, data, **common):
    return cls(data.path, max_in_memory_gb=float(data.get("max_in_memory_gb", 8.0)), **common)

  @classmethod
  def caption_folder(cls, data) -> str:
    """No default: a text-conditioned run names its captions in config.data.captions."""
    del data
    return ""

  def _load(self, indices, flips):
    if self.images is not None:
      images = self.images[indices]
    else:
      starts = [self.offset + int(i) * self.image_bytes for i in indices]
      chunks = fileio.read_ranges([self.path] * len(starts), starts,
                                  [s + self.image_bytes for s in starts])
      images = np.frombuffer(b"".join(chunks), np.uint8).reshape(
          (len(starts), *self.element_shape))
    x = to_model_range(images)
    x[flips] = x[flips, :, ::-1]
    return {"x": x, "y": self.labels[indices]}
