"""Writing files so that a crash or error never leaves one half-written."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
  """`write(tmp_path)` into a temporary file beside `path`, flush it to disk, then rename.

  Readers see the old file or the new one, never a partial one; on error the old file
  stays and the temporary file is removed.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)
  atomic_write(path, write)


def write_png(path: str | os.PathLike, image) -> None:
  """A uint8 (H, W, C) image as a PNG, atomically: grey when C is 1, else its first 3 channels."""
  from PIL import Image
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image[..., :3])
  atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file, read in 16 MiB chunks (weights files are large)."""
  import hashlib
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()
