"""Sample grids from the EMA params during training: fixed classes, fixed seed, PNG + TensorBoard.

One row per class (`config.preview.num_classes_shown` classes, `per_class` samples each);
for a text-conditioned model one row per caption: the first caption of `num_classes_shown`
examples spread evenly through the run's caption folder (neighbouring examples are often
one image captioned several ways; the texts are logged).
Pixel-space models are shown as images; latent models are decoded with the VAE when
`config.preview.vae_dir` names one, else their first three latent channels are shown.
Each grid's log line gives its cost (`sampling.cost`: network evaluations per image).
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from fcdm_jax import conditions, fileio, sampling
from fcdm_jax import images as images_lib
from fcdm_jax.data.captions import CaptionTable, caption_folder
from fcdm_jax.sampling import cost as cost_lib
from fcdm_jax.sampling.settings import sampler_settings

SAMPLES_DIR = "samples"


def caption_rows(offsets: np.ndarray, rows: int) -> np.ndarray:
  """The caption indices of a text preview: the first caption of `rows` examples spread
  evenly from the first to the last (`offsets[i]` is example i's first caption)."""
  examples = len(offsets) - 1
  picked = np.linspace(0, examples - 1, min(int(rows), examples)).round().astype(np.int64)
  return np.asarray(offsets)[picked]


class PreviewWriter:
  """Samples the same classes from the same noise (config.seed) at every call, one grid each."""

  def __init__(self, config, mesh, workdir, writer):
    pc = config.preview
    self.seed = int(config.seed)
    # Latent models without a VAE show their raw latents (`images`).
    self.decoder = sampling.image_decoder(config, pc.vae_dir, mesh, "config.preview.vae_dir",
                                          raw_ok=True)
    empty = None
    if conditions.of_config(config).uses_captions:
      table = CaptionTable(caption_folder(config), dim=int(config.model.text_dim))
      first = caption_rows(table.offsets, pc.num_classes_shown)
      self.rows = len(first)
      self.labels = np.repeat(table.embeddings[first], pc.per_class, axis=0)
      empty = table.empty
      texts = table.texts()
      logging.info("preview rows: %s", [texts[i] for i in first])
    else:
      self.rows = min(pc.num_classes_shown, config.model.num_classes)
      self.labels = np.repeat(np.arange(self.rows), pc.per_class).astype(np.int32)
    self.generator = sampling.Generator(config, sampler_settings(config, "preview"), mesh,
                                        self.decoder, empty_embedding=empty)
    self.folder = fileio.join(workdir, SAMPLES_DIR)
    self.writer = writer
    self.last_path = None

  def images(self, ema_params) -> np.ndarray:
    """uint8 samples of the grid's labels (decoded latents, or a glance at raw ones)."""
    images, raw = self.generator.generate_all(ema_params, self.seed, self.labels,
                                              len(self.labels))
    if self.decoder is None and raw.shape[-1] > 3:   # raw latents: their first 3 channels
      images = sampling.to_uint8(raw[..., :3] / max(float(np.abs(raw).max()), 1e-6))
    return images

  def write(self, step: int, ema_params) -> str | None:
    images = self.images(ema_params)
    if jax.process_index() != 0:
      return None
    grid = images_lib.image_grid(images, self.rows)
    path = fileio.join(self.folder, f"step_{step:08d}.png")
    fileio.write_png(path, grid)
    self.writer.write_images(step, {"samples": grid[None]})
    self.last_path = path
    logging.info("preview at step %d: %s (%s)", step, path,
                 cost_lib.describe(self.generator.last_cost))
    return path

