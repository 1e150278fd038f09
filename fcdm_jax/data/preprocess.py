"""Image preprocessing shared by the pixel pipelines and the latent extractor.

ADM's centre crop, the one the published latents were made with:
halve the image with a box filter while its short side is at least twice the target,
resize with bicubic so the short side equals the target, then crop the centre square.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W, C) or (H, W) -> uint8 (size, size, C) by ADM's centre crop."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"center_crop_arr expects uint8 pixels, got {image.dtype}")
  squeeze = image.ndim == 2
  if squeeze:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an (H, W, C) image with C in (1, 3, 4), got {image.shape}")
  h, w, c = image.shape
  if (h, w) != (size, size):
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    while min(pil.size) >= 2 * size:
      pil = pil.resize(tuple(d // 2 for d in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(d * scale) for d in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    arr = arr.reshape(arr.shape[0], arr.shape[1], c)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    image = arr[top:top + size, left:left + size]
  return image[..., 0] if squeeze else np.ascontiguousarray(image)
