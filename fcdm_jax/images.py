"""Decoding dataset images to RGB the way ADM's loaders do, and saying what was converted.

ImageNet holds a few CMYK JPEGs, grayscale JPEGs, PNGs in disguise and the odd broken file.
ADM opens each with PIL and calls `convert("RGB")`; we do the same (16-bit grayscale is
first scaled to 8 bits, which `convert` would clip instead) and report which conversion
happened, so that an extraction can count them. Files PIL cannot decode raise
`CorruptImageError`; callers skip and count those. `image_grid` lays samples out as one
picture (previews, demo judges).
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from fcdm_jax import fileio

# What `decode_rgb` reports: the image was RGB, or it was converted from this kind.
RGB, CMYK, GRAYSCALE, OTHER = "rgb", "cmyk", "grayscale", "other"
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class CorruptImageError(ValueError):
  """The file is not an image PIL can decode completely."""


class DecodedImage(NamedTuple):
  pixels: np.ndarray   # uint8 (H, W, 3)
  kind: str            # RGB, CMYK, GRAYSCALE or OTHER: the mode it was converted from


# torchvision's ImageFolder list: the same files, in the same order, as the published
# extraction saw (checked lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _gray_to_uint8(img: Image.Image) -> np.ndarray:
  """High-bit-depth grayscale (modes I, I;16, F) -> 8 bits by scaling rather than clipping."""
  a = np.asarray(img)
  if a.dtype == np.uint8 or a.dtype == bool:
    return a.astype(np.uint8) * (255 if a.dtype == bool else 1)
  a = a.astype(np.float64)
  if img.mode == "F":
    top = 1.0 if a.size and a.max() <= 1.0 else 255.0
  else:
    top = 65535.0 if a.size and a.max() > 255 else 255.0
  return np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)


def decode_rgb(source: str | os.PathLike | bytes) -> DecodedImage:
  """A file path or encoded bytes -> uint8 RGB pixels and the mode it was converted from."""
  name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
  try:
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else fileio.open_read(source)
    with f, Image.open(f) as img:
      img.load()   # decodes everything now: a truncated file fails here
      mode = img.mode
      if mode == "RGB":
        kind, rgb = RGB, np.asarray(img)
      elif mode == "CMYK":
        kind, rgb = CMYK, np.asarray(img.convert("RGB"))
      elif mode in GRAYSCALE_MODES:
        gray = img.convert("L") if mode == "LA" else img
        kind, rgb = GRAYSCALE, np.repeat(_gray_to_uint8(gray)[..., None], 3, axis=-1)
      else:  # P, RGBA, YCbCr, LAB, ... : ADM's convert("RGB") (alpha dropped)
        kind, rgb = OTHER, np.asarray(img.convert("RGB"))
  except (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError,
          Image.DecompressionBombError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise CorruptImageError(f"{name}: cannot decode the image ({type(e).__name__}: {e})") from e
  rgb = np.ascontiguousarray(rgb, np.uint8)
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or 0 in rgb.shape:
    raise CorruptImageError(f"{name}: decoded to an unusable array of shape {rgb.shape}")
  return DecodedImage(rgb, kind)


class ImageFolderListing(NamedTuple):
  class_names: list[str]
  files: list[str]      # paths relative to the root, '/'-separated
  labels: list[int]     # index into class_names
  ignored: int          # files without an image extension


def list_image_folder(root: str | os.PathLike) -> ImageFolderListing:
  """ImageFolder layout (root/CLASS/**/IMAGE): classes by sorted folder name, files sorted
  as torchvision's ImageFolder sorts them, so example i is ImageFolder's example i."""
  root = os.fspath(root)
  if not fileio.isdir(root):
    raise FileNotFoundError(f"image folder {root} does not exist")
  _, classes, _ = next(fileio.walk(root))
  classes = sorted(classes)
  if not classes:
    raise ValueError(f"{root} has no class subfolders: the folder source expects the "
                     "ImageFolder layout ROOT/CLASS_NAME/IMAGE")
  files, labels, ignored = [], [], 0
  for label, name in enumerate(classes):
    for folder, _, fnames in sorted(fileio.walk(fileio.join(root, name))):
      for fname in sorted(fnames):
        if is_image_file(fname):
          files.append(fileio.relative(fileio.join(folder, fname), root))
          labels.append(label)
        else:
          ignored += 1
  return ImageFolderListing(classes, files, labels, ignored)


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
  """(rows*cols, H, W, C) uint8 -> one (rows*H, cols*W, C) image with 1-pixel gutters."""
  n, h, w, c = images.shape
  cols = n // rows
  grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, np.uint8)
  for i in range(rows * cols):
    r, col = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = images[i]
  return grid
