"""ADM's sample batch format (`.npz`: `arr_0` uint8 NHWC RGB images, `arr_1` int64 labels):
the reader the evaluator uses and the writer the sampling CLI uses, both streaming, so
that 50k images at 512 px need not fit in memory.
"""

from __future__ import annotations

import zipfile
from typing import Iterable, Iterator

import numpy as np

from fcdm_jax import fileio


def npz_name(num_samples: int, height: int, width: int) -> str:
  """ADM's naming of a sample batch."""
  return f"samples_{num_samples}x{height}x{width}x3.npz"


def write_batch(path: str, size: tuple[int, int, int], chunks: Iterable[np.ndarray],
                labels: np.ndarray) -> None:
  """Writes `path` atomically from uint8 (n, H, W, 3) `chunks` that together hold the
  `size` = (N, H, W) images, one chunk in memory at a time; `labels` become `arr_1`."""
  n, height, width = size
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
            "shape": (n, height, width, 3)}

  def write(tmp):
    written = 0
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
      with z.open("arr_0.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
          if chunk.dtype != np.uint8 or chunk.shape[1:] != (height, width, 3):
            raise ValueError(f"image chunk {chunk.dtype} {chunk.shape} is not uint8 "
                             f"(n, {height}, {width}, 3)")
          f.write(np.ascontiguousarray(chunk).tobytes())
          written += len(chunk)
      if written != n:
        raise ValueError(f"{written} images were written for a batch of {n}")
      with z.open("arr_1.npy", "w") as f:
        np.lib.format.write_array(f, np.asarray(labels, np.int64), allow_pickle=False)

  fileio.atomic_write(path, write)


class NpzImages:
  """An image array of an `.npz` batch, checked up front and read in slices."""

  def __init__(self, path: str, key: str = "arr_0"):
    if not fileio.isfile(path):
      raise FileNotFoundError(f"batch file not found: {path}")
    self.path, self.key = path, key
    try:
      with fileio.open_read(path) as fh, zipfile.ZipFile(fh) as z:
        names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        if key not in names:
          raise ValueError(f"{path} has no '{key}' array (it holds {sorted(names)}); an ADM "
                           f"batch stores its images as '{key}', uint8 (N, H, W, 3)")
        with z.open(f"{key}.npy") as f:
          self.shape, fortran, self.dtype = self._header(f)
    except zipfile.BadZipFile as e:
      raise ValueError(f"{path} is not an .npz file: {e}") from e
    if fortran:
      raise ValueError(f"{path}:{key} is stored in Fortran order; save it C-contiguous")
    if self.dtype != np.uint8:
      raise ValueError(f"{path}:{key} has dtype {self.dtype}; images must be uint8 in 0..255 "
                       "(ADM's format)")
    if len(self.shape) != 4 or self.shape[-1] != 3:
      raise ValueError(f"{path}:{key} has shape {self.shape}; images must be (N, H, W, 3) "
                       "RGB, channels last")
    if self.shape[0] == 0:
      raise ValueError(f"{path}:{key} holds no images")

  @staticmethod
  def _header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)

  def __len__(self) -> int:
    return self.shape[0]

  @property
  def image_size(self) -> tuple[int, int]:
    return self.shape[1], self.shape[2]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    per_image = int(np.prod(self.shape[1:]))
    with fileio.open_read(self.path) as fh, zipfile.ZipFile(fh) as z, \
         z.open(f"{self.key}.npy") as f:
      self._header(f)
      for start in range(0, len(self), batch_size):
        n = min(batch_size, len(self) - start)
        buf = f.read(n * per_image)
        if len(buf) != n * per_image:
          raise ValueError(f"{self.path}:{self.key} is truncated at image {start}")
        yield np.frombuffer(buf, np.uint8).reshape((n,) + tuple(self.shape[1:]))
