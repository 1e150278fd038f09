"""An image dataset encoded once into SD-VAE latents (the `latents` training source), and
for a captioned dataset its caption folder (`python -m fcdm_jax.extract_latents`).

What is stored. Each image gets ADM's centre crop (`data.image_sources`); it and its
horizontal mirror are encoded and the posterior mean and std of both are kept, unscaled,
in the format of `data/latents.py`. Training draws a fresh latent from them each epoch and
flips by taking the mirror's posterior (a mirrored latent is not the latent of the mirror).
Undecodable images are skipped and counted per shard (the manifest sums the counts and
lists the files).

Captions. A captioned source's shard writes its captions (one list per kept example) to
`shard-XXXXX.captions.json` before the shard itself. With a text encoder, host 0 then
encodes them all into `<out>/captions` (`data/captions.py`); a finished caption folder of
the same encoder and examples is kept, another is refused. Without one only the sidecars
are written; the same command with it later adds the folder without encoding an image.

Resuming. Shards are written atomically one at a time; a rerun keeps every complete shard,
computes the missing ones and (re)writes the manifest. The settings that decide the
contents are recorded in `extract_settings.json` first: a rerun with other settings into
the same --out is refused rather than mixed.

Hosts. Batches are split over the local devices; host p of P encodes shards p, p+P, ...;
host 0 writes the manifest (and the caption folder) after all have finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fcdm_jax import distributed, fileio, provenance, sharding
from fcdm_jax.data import captions as captions_lib
from fcdm_jax.data import latents as latents_lib
from fcdm_jax.data.image_sources import load_shard, open_source
from fcdm_jax.models import text_encoder as text_encoder_lib
from fcdm_jax.models import vae as vae_lib
from fcdm_jax.models.clip_text import find_clip_text_files

SETTINGS = "extract_settings.json"
STORAGE_DTYPES = latents_lib.STORAGE_DTYPES
PRECISIONS = ("default", "high", "highest")
MAX_LISTED_SKIPS = 1000   # skipped file names kept in the manifest metadata
# ------------------------------------------------------------------------------ encoding


class PosteriorEncoder:
  """uint8 images -> posterior (mean, std) of each image and of its mirror, on local devices."""

  def __init__(self, model: vae_lib.AutoencoderKL, params, batch_size: int,
               precision: str = "default"):
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self.precision = precision
    mesh = sharding.create_mesh(devices=devices)   # this host's devices: local batches
    self.data = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    self.params = jax.device_put(params, replicated)

    def encode(p, pixels):
      x = pixels.astype(jnp.float32) / 127.5 - 1.0
      n = x.shape[0]
      # [image, mirror] of each example side by side, so nothing moves between devices.
      both = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape((2 * n,) + x.shape[1:])
      post = model.apply(p, both, method=model.encode)
      unpair = lambda a: a.reshape((n, 2) + a.shape[1:])
      return unpair(post.mean), unpair(post.std)

    self._fn = jax.jit(encode, in_shardings=(replicated, self.data),
                       out_shardings=(self.data, self.data))

  def __call__(self, pixels: np.ndarray, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(n, R, R, 3) uint8 -> mean, std float32 (n, 2, h, w, c); axis 1 = [image, mirror]."""
    pending = []
    with jax.default_matmul_precision(self.precision):
      for start in range(0, len(pixels), self.batch_size):
        batch = pixels[start:start + self.batch_size]
        n = len(batch)
        if n < self.batch_size:
          pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
          batch = np.concatenate([batch, pad])
        # Dispatch everything first: the devices work while earlier results come back.
        pending.append((n, self._fn(self.params, jax.device_put(batch, self.data))))
    means, stds = [], []
    for n, (mean, std) in pending:
      means.append(np.asarray(mean)[:n])
      stds.append(np.asarray(std)[:n])
      if progress is not None:
        progress(n)
    if not means:
      return (np.zeros((0, 2, 1, 1, 1), np.float32),) * 2
    return np.concatenate(means), np.concatenate(stds)


# ------------------------------------------------------------------------------ settings


def check_settings(out: str, settings: dict) -> None:
  """Refuse an --out whose shards were written with other settings; record ours if new."""
  path = fileio.join(out, SETTINGS)
  saved = provenance.read(path)
  if saved is not None:
    provenance.refuse_changes(saved, settings, f"{out} holds latents extracted with other "
                                "settings", f"use another --out, or delete {out} to start over")
    return
  if fileio.exists(fileio.join(out, latents_lib.MANIFEST)) or any(
      n.startswith("shard-") for n in fileio.listdir(out)):
    raise ValueError(f"{out} already holds latent shards but no {SETTINGS}: they were not "
                     "written by this tool's current version; use another --out")
  if jax.process_index() == 0:
    provenance.record(path, settings)


def _collect_skipped(writer: latents_lib.LatentShardWriter, num_shards: int) -> list[str]:
  names = []
  for i in range(num_shards):
    info = json.loads(fileio.read_text(writer.shard_path(i).with_suffix(".json")))
    names += info["stats"].get("skipped_files", [])
    if len(names) >= MAX_LISTED_SKIPS:
      return names[:MAX_LISTED_SKIPS]
  return names


# ------------------------------------------------------------------------------ captions

CAPTIONS_DIR = captions_lib.SUBFOLDER   # the caption folder (data/captions.py) inside --out


def sidecar_path(out: str, index: int) -> str:
  """The captions of shard `index`'s kept examples: a JSON list of lists of strings."""
  return fileio.join(out, latents_lib.shard_name(index).replace(".npy", ".captions.json"))


def _text_encoder_identity(path: str, pooling: str) -> dict:
  """What `load_text_encoder(path, pooling).identity` will be, without loading the model."""
  if pooling not in text_encoder_lib.POOLINGS:
    raise ValueError(f"--text_pooling must be one of {text_encoder_lib.POOLINGS}, got {pooling!r}")
  _, weights = find_clip_text_files(path)
  return {"path": fileio.absolute(path), "weights_sha256": fileio.sha256_file(weights),
          "pooling": pooling}


def _existing_captions(folder: str, identity: dict, count: int | None) -> dict | None:
  """The manifest of a finished caption folder made with `identity` (for `count` examples,
  when given); None when there is none; ValueError for one made otherwise."""
  path = fileio.join(folder, captions_lib.MANIFEST)
  if not fileio.exists(path):
    return None
  saved = json.loads(fileio.read_text(path))
  now = {"encoder": identity, "num_examples": saved.get("num_examples") if count is None
         else count}
  provenance.refuse_changes(
      {k: saved.get(k) for k in now}, now, f"{folder} holds captions encoded otherwise",
      f"it is left as it is: use another --out, or delete {folder} to encode them again")
  return saved


def _read_sidecars(out: str, manifest: dict) -> list[list[str]]:
  captions = []
  for i, shard in enumerate(manifest["shards"]):
    path = sidecar_path(out, i)
    if not fileio.exists(path):
      raise FileNotFoundError(f"{path} is missing (shard {i} was written without its "
                              "captions): rerun the same command, which encodes it again")
    part = json.loads(fileio.read_text(path))
    if len(part) != shard["count"]:
      raise ValueError(f"{path} holds captions of {len(part)} examples, its shard "
                       f"{shard['count']}: delete shard {i} and rerun")
    captions += part
  return captions


def write_caption_folder(out: str, manifest: dict, text_encoder: str, pooling: str,
                         identity: dict, batch: int, progress: bool) -> tuple[dict, bool]:
  """(caption manifest, written now): encodes the shards' sidecar captions into
  <out>/captions, or keeps a finished folder made with the same encoder."""
  folder = fileio.join(out, CAPTIONS_DIR)
  kept = _existing_captions(folder, identity, manifest["count"])
  if kept is not None:
    logging.info("kept %s: %d captions of %d examples", folder, kept["count"],
                 kept["num_examples"])
    return kept, False
  captions = _read_sidecars(out, manifest)
  encoder = text_encoder_lib.load_text_encoder(text_encoder, pooling)
  if encoder.identity != identity:   # the weights changed while the latents were encoded
    raise ValueError(f"the text encoder in {text_encoder} changed during the run "
                     f"({identity} -> {encoder.identity}); rerun")
  from tqdm import tqdm
  with tqdm(total=sum(len(c) for c in captions), desc="captions", unit="caption",
            file=sys.stderr, disable=not progress) as bar:
    def advance(done, total):   # write_captions says what it counts (e.g. distinct ones)
      bar.total = total
      bar.update(done - bar.n)
    written = captions_lib.write_captions(folder, captions, encoder, batch=batch,
                                          progress=advance)
  logging.info("wrote %s: %d captions of %d examples, dim %d", folder, written["count"],
               written["num_examples"], written["dim"])
  return written, True


def refuse_empty(writer: latents_lib.LatentShardWriter, out: str, source: str,
                 num_shards: int) -> None:
  """Every host: a dataset of no examples (no image could be decoded) is an error, not a
  manifest. Its shards hold nothing: host 0 removes them, so that a rerun (after fixing the
  images, or the decoders) encodes them again instead of keeping them as complete."""
  infos = [json.loads(fileio.read_text(writer.shard_path(i).with_suffix(".json")))
           for i in range(num_shards)]
  if sum(info["count"] for info in infos):
    return
  distributed.barrier("extract_latents_counted")   # every host has read the counts
  if jax.process_index() == 0:
    for i in range(num_shards):
      for p in (writer.shard_path(i), writer.shard_path(i).with_suffix(".json"),
                sidecar_path(out, i)):
        if fileio.exists(p):
          fileio.remove(p)
  skipped = [n for info in infos for n in info["stats"].get("skipped_files", [])]
  raise ValueError(f"no image of {source} could be decoded ({len(skipped)} skipped, e.g. "
                   f"{skipped[:3]}); no dataset was written to {out}")


# ---------------------------------------------------------------------------------- main


def extract(source: str, resolution: int, vae: str, out: str, *, batch_size: int = 64,
            shard_size: int = 1000, num_workers: int = 8, dtype: str = "float16",
            precision: str = "default", data_dir: str = "", split: str = "train",
            image_key: str = "image", label_key: str = "label", captions_key: str = "",
            text_encoder: str = "", text_pooling: str = "pooled", text_batch_size: int = 256,
            progress: bool = True) -> dict:
  """Writes (or completes) the latent dataset `out`, the captions sidecar of each shard for
  a captioned source, and with `text_encoder` the caption folder <out>/captions; returns a
  summary with the manifests."""
  for name, value in (("resolution", resolution), ("batch_size", batch_size),
                      ("shard_size", shard_size), ("num_workers", num_workers),
                      ("text_batch_size", text_batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"--{name} must be a positive integer, got {value!r}")
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"--dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
  if precision not in PRECISIONS:
    raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
  source_path = source.partition(":")[2] if source.startswith(("folder:", "coco:")) else ""
  fileio.check_output_folder(out, inputs=(source_path, vae, text_encoder, data_dir))

  _, weights_path = vae_lib.find_vae_files(vae)
  model, params = vae_lib.load_vae(vae)
  cfg = model.config
  if cfg.shift_factor:
    raise ValueError(f"the VAE in {vae} has shift_factor={cfg.shift_factor}; the latent format "
                     "stores (mean, std) for latent = (mean + std * eps) * scale only")
  if resolution % cfg.downsample_factor:
    raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling "
                     f"factor {cfg.downsample_factor}")
  if cfg.in_channels != 3:
    raise ValueError(f"the VAE in {vae} takes {cfg.in_channels}-channel images, not RGB")
  size = resolution // cfg.downsample_factor
  shape = (size, size, cfg.latent_channels)

  src = open_source(source, data_dir, split, image_key, label_key, captions_key)
  text_identity = None
  if text_encoder:
    if not src.has_captions:
      raise ValueError(f"--text_encoder: {source} has no captions to encode (captioned "
                       "sources: coco:ROOT, or tfds:NAME with --captions_key)")
    # Checked now, not after hours of encoding: the encoder is found and an existing caption
    # folder is one it made. Not part of the latent settings: the latents do not depend on
    # it, and a later run may add the caption folder to finished latents.
    text_identity = _text_encoder_identity(text_encoder, text_pooling)
    _existing_captions(fileio.join(out, CAPTIONS_DIR), text_identity, None)
  num_shards = math.ceil(src.num_examples / shard_size)
  settings = dict(src.identity, resolution=resolution, crop="adm_center_crop",
                  shard_size=shard_size, dtype=dtype,
                  vae={"config": dataclasses.asdict(cfg),
                       "weights_sha256": fileio.sha256_file(weights_path)})
  settings = provenance.as_json(settings)
  fileio.makedirs(out)
  check_settings(out, settings)
  distributed.barrier("extract_latents_settings")

  writer = latents_lib.LatentShardWriter(out, shape=shape, num_classes=len(src.class_names),
                                         vae_scale=cfg.scaling_factor, dtype=dtype)
  pid, nproc = jax.process_index(), jax.process_count()
  mine = list(range(pid, num_shards, nproc))
  # A captioned source's shard is complete with its captions sidecar (written before it).
  todo = [i for i in mine if not writer.is_complete(i)
          or (src.has_captions and not fileio.exists(sidecar_path(out, i)))]
  logging.info("%s: %d examples in %d shards; this host (%d of %d) has %d to encode, %d "
               "already complete", settings["source"], src.num_examples, num_shards, pid,
               nproc, len(todo), len(mine) - len(todo))
  encoder = PosteriorEncoder(model, params, batch_size, precision)
  bounds = lambda i: (i * shard_size, min((i + 1) * shard_size, src.num_examples))

  from tqdm import tqdm
  total = sum(bounds(i)[1] - bounds(i)[0] for i in todo)
  written = []
  with tqdm(total=total, desc="encoding", unit="img", file=sys.stderr,
            disable=not progress or pid != 0) as bar, \
       futures.ThreadPoolExecutor(num_workers) as pool, \
       futures.ThreadPoolExecutor(1) as reader:
    # Shard k+1 is read and decoded while shard k is on the devices.
    load = lambda i: reader.submit(load_shard, src, *bounds(i), resolution, pool)
    next_load = load(todo[0]) if todo else None
    for j, index in enumerate(todo):
      shard = next_load.result()
      next_load = load(todo[j + 1]) if j + 1 < len(todo) else None
      skipped = shard.stats["images"] - shard.stats["encoded"]
      mean, std = encoder(shard.pixels, progress=bar.update)
      if skipped:
        bar.update(skipped)
      mean = mean.reshape((len(shard.labels), 2) + shape)
      std = std.reshape((len(shard.labels), 2) + shape)
      if src.has_captions:   # before the shard: a complete shard has its sidecar
        fileio.atomic_write_bytes(sidecar_path(out, index),
                                  json.dumps([list(c) for c in shard.captions]).encode())
      writer.write_shard(index, mean, std, shard.labels, stats=shard.stats, overwrite=True)
      written.append(index)

  distributed.barrier("extract_latents_shards")
  refuse_empty(writer, out, source, num_shards)
  manifest = captions = None
  captions_written, error = False, None
  if pid == 0:
    metadata = dict(settings, tool="fcdm_jax.extract_latents", vae_path=fileio.absolute(vae),
                    class_names=src.class_names, captions_sidecars=src.has_captions,
                    skipped_files=_collect_skipped(writer, num_shards), **src.metadata)
    manifest = writer.finalize(num_shards, metadata=metadata)
    logging.info("wrote %s: %d latents of %s, stats %s", out, manifest["count"], shape,
                 manifest["stats"])
    if text_encoder:
      try:   # the other hosts wait at the barrier below: reach it, then raise
        captions, captions_written = write_caption_folder(
            out, manifest, text_encoder, text_pooling, text_identity, text_batch_size,
            progress)
      except Exception as e:  # pylint: disable=broad-except
        error = e
  distributed.barrier("extract_latents_manifest")
  if error is not None:
    raise error
  return {"out": out, "num_shards": num_shards, "written": written,
          "kept": [i for i in mine if i not in written], "manifest": manifest,
          "captions": captions, "captions_written": captions_written}
