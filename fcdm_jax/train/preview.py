"""Sample grids from the EMA params during training: fixed classes, fixed seed, PNG + TensorBoard.

One row per class (`config.preview.num_classes_shown` classes, `per_class` samples each).
Pixel-space models are shown as images; latent models are decoded with the VAE when
`config.preview.vae_dir` names one, else their first three latent channels are shown.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from fcdm_jax.train import sharding

SAMPLES_DIR = "samples"


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats (NHWC) -> uint8, 1-channel images kept as grey."""
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
  """(rows*cols, H, W, C) uint8 -> one (rows*H, cols*W, C) image with 1-pixel gutters."""
  n, h, w, c = images.shape
  cols = n // rows
  grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, np.uint8)
  for i in range(rows * cols):
    r, col = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = images[i]
  return grid


def save_png(path: str, grid: np.ndarray) -> None:
  img = grid[..., 0] if grid.shape[-1] == 1 else grid[..., :3]
  tmp = path + ".tmp.png"
  Image.fromarray(img).save(tmp)
  os.replace(tmp, path)


def preview_program(config, model, objective, mesh, input_shape):
  """(the jitted preview sampler `(ema_params, noise, labels) -> samples`, the labels shown,
  the padded noise shape). The batch is padded to a multiple of the data-parallel devices.
  `PreviewWriter` runs it; `fcdm_jax.preflight` compiles it for a TPU."""
  pc = config.preview
  num_classes = config.model.num_classes
  rows = min(pc.num_classes_shown, num_classes)
  labels = np.repeat(np.arange(rows), pc.per_class).astype(np.int32)
  padded = math_ceil(len(labels), sharding.data_parallel_size(mesh))
  labels = np.concatenate([labels, np.zeros(padded - len(labels), np.int32)])
  null_label = num_classes if model.has_null_class else None
  sample_fn = objective.make_sampler(pc, null_label)

  def run(params, noise, labels):
    model_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
    return sample_fn(model_fn, noise, labels, jax.random.PRNGKey(config.seed + 2))

  return jax.jit(run), labels, (padded,) + tuple(input_shape)


class PreviewWriter:
  """Compiles the preview sampler once and writes a grid at every call."""

  def __init__(self, config, model, objective, mesh, input_shape, workdir, writer):
    pc = config.preview
    self.rows = min(pc.num_classes_shown, config.model.num_classes)
    self.count = self.rows * pc.per_class
    self._sample, labels, noise_shape = preview_program(config, model, objective, mesh,
                                                        input_shape)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(config.seed + 1), noise_shape))
    bs = sharding.batch_sharding(mesh)
    self.noise = jax.make_array_from_callback(noise.shape, bs, lambda idx: noise[idx])
    self.labels = jax.make_array_from_callback(labels.shape, bs, lambda idx: labels[idx])
    self.mesh, self.config = mesh, config
    self.decoder = _load_decoder(pc.get("vae_dir", ""), config) if config.data.source in (
        "latents", "torch_features", "torch_zarr") else None
    self.folder = os.path.join(workdir, SAMPLES_DIR)
    self.writer = writer
    self.last_path = None

  def write(self, step: int, ema_params) -> str | None:
    with step_context(self.mesh, self.config):
      out = self._sample(ema_params, self.noise, self.labels)
    out = multihost_utils.process_allgather(out, tiled=True)[: self.count]
    if self.decoder is not None:
      out = self.decoder(out)
    elif out.shape[-1] > 3:
      out = out[..., :3] / max(float(np.abs(out).max()), 1e-6)  # raw latents, for a glance
    images = to_uint8(np.asarray(out, np.float32))
    if jax.process_index() != 0:
      return None
    os.makedirs(self.folder, exist_ok=True)
    grid = image_grid(images, self.rows)
    path = os.path.join(self.folder, f"step_{step:08d}.png")
    save_png(path, grid)
    self.writer.write_images(step, {"samples": grid[None]})
    self.last_path = path
    return path


def math_ceil(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def step_context(mesh, config):
  from fcdm_jax.train.step import sharding_context
  return sharding_context(mesh, config)


def _load_decoder(vae_dir: str, config):
  """latents -> images in [-1, 1] with the SD-VAE, or None when no VAE is configured."""
  if not vae_dir:
    return None
  from fcdm_jax.models import vae as vae_lib
  vae, params = vae_lib.load_vae(vae_dir)
  scale = config.data.vae_scale
  return jax.jit(lambda z: vae.apply(params, z / scale, method=vae.decode))
