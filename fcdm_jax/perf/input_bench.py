"""How fast the host side of each data source delivers the run's batches (bench `--mode=input`).

For each source: `source.batch(step)` (what the training loop's prefetch thread calls) for
`steps` consecutive steps after `warmup`, on one host at the local batch; examples/s, the
batch time (median, min) and the cores the process kept busy meanwhile (CPU seconds / wall
seconds). Sources are the config's own (`config.data`, e.g. a latent dataset in a bucket)
or synthetic datasets of every kind written to a temporary folder at the config's latent
shape (`sources=['all']`): latent shards, PyTorch feature files, a zarr store (with zarr),
a prepared TFDS image dataset and the embedded digits.

With grain installed, the latent shards are also read through `grain.MapDataset` (one
record per map call on grain's reader threads, then batched), the same records and the same
work, so the two pipelines compare side by side in one run.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

from fcdm_jax.data import LatentShardWriter, make_source
from fcdm_jax.perf.machine import cpu_count, load_average

def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def time_batches(make_batch: Callable[[int], Any], steps: int, warmup: int,
                 batch: int) -> dict[str, Any]:
  """Per-batch wall times of `make_batch(step)` and the cores busy while it ran."""
  for s in range(warmup):
    make_batch(s)
  times = []
  cpu0, wall0 = _cpu_seconds(), time.perf_counter()
  for s in range(warmup, warmup + steps):
    t0 = time.perf_counter()
    make_batch(s)
    times.append(time.perf_counter() - t0)
  wall = time.perf_counter() - wall0
  return dict(examples_per_s=batch * steps / wall, batch_s_median=statistics.median(times),
              batch_s_min=min(times), cores_used=(_cpu_seconds() - cpu0) / wall,
              steps=steps, batch=batch)


# ----------------------------------------------------------------------- synthetic data


def _latent_config(config, source: str, path: str):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.source, c.data.path = source, path
  return c


def _write_latents(config, root: str, n: int) -> str:
  size, ch = int(config.latent_size), int(config.model.in_channels)
  writer = LatentShardWriter(os.path.join(root, "latents"), shape=(size, size, ch),
                             num_classes=int(config.model.num_classes),
                             vae_scale=float(config.data.vae_scale))
  rng = np.random.default_rng(0)
  shard = 1000
  for i, start in enumerate(range(0, n, shard)):
    k = min(shard, n - start)
    mean = rng.standard_normal((k, 2, size, size, ch), np.float32)
    labels = rng.integers(0, int(config.model.num_classes), k)
    writer.write_shard(i, mean, np.full_like(mean, 0.1), labels)
  writer.finalize(-(-n // shard))
  return os.fspath(writer.directory)


def _write_torch_features(config, root: str, n: int) -> str:
  size, ch = int(config.latent_size), int(config.model.in_channels)
  feats, labels = os.path.join(root, "tf", "x_features"), os.path.join(root, "tf", "x_labels")
  os.makedirs(feats)
  os.makedirs(labels)
  rng = np.random.default_rng(0)
  for i in range(n):
    np.save(os.path.join(feats, f"0-{i}.npy"),
            rng.standard_normal((1, ch, size, size)).astype(np.float32))
    np.save(os.path.join(labels, f"0-{i}.npy"),
            np.asarray([i % int(config.model.num_classes)], np.int64))
  return os.path.join(root, "tf")


def _write_zarr(config, root: str, n: int) -> str:
  import zarr   # optional: ImportError skips the zarr source
  size, ch = int(config.latent_size), int(config.model.in_channels)
  path = os.path.join(root, "latents.zarr")
  group = zarr.open_group(path, mode="w")
  rng = np.random.default_rng(0)
  latents = group.create_array("latents", shape=(n, ch, size, size), chunks=(1000, ch, size, size),
                               dtype="float32")
  latents[...] = rng.standard_normal((n, ch, size, size)).astype(np.float32)
  labels = group.create_array("labels", shape=(n,), dtype="int64")
  labels[...] = np.arange(n) % int(config.model.num_classes)
  return path


def _write_tfds(config, root: str, n: int):
  """A prepared TFDS image dataset of n RGB images at the config's image size (max 256)."""
  import tensorflow_datasets as tfds   # heavy (TensorFlow): only for this source
  res = min(int(config.image_size), 256)
  classes = [str(i) for i in range(int(config.model.num_classes))]

  class FcdmBenchImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(res, res, 3)),
          "label": tfds.features.ClassLabel(names=classes)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (res, res, 3), dtype=np.uint8),
                  "label": i % len(classes)}

  # TFDS looks for a builder's checksums beside its module's code; one made here has none
  # (and inside a package that lookup needs importlib_resources, which TFDS does not pull in).
  FcdmBenchImages.__module__ = "__main__"
  data_dir = os.path.join(root, "tfds")
  # array_record: the random-access format TfdsSource reads per batch.
  FcdmBenchImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.update(source="tfds", tfds_name="fcdm_bench_images", data_dir=data_dir,
                  max_in_memory_gb=0.0)   # read per batch, as a dataset too large to hold
    c.latent_size, c.image_size, c.model.in_channels = res, res, 3
  return c


def _embedded_config(config, root: str, n: int):
  del root, n   # the embedded digits ship with the package
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.source = "embedded"
    c.latent_size, c.image_size, c.model.in_channels, c.model.num_classes = 32, 32, 1, 10
  return c


# Source name (fcdm_jax.data.SOURCES) -> (config, root, n) -> a config reading a synthetic
# dataset of that source written under root. A source listed here is one the input bench
# can measure without the user's data.
SYNTHETIC = {
    "latents": lambda c, root, n: _latent_config(c, "latents", _write_latents(c, root, n)),
    "torch_features": lambda c, root, n: _latent_config(c, "torch_features",
                                                        _write_torch_features(c, root, n)),
    "torch_zarr": lambda c, root, n: _latent_config(c, "torch_zarr", _write_zarr(c, root, n)),
    "tfds": _write_tfds,
    "embedded": _embedded_config,
}


def synthetic_configs(config, root: str, n: int, kinds=tuple(SYNTHETIC), log=print) -> dict:
  """{source name: a config reading a synthetic dataset of that source written under root}."""
  unknown = [k for k in kinds if k not in SYNTHETIC]
  if unknown:
    raise ValueError(f"unknown input source(s) {unknown}; the input bench writes "
                     f"{', '.join(SYNTHETIC)}")
  out = {}
  for kind in kinds:
    log(f"input bench: writing a synthetic {kind} dataset of {n} examples")
    try:
      out[kind] = SYNTHETIC[kind](config, root, n)
    except ImportError as e:   # an optional reader (zarr) is not installed
      log(f"input bench: {e}; {kind} skipped")
  return out


# ------------------------------------------------------------------------------- grain


def grain_latent_batches(dataset, batch: int, threads: int, vae_scale: float, seed: int = 0):
  """The latent records of a `LatentDataset` through grain: (steps) -> batch reader with
  the same per-example work as `LatentSource` (pick the flip's mean and std, scale)."""
  import grain   # optional: the comparison runs only where it is installed
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(dataset))
  flips = rng.random(len(dataset)) < 0.5
  scale = np.float32(vae_scale)

  def one(i):
    rec = dataset.read(np.asarray([order[i]]))[0]
    stats = rec["latent"][int(flips[i])].astype(np.float32)
    return {"x": stats[0] * scale, "x_std": stats[1] * scale, "y": np.int32(rec["label"])}

  ds = (grain.MapDataset.range(len(dataset)).map(one).batch(batch, drop_remainder=True)
        .repeat().to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                    prefetch_buffer_size=4 * batch)))
  it = iter(ds)
  return lambda step: next(it)


# --------------------------------------------------------------------------------- run


def run_input(config, *, batch: int, steps: int = 20, warmup: int = 3,
              sources=("config",), num_examples: int = 4096, grain_threads: int = 0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """The input benchmark's report (JSON-able). `sources`: 'config' (the config's own data),
  'all' (every synthetic kind) or kind names."""
  if batch < 1 or steps < 1 or warmup < 0:
    raise ValueError(f"need batch >= 1, steps >= 1, warmup >= 0; got {batch}, {steps}, {warmup}")
  kinds = tuple(SYNTHETIC) if "all" in sources else tuple(s for s in sources if s != "config")
  report: dict[str, Any] = dict(mode="input", batch=batch, steps=steps, warmup=warmup,
                                cores=cpu_count(), load_average_start=load_average(),
                                results={})
  with tempfile.TemporaryDirectory(prefix="fcdm_input_bench_") as root:
    configs = {}
    if "config" in sources:
      configs[f"config:{config.data.source}"] = config
    configs.update(synthetic_configs(config, root, num_examples, kinds, log))
    for name, c in configs.items():
      c = c.copy_and_resolve_references()
      with c.unlocked():
        c.batch_size = batch
      source = make_source(c)
      res = time_batches(source.batch, steps, warmup, batch)
      res["description"] = source.description
      report["results"][name] = res
      log(f"input {name:<22} {res['examples_per_s']:>10.0f} examples/s  batch "
          f"{1e3 * res['batch_s_median']:.1f} ms (min {1e3 * res['batch_s_min']:.1f})  "
          f"{res['cores_used']:.2f} cores")
      if name in ("latents", "config:latents") and grain_threads >= 0:
        if importlib.util.find_spec("grain") is None:
          log("input bench: grain is not installed; no grain comparison")
          continue
        threads = grain_threads or cpu_count()
        g = time_batches(grain_latent_batches(source.dataset, batch, threads,
                                              source.vae_scale), steps, warmup, batch)
        g["threads"] = threads
        res["grain"] = g
        res["grain_speed_ratio"] = g["examples_per_s"] / res["examples_per_s"]
        log(f"input {name + ' via grain':<22} {g['examples_per_s']:>10.0f} examples/s  "
            f"{g['cores_used']:.2f} cores ({threads} threads): "
            f"{res['grain_speed_ratio']:.2f}x ours")
  report["load_average_end"] = load_average()
  return report
