"""The sampling CLI's output folder: resumable parts, optional PNGs, the final ADM `.npz`.

Layout of --out (local or gs:// alike, through `fcdm_jax.fileio`):

  sample_settings.json            what made these samples; a rerun with others is refused
                                  (its `cost`, what they spent, is not compared)
  parts/part-{start}-{end}.npz    one finished batch each (written atomically): images,
                                  labels, each sample's network evaluations
  png/{index:06d}.png             with --png
  samples_{N}x{H}x{W}x3.npz       the ADM batch, assembled from the parts and written last:
                                  its presence marks the folder complete

Only host 0 writes; every host learns host 0's verdict on the folder, so that a refusal
stops them all instead of leaving the others waiting at a collective.
"""

from __future__ import annotations

import io

import jax
import numpy as np

from fcdm_jax import distributed, fileio
from fcdm_jax.sampling import adm_npz
from fcdm_jax import provenance

SETTINGS = "sample_settings.json"
COST = "cost"   # the key of sample_settings.json that records what the samples spent
PARTS = "parts"
PNG_DIR = "png"
OUT_READY, OUT_COMPLETE, OUT_REFUSED = 0, 1, -1  # host 0's verdict on --out, broadcast


def part_path(out: str, start: int, end: int) -> str:
  return fileio.join(out, PARTS, f"part-{start:08d}-{end:08d}.npz")


def check_out(out: str, settings: dict, final: str, normalize=None) -> bool:
  """True when `out` already holds the finished batch of these settings; refuses others.
  `normalize(saved)` brings a record written by an earlier version to today's form."""
  if not fileio.isdir(out):
    if fileio.isfile(out):
      raise ValueError(f"--out {out} exists and is not a directory")
    return False
  saved = provenance.read(fileio.join(out, SETTINGS))
  finished = [n for n in fileio.listdir(out) if n.startswith("samples_") and n.endswith(".npz")]
  if saved is None:
    if finished or fileio.isdir(fileio.join(out, PARTS)):
      raise ValueError(f"{out} already holds samples ({', '.join(finished) or PARTS + '/'}) "
                       f"without {SETTINGS}: refusing to overwrite them; use another --out")
    return False
  if normalize is not None:
    saved = normalize(saved)
  what = (f"a finished sample batch ({', '.join(finished)})" if finished
          else "unfinished sample parts")
  provenance.refuse_changes(saved, settings, f"{out} holds {what} made with different "
                              "settings", "refusing to overwrite; use another --out")
  return fileio.exists(fileio.join(out, final))


def out_verdict(out: str, settings: dict, final: str, normalize=None) -> int:
  """OUT_READY or OUT_COMPLETE as host 0 judges --out, known to every host."""
  verdict, refusal = OUT_READY, None
  if jax.process_index() == 0:
    try:
      verdict = OUT_COMPLETE if check_out(out, settings, final, normalize) else OUT_READY
    except ValueError as e:
      verdict, refusal = OUT_REFUSED, e
  verdict = int(distributed.broadcast_from_host0(np.int32(verdict)))
  if verdict == OUT_REFUSED:
    raise refusal or ValueError(f"host 0 refused --out {out} (its log says why)")
  return verdict


def _read_part(path: str) -> tuple[np.ndarray, np.ndarray]:
  with fileio.open_read(path) as f, np.load(f, allow_pickle=False) as part:
    return part["images"], part["labels"]


def _read_part_evaluations(path: str) -> np.ndarray | None:
  """A part's per-sample network evaluations (None in a part written before they were kept)."""
  with fileio.open_read(path) as f, np.load(f, allow_pickle=False) as part:
    return part["evaluations"] if "evaluations" in part.files else None


class SampleOutput:
  """--out of one sampling command: `ranges` are the batches [start, end) of the samples,
  `labels` all their labels, `image_shape` (H, W, C) the images as generated."""

  def __init__(self, out: str, final: str, ranges, labels: np.ndarray, image_shape,
               png: bool):
    self.out, self.final, self.ranges = out, final, list(ranges)
    self.labels, self.image_shape, self.png = labels, tuple(image_shape), png
    self.npz = fileio.join(out, final)
    self.is_host0 = jax.process_index() == 0

  def start(self, settings: dict) -> None:
    """Records the settings (host 0) once the weights have loaded: weights that fail to load
    leave --out as it was."""
    if self.is_host0:
      fileio.makedirs(self.out)
      provenance.record(fileio.join(self.out, SETTINGS), settings)
    distributed.barrier("sample_settings")

  def finished_batches(self) -> list[int]:
    """The batches whose parts an earlier run wrote (host 0 looks, every host learns)."""
    exists = np.asarray([self.is_host0 and fileio.exists(part_path(self.out, s, e))
                         for s, e in self.ranges], np.int32)
    exists = distributed.broadcast_from_host0(exists).astype(bool)
    return [b for b in range(len(self.ranges)) if exists[b]]

  def _png_path(self, index: int) -> str:
    return fileio.join(self.out, PNG_DIR, f"{index:06d}.png")

  def _write_pngs(self, start: int, images: np.ndarray) -> None:
    if self.png:
      for j, image in enumerate(images):
        if not fileio.exists(self._png_path(start + j)):
          fileio.write_png(self._png_path(start + j), image)

  def write_batch(self, b: int, images: np.ndarray, evaluations: np.ndarray) -> None:
    """Batch `b`'s images and their network evaluations (host 0): its PNGs, then its part."""
    if not self.is_host0:
      return
    start, end = self.ranges[b]
    self._write_pngs(start, images)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=self.labels[start:end],
             evaluations=np.asarray(evaluations, np.float32))
    fileio.atomic_write_bytes(part_path(self.out, start, end), buf.getvalue())

  def evaluations(self, grid_evaluations: int | None) -> np.ndarray | None:
    """Every finished sample's network evaluations, from the parts (host 0; None elsewhere).
    A part written before they were kept counts `grid_evaluations` (a time grid's), or is
    left out when the sampler measures them."""
    if not self.is_host0:
      return None
    counts = []
    for start, end in self.ranges:
      part = _read_part_evaluations(part_path(self.out, start, end))
      if part is None and grid_evaluations is not None:
        part = np.full(end - start, grid_evaluations, np.float32)
      if part is not None:
        counts.append(part)
    return np.concatenate(counts) if counts else None

  def record_result(self, settings: dict, result: dict) -> None:
    """Adds `result` (what the run spent) to the recorded settings (host 0), before the
    batch is assembled: a complete folder always has it."""
    if self.is_host0:
      provenance.record(fileio.join(self.out, SETTINGS), dict(settings, **result))

  def recorded(self, key: str):
    """`key` of the recorded settings (host 0; None elsewhere or when absent)."""
    saved = provenance.read(fileio.join(self.out, SETTINGS)) if self.is_host0 else None
    return (saved or {}).get(key)

  def pngs_of_resumed(self, batches: list[int]) -> None:
    """PNGs of resumed parts that were made without --png."""
    if not (self.png and self.is_host0):
      return
    for b in batches:
      start, end = self.ranges[b]
      if not all(fileio.exists(self._png_path(i)) for i in range(start, end)):
        self._write_pngs(start, _read_part(part_path(self.out, start, end))[0])

  def pngs_of_finished(self) -> None:
    """PNGs of a finished batch that has none yet (--png added on a rerun)."""
    if not (self.png and self.is_host0):
      return
    index = 0
    for batch in adm_npz.NpzImages(self.npz).batches(256):
      for image in batch:
        if not fileio.exists(self._png_path(index)):
          fileio.write_png(self._png_path(index), image[..., :self.image_shape[2]])
        index += 1

  def assemble(self, keep_parts: bool) -> None:
    """Streams the checked parts into the final `.npz` (ADM layout, RGB), never all images
    at once; then removes the parts unless `keep_parts` (host 0)."""
    distributed.barrier("sample_parts")
    if self.is_host0:
      height, width, channels = self.image_shape
      labels = self.labels.astype(np.int64)

      def images():
        for start, end in self.ranges:
          path = part_path(self.out, start, end)
          part_images, part_labels = _read_part(path)
          if part_images.shape != (end - start, height, width, channels) or \
             not np.array_equal(part_labels, labels[start:end]):
            raise ValueError(f"{path} does not hold samples {start}..{end - 1} of these "
                             "settings; delete it and rerun")
          yield np.repeat(part_images, 3, axis=-1) if channels == 1 else part_images

      adm_npz.write_batch(self.npz, (len(labels), height, width), images(), labels)
      if not keep_parts:
        fileio.rmtree(fileio.join(self.out, PARTS))
    distributed.barrier("sample_done")
