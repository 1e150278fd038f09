"""The deterministic batch stream every source shares, and `make_source`.

Order. All hosts agree on one *global* stream of example indices: epoch e is the
permutation `default_rng([seed, shuffle_seed, 0, e]).permutation(N)` of the N examples,
and the stream is epoch 0, then epoch 1, ... concatenated (endless; a batch may straddle
two epochs, so every example is seen exactly once per epoch and nothing is dropped).
Global step s takes stream positions `[s*B, (s+1)*B)` (B = `config.batch_size`, the global
batch) and process p of P takes the slice `[p*b, (p+1)*b)` of it, b = B // P. The global
batch of step s is therefore a function of (seed, s) alone, the local one of
(seed, s, p, P): the P hosts' slices are disjoint and make up the global batch, and a run
restarted with another number of hosts still trains on the same global batches.

Randomness per example is keyed by (seed, step, position in the global batch), never by
host, for the same reason: the flips here, and the latent posterior's noise on the device
(a latent source hands over the posterior's mean `x` and std `x_std`, and the training step
draws `x + x_std * eps`, eps keyed by (step, position): `train/step.py`), which keeps
the host's work to reading records.

Resuming. The data position saved in a checkpoint is just the training step:
`source.iterate(start_step=s)` yields exactly the batches an uninterrupted run would
have produced from step s on. Nothing else is needed to restore the stream.

Prefetch. `iterate` runs a background thread that keeps `config.data.prefetch`
batches ready (numpy, host memory); putting them on devices is the training loop's job
(`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from concurrent import futures
from typing import Callable, Iterator, Sequence

import numpy as np

from fcdm_jax import conditions, fileio
from fcdm_jax.data.captions import SUBFOLDER, CaptionTable, caption_folder
from fcdm_jax.data.registry import source_spec

# Stream tags: independent random streams derived from the same data seed.
_TAG_PERMUTATION, _TAG_FLIP = 0, 1


class Source:
  """Random access to N examples plus the deterministic, resumable batch stream.

  Subclasses set the dataset facts and implement `_load` and `from_config`; everything
  about order, host split, flips and prefetch lives here.
  """

  def __init__(self, *, element_shape: Sequence[int], num_classes: int, num_examples: int,
               global_batch: int, process_index: int, process_count: int,
               seed: Sequence[int], random_flip: bool, prefetch: int, description: str):
    check_batch_split(global_batch, process_index, process_count)
    if num_examples <= 0:
      raise ValueError(f"{description}: the dataset is empty")
    self.element_shape = tuple(int(d) for d in element_shape)
    self.num_classes = int(num_classes)
    self.num_examples = int(num_examples)
    self.global_batch = int(global_batch)
    self.local_batch = global_batch // process_count
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.seed = tuple(int(s) for s in seed)
    self.random_flip = bool(random_flip)
    self.prefetch = int(prefetch)
    self.description = description
    self.captions = None   # a CaptionTable for text-conditioned runs: y = caption embeddings
    self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._perm_lock = threading.Lock()

  # --- what a subclass provides -------------------------------------------------------
  @classmethod
  def from_config(cls, data, **common) -> "Source":
    """The source `config.data` (= `data`) describes; `common` are `make_source`'s
    keyword arguments: expected_shape, num_classes and this class's constructor's."""
    raise NotImplementedError

  @classmethod
  def caption_folder(cls, data) -> str:
    """The caption folder kept with the data when config.data.captions is unset:
    `<data.path>/captions`, where `extract_latents` writes it."""
    return fileio.join(data.path, SUBFOLDER) if data.get("path") else ""

  def _load(self, indices: np.ndarray, flips: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `indices` (flipped where `flips`): {'x': float (n, H, W, C), 'y': int (n,)},
    and for a posterior to be sampled on the device its std as 'x_std' (x is the mean)."""
    raise NotImplementedError

  # --- the order -----------------------------------------------------------------------
  def epoch_permutation(self, epoch: int) -> np.ndarray:
    """The order of epoch `epoch` (the same on every host); the last two are cached."""
    with self._perm_lock:
      perm = self._perms.get(epoch)
      if perm is None:
        rng = np.random.default_rng([*self.seed, _TAG_PERMUTATION, epoch])
        perm = rng.permutation(self.num_examples)
        self._perms[epoch] = perm
        while len(self._perms) > 2:
          self._perms.popitem(last=False)
      return perm

  def local_positions(self, step: int) -> np.ndarray:
    """Positions within the global batch of `step` that this process loads."""
    start = self.process_index * self.local_batch
    return np.arange(start, start + self.local_batch)

  def indices(self, step: int, positions: np.ndarray | None = None) -> np.ndarray:
    """Dataset indices at `positions` of the global batch of `step` (default: this host's)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if positions is None:
      positions = self.local_positions(step)
    stream = step * self.global_batch + np.asarray(positions, np.int64)
    epochs, offsets = np.divmod(stream, self.num_examples)
    out = np.empty(len(stream), np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.epoch_permutation(int(e))[offsets[sel]]
    return out

  def flips(self, step: int, positions: np.ndarray | None = None) -> np.ndarray:
    """Which examples of `step` are mirrored (all False when random_flip is off)."""
    if positions is None:
      positions = self.local_positions(step)
    if not self.random_flip:
      return np.zeros(len(positions), bool)
    coin = np.random.default_rng([*self.seed, _TAG_FLIP, step]).random(self.global_batch)
    return coin[np.asarray(positions)] < 0.5

  # --- batches -------------------------------------------------------------------------
  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's batch of global step `step`: {'x': float32 NHWC, 'y': int32} and,
    from latent sources, 'x_std' float32 NHWC (the posterior the step samples from)."""
    positions = self.local_positions(step)
    idx = self.indices(step, positions)
    loaded = self._load(idx, self.flips(step, positions))
    if self.captions is not None:   # a text-conditioned run: this step's caption of each
      rows = self.captions.rows(idx, step, positions, self.seed, self.global_batch)
      out = {"y": self.captions.embed(rows)}
    else:
      out = {"y": np.asarray(loaded["y"]).astype(np.int32)}
    for key in ("x", "x_std")[: 1 + ("x_std" in loaded)]:
      out[key] = np.ascontiguousarray(loaded[key], np.float32)
      if out[key].shape != (len(idx), *self.element_shape):
        raise RuntimeError(f"{self.description}: loaded {key} of shape {out[key].shape}, "
                           f"expected {(len(idx), *self.element_shape)}")
    if self.captions is None:
      check_labels(out["y"], self.num_classes, f"{self.description} (step {step})")
    return out

  def iterate(self, start_step: int = 0) -> "BatchIterator":
    """Endless batches of steps start_step, start_step + 1, ... (prefetched in a thread).

    The data position to checkpoint is the step: after restoring step s,
    `iterate(s)` continues exactly as the uninterrupted run would have.
    """
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    return BatchIterator(self.batch, start_step, self.prefetch)

  def __repr__(self):
    return (f"{type(self).__name__}({self.description}: {self.num_examples} examples of "
            f"{self.element_shape}, {self.num_classes} classes, local batch "
            f"{self.local_batch} = {self.global_batch} / {self.process_count} processes)")


class BatchIterator:
  """Iterator over `make_batch(step)` for consecutive steps, `prefetch` ahead in a thread.

  `.step` is the step of the batch the next `next()` returns. Errors in the thread are
  raised by `next()`. Call `close()` (or use `with`) to stop the thread early.
  """

  def __init__(self, make_batch: Callable[[int], dict], start_step: int, prefetch: int):
    self.step = int(start_step)
    self._make_batch = make_batch
    self._prefetch = max(0, int(prefetch))
    self._stop = threading.Event()
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    if self._prefetch:
      self._queue = queue.Queue(maxsize=self._prefetch)
      self._thread = threading.Thread(target=self._work, name="fcdm-data-prefetch",
                                      daemon=True)
      self._thread.start()

  def _work(self):
    step = self.step
    while not self._stop.is_set():
      try:
        item = (step, self._make_batch(step), None)
      except BaseException as e:  # handed to the consumer, which re-raises it
        item = (step, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return
      step += 1

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if self._stop.is_set():
      raise StopIteration
    if self._queue is None:
      batch = self._make_batch(self.step)
    else:
      step, batch, error = self._queue.get()
      if error is not None:
        self.close()
        raise error
      assert step == self.step, (step, self.step)
    self.step += 1
    return batch

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    self._stop.set()


# --- checks shared by the sources ---------------------------------------------------------
def check_batch_split(global_batch: int, process_index: int, process_count: int):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count="
                     f"{process_count})")
  if global_batch < 1:
    raise ValueError(f"config.batch_size must be positive, got {global_batch}")
  if global_batch % process_count:
    raise ValueError(f"config.batch_size {global_batch} (the global batch) is not divisible "
                     f"by the number of processes {process_count}")


def check_labels(labels: np.ndarray, num_classes: int, where: str):
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(f"{where}: labels {sorted(set(bad.tolist()))[:10]} are outside "
                     f"[0, {num_classes}) (config.model.num_classes = {num_classes})")


def check_element_shape(actual: Sequence[int], expected: Sequence[int], where: str,
                        hint: str):
  if tuple(actual) != tuple(expected):
    raise ValueError(f"{where} holds elements of shape {tuple(actual)} (H, W, C) but the config "
                     f"trains on {tuple(expected)} ({hint})")


def data_path(path, what: str, wanted: str):
  """`path` (config.data.path) as a `fileio` path; FileNotFoundError when it is empty (it
  should name `wanted`) or names nothing (the `what` it should be)."""
  if not path:
    raise FileNotFoundError(f"config.data.path is empty: set it to {wanted}")
  found = fileio.path(path)
  if not found.exists():
    raise FileNotFoundError(f"{what} {found} does not exist")
  return found


def check_num_classes(dataset_classes: int, config_classes: int, where: str):
  if dataset_classes > config_classes:
    raise ValueError(f"{where} has {dataset_classes} classes but config.model.num_classes is "
                     f"{config_classes}")


def parallel_map(fn: Callable, items: Sequence, num_workers: int) -> list:
  """`[fn(i) for i in items]`, on threads when num_workers > 1 (I/O and PIL release the GIL)."""
  if num_workers <= 1 or len(items) <= 1:
    return [fn(i) for i in items]
  with futures.ThreadPoolExecutor(min(num_workers, len(items))) as pool:
    return list(pool.map(fn, items))


# --- the one entry point ------------------------------------------------------------------
def expected_element_shape(config, source: str) -> tuple[int, int, int]:
  """(H, W, C) the model trains on: image_size for pixel sources, latent_size otherwise."""
  return source_spec(source).element_shape(config)


def make_source(config, *, process_index: int = 0, process_count: int = 1) -> Source:
  """The input pipeline named by `config.data.source` (registry.py), validated before any
  work starts.

  Reads config.data, config.batch_size (global), config.seed, config.model.in_channels /
  num_classes and config.latent_size (latent sources) or config.image_size (pixel ones).
  Raises ValueError / FileNotFoundError naming the problem.
  """
  data = config.data
  spec = source_spec(data.source)
  check_batch_split(int(config.batch_size), process_index, process_count)
  src = spec.load().from_config(
      data,
      expected_shape=spec.element_shape(config),
      num_classes=int(config.model.num_classes),
      global_batch=int(config.batch_size),
      process_index=int(process_index),
      process_count=int(process_count),
      seed=(int(config.seed), int(data.get("shuffle_seed", 0))),
      random_flip=bool(data.get("random_flip", True)),
      prefetch=int(data.get("prefetch", 2)))
  if conditions.of_config(config).uses_captions:
    src.captions = CaptionTable(caption_folder(config), num_examples=src.num_examples,
                                dim=int(config.model.text_dim),
                                dropout=float(data.get("caption_dropout", 0.1)))
  logging.info("data: %r", src)
  return src
