"""The run's metric writer: logs on every host, TensorBoard event files on host 0.

TensorBoard's writer (TensorFlow's) reaches object stores through TensorFlow's own
clients, not through `fcdm_jax.fileio`. For a remote workdir the events are therefore
written to a local staging folder and uploaded whole through fileio every
`mirror_every_s` seconds and at `flush`/`close`: each upload is one object (which is what
TensorFlow's GCS writer does on every flush too), so the bucket never holds half an event
file, and one client serves every path of a run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Mapping

from clu import metric_writers
from clu.metric_writers import interface

from fcdm_jax import fileio


class MirroredWriter(interface.MetricWriter):
  """`inner` writes event files into `staging`; changed files are uploaded to `remote`."""

  def __init__(self, inner, staging: str, remote: str, mirror_every_s: float):
    self.inner, self.staging, self.remote = inner, staging, remote
    self.mirror_every_s = float(mirror_every_s)
    self._uploaded: dict[str, tuple[int, int]] = {}
    self._last = time.monotonic()

  def mirror(self) -> int:
    """Uploads the event files that changed since the last upload; returns how many."""
    self.inner.flush()
    count = 0
    for folder, _, files in os.walk(self.staging):
      for name in files:
        local = os.path.join(folder, name)
        st = os.stat(local)
        stamp = (st.st_size, st.st_mtime_ns)
        if self._uploaded.get(local) == stamp:
          continue
        rel = os.path.relpath(local, self.staging)
        fileio.upload(local, fileio.join(self.remote, *rel.split(os.sep)))
        self._uploaded[local] = stamp
        count += 1
    self._last = time.monotonic()
    return count

  def _maybe_mirror(self) -> None:
    if time.monotonic() - self._last >= self.mirror_every_s:
      self.mirror()

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
    self.inner.write_summaries(step, values, metadata)
    self._maybe_mirror()

  def write_scalars(self, step: int, scalars):
    self.inner.write_scalars(step, scalars)
    self._maybe_mirror()

  def write_images(self, step: int, images):
    self.inner.write_images(step, images)
    self._maybe_mirror()

  def write_videos(self, step: int, videos):
    self.inner.write_videos(step, videos)
    self._maybe_mirror()

  def write_audios(self, step: int, audios, *, sample_rate: int):
    self.inner.write_audios(step, audios, sample_rate=sample_rate)
    self._maybe_mirror()

  def write_texts(self, step: int, texts):
    self.inner.write_texts(step, texts)
    self._maybe_mirror()

  def write_histograms(self, step: int, arrays, num_buckets=None):
    self.inner.write_histograms(step, arrays, num_buckets)
    self._maybe_mirror()

  def write_hparams(self, hparams):
    self.inner.write_hparams(hparams)
    self._maybe_mirror()

  def flush(self):
    self.mirror()

  def close(self):
    self.mirror()
    self.inner.close()
    shutil.rmtree(self.staging, ignore_errors=True)


def create_writer(workdir: str, is_host0: bool, mirror_every_s: float = 60.0):
  """Logging everywhere; event files in `workdir` on host 0, local or remote alike."""
  import tensorflow as tf   # clu's summary writer is TensorFlow's: it must not take GPU memory
  tf.config.set_visible_devices([], "GPU")
  if not is_host0:
    return metric_writers.create_default_writer(None, just_logging=True)
  if not fileio.is_remote(workdir):
    return metric_writers.create_default_writer(workdir)
  staging = tempfile.mkdtemp(prefix="fcdm_events_")
  return MirroredWriter(metric_writers.create_default_writer(staging), staging, workdir,
                        mirror_every_s)
