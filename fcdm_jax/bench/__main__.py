"""`python -m fcdm_jax.bench`: the command line (see the package docstring)."""

from __future__ import annotations

import json
import sys

from fcdm_jax import fileio
from fcdm_jax.bench.dwconv_study import dwconv_study
from fcdm_jax.bench.input import run_input
from fcdm_jax.bench.machine import machine_info
from fcdm_jax.bench.report import DTYPES, MODES, run


def _write_json(path: str | None, report: dict) -> None:
  """The report with the command that made it, at `path` (local or gs://), if given."""
  report["command"] = " ".join(["python -m fcdm_jax.bench"] + sys.argv[1:])
  if path:
    fileio.atomic_write_bytes(path, json.dumps(report, indent=1, default=str).encode())


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      "config", None, "config file (configs/*.py); fields overridable as --config.x=y")
  flags.DEFINE_integer("batch", 8, "global batch size (--mode=input: the host's batch, "
                       "default config.batch_size)")
  flags.DEFINE_enum("mode", "both", ["train", "sample", "both", "dwconv", "input"],
                    "what to time; 'dwconv' = the depthwise conv formulation study; 'input' "
                    "= the host side of the data sources (--repeats batches each)")
  flags.DEFINE_list("input_sources", ["config"], "--mode=input: 'config' (the config's own "
                    "data), 'all', or some of latents,torch_features,torch_zarr,tfds,embedded "
                    "(synthetic datasets at the config's shape, in a temporary folder)")
  flags.DEFINE_integer("input_examples", 4096, "--mode=input: examples per synthetic dataset")
  flags.DEFINE_integer("grain_threads", 0, "--mode=input: grain's reader threads for the "
                       "latent comparison (0 = the cores; -1 = no grain comparison)")
  flags.DEFINE_enum("dtype", None, sorted(DTYPES), "compute dtype (default: the config's)")
  flags.DEFINE_string("remat", None, "none | block | dots | dots_no_batch (default: config's)")
  flags.DEFINE_string("dwconv_impl", None, "auto | xla | shift | shift_vjp (default: config's)")
  flags.DEFINE_integer("repeats", 5, "timed steps (median, min, max)")
  flags.DEFINE_integer("warmup", 3, "untimed steps after compilation (PyTorch on a CPU "
                       "needs a few before its allocator and kernels settle)")
  flags.DEFINE_bool("vs_torch", False, "also time the PyTorch module, alternating A/B")
  flags.DEFINE_alias("vs-torch", "vs_torch")
  flags.DEFINE_float("peak_tflops", None, "peak TFLOP/s for MFU (default: table / CPU estimate)")
  flags.DEFINE_bool("compile_only", False, "compile and count FLOPs only (no state allocated)")
  flags.DEFINE_bool("count_flops", True, "count model and XLA FLOPs")
  flags.DEFINE_integer("num_devices", 0, "use the first N devices (0 = all)")
  flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default)")
  flags.DEFINE_string("json", None, "write the report here as JSON")
  FLAGS = flags.FLAGS

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config_flag.value is None:
      raise app.UsageError("--config is required")
    if FLAGS.mode == "input":
      config = config_flag.value
      batch = FLAGS.batch if FLAGS["batch"].present else int(config.batch_size)
      report = run_input(config, batch=batch, steps=FLAGS.repeats, warmup=FLAGS.warmup,
                         sources=FLAGS.input_sources, num_examples=FLAGS.input_examples,
                         grain_threads=FLAGS.grain_threads)
      _write_json(FLAGS.json, report)
      return
    if FLAGS.mode == "dwconv":
      report = dwconv_study(config_flag.value, batch=FLAGS.batch, repeats=FLAGS.repeats)
      report["machine"] = machine_info(__import__("jax").devices())
      _write_json(FLAGS.json, report)
      return
    modes = MODES if FLAGS.mode == "both" else (FLAGS.mode,)
    report = run(config_flag.value, batch=FLAGS.batch, modes=modes, dtype=FLAGS.dtype,
                 remat=FLAGS.remat, dwconv_impl=FLAGS.dwconv_impl, repeats=FLAGS.repeats,
                 warmup=FLAGS.warmup, vs_torch=FLAGS.vs_torch, peak_tflops=FLAGS.peak_tflops,
                 compile_only=FLAGS.compile_only, count_flops=FLAGS.count_flops,
                 num_devices=FLAGS.num_devices, torch_threads=FLAGS.torch_threads)
    _write_json(FLAGS.json, report)

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
