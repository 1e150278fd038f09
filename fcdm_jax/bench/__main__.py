"""`python -m fcdm_jax.bench`: the benchmark's command line (the package docstring says
what it measures); the work is `fcdm_jax.perf`'s.

Exit status 0 when the report is printed (and --json written), 1 on an error (one `error:`
line: a bad flag or config value, more devices than the machine has, a batch they do not
divide, a --json that exists or cannot be written; checked before any timing).
"""

from __future__ import annotations

import json
import sys

import jax
from absl import flags
from ml_collections import config_flags

from fcdm_jax import cli, config_checks, fileio
from fcdm_jax.perf import benchmark, input_bench, plan_check
from fcdm_jax.perf.dwconv_study import dwconv_study
from fcdm_jax.perf.machine import machine_info
from fcdm_jax.perf.measure import save_report

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (configs/*.py); fields overridable as --config.x=y")
_BATCH = flags.DEFINE_integer("batch", 8, "global batch size (--mode=input: the host's batch, "
                              "default config.batch_size)")
_MODE = flags.DEFINE_enum("mode", "both", ["train", "sample", "both", "dwconv", "input"],
                          "what to time; 'dwconv' = the depthwise conv formulation study; "
                          "'input' = the host side of the data sources (--repeats batches each)")
_INPUT_SOURCES = flags.DEFINE_list(
    "input_sources", ["config"], "--mode=input: 'config' (the config's own data), 'all', or "
    f"some of {','.join(input_bench.SYNTHETIC)} (synthetic datasets at the config's shape, "
    "in a temporary folder)")
_INPUT_EXAMPLES = flags.DEFINE_integer("input_examples", 4096,
                                       "--mode=input: examples per synthetic dataset")
_GRAIN_THREADS = flags.DEFINE_integer("grain_threads", 0, "--mode=input: grain's reader "
                                      "threads for the latent comparison (0 = the cores; "
                                      "-1 = no grain comparison)")
_DTYPE = flags.DEFINE_enum("dtype", None, sorted(benchmark.DTYPES),
                           "compute dtype (default: the config's)")
_REMAT = flags.DEFINE_string("remat", None,
                             "none | block | dots | dots_no_batch (default: config's)")
_DWCONV_IMPL = flags.DEFINE_string("dwconv_impl", None,
                                   "auto | xla | shift | shift_vjp (default: config's)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed steps (median, min, max)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compilation (PyTorch on a CPU "
                               "needs a few before its allocator and kernels settle)")
_VS_TORCH = flags.DEFINE_bool("vs_torch", False, "also time the PyTorch module, alternating A/B")
flags.DEFINE_alias("vs-torch", "vs_torch")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                  "peak TFLOP/s for MFU (default: table / CPU estimate)")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "compile and count FLOPs only (no state allocated)")
_COUNT_FLOPS = flags.DEFINE_bool("count_flops", True, "count model and XLA FLOPs")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "use the first N devices (0 = all)")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0,
                                      "torch.set_num_threads (0 = torch's default)")
_JSON = flags.DEFINE_string("json", None, "write the report here as JSON (local or gs://); "
                            "an existing file is refused unless --overwrite")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace --json if it exists")
_PREFLIGHT_JSON = flags.DEFINE_string(
    "preflight_json", None, "on a GPU or TPU: a `fcdm_jax.preflight --json` report of the "
    "same config, batch and settings for this device's target; prints its memory plan of "
    "the training step beside this device's plan and peak (`fcdm_jax.perf.plan_check`)")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv   # cli.run refuses positional arguments
  config = cli.config_value(_CONFIG)
  config_checks.check_config(config, training=_MODE.value in ("train", "both"))
  if _JSON.value:   # before the work: never over a file unasked, nor the config file
    fileio.check_output(_JSON.value, overwrite=_OVERWRITE.value, flag="--json",
                        inputs=(cli.config_file(_CONFIG),))
  preflight = None
  if _PREFLIGHT_JSON.value:   # read and checked before minutes of compiling
    if _MODE.value not in ("train", "both") or _COMPILE_ONLY.value:
      raise ValueError("--preflight_json compares the training step's memory: it needs "
                       "--mode=train or both, without --compile_only")
    preflight = json.loads(fileio.read_bytes(_PREFLIGHT_JSON.value))
    if not (preflight.get("programs") or {}).get("train", {}).get("memory"):
      raise ValueError(f"--preflight_json={_PREFLIGHT_JSON.value}: no memory plan of the "
                       "training step in it (a `python -m fcdm_jax.preflight --json` report "
                       "with the train program)")
    resolved = benchmark.apply_overrides(config, _DTYPE.value, _REMAT.value, _DWCONV_IMPL.value)
    plan_check.check_settings(preflight, plan_check.config_settings(resolved, _BATCH.value))
  if _MODE.value == "input":
    batch = _BATCH.value if _BATCH.present else int(config.batch_size)
    report = input_bench.run_input(config, batch=batch, steps=_REPEATS.value,
                                   warmup=_WARMUP.value, sources=_INPUT_SOURCES.value,
                                   num_examples=_INPUT_EXAMPLES.value,
                                   grain_threads=_GRAIN_THREADS.value)
  elif _MODE.value == "dwconv":
    report = dwconv_study(config, batch=_BATCH.value, repeats=_REPEATS.value)
    report["machine"] = machine_info(jax.devices())
  else:
    modes = benchmark.MODES if _MODE.value == "both" else (_MODE.value,)
    report = benchmark.run(config, batch=_BATCH.value, modes=modes, dtype=_DTYPE.value,
                           remat=_REMAT.value, dwconv_impl=_DWCONV_IMPL.value,
                           repeats=_REPEATS.value, warmup=_WARMUP.value,
                           vs_torch=_VS_TORCH.value, peak_tflops=_PEAK_TFLOPS.value,
                           compile_only=_COMPILE_ONLY.value, count_flops=_COUNT_FLOPS.value,
                           num_devices=_NUM_DEVICES.value, torch_threads=_TORCH_THREADS.value)
  if preflight is not None:
    report["vs_preflight"] = plan_check.compare(preflight, report)
    print(plan_check.format_comparison(report["vs_preflight"]))
  save_report(report, ["python -m fcdm_jax.bench", *sys.argv[1:]], _JSON.value)


if __name__ == "__main__":
  cli.run(main)
