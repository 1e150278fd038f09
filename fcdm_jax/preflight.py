"""Will this config fit, and how fast can it at best go, on a TPU slice or on GPUs? Compiled
here, with neither.

  python -m fcdm_jax.preflight --config=configs/xl_512.py --topology=v5p-64
  python -m fcdm_jax.preflight --config=configs/xl_256.py --topology=4x4090
  python -m fcdm_jax.preflight --config=configs/s_256.py --topology=v5e-8 --batch=512 \\
      --config.model.remat=dots --json=/tmp/s256.json
  python -m fcdm_jax.preflight --config=configs/xl_256.py --topology=4x4090 --fit

Topologies (`fcdm_jax.perf.targets`):
  TPU slices (needs libtpu: `pip install -e ".[tpu]"`, not a TPU; `fcdm_jax.tpu_topology`):
    accelerator types such as v4-8, v5e-16, v5p-64 (v4/v5p count TensorCores, 2 per chip),
    v6e-8, or raw topologies such as v5e:4x4, v4:2x2x1, multi-host slices included;
  NVIDIA GPUs (needs JAX's CUDA plugin and ptxas: `pip install -e ".[gpu]"`, not a GPU, a
    driver or CUDA; `fcdm_jax.gpu_topology`): GxNAME, G GPUs on one host (4x4090, 8xh100,
    8xa100-80gb), or HxGxNAME, H hosts of G GPUs (2x8xh100), NAME one of
    4090, l40s, a100-40gb, a100-80gb, h100 (SXM), h200 (`fcdm_jax/gpu_targets/`).
The real TPU or GPU compiler runs on this machine for the abstract devices of the target.

The programs compiled are the run's own, over the run's mesh (`config.mesh`) and
shardings (`config.sharding`):
  train    the training step of `fcdm_jax.main` (`make_train_step`, `state_layout`,
           `jit_train_step`) at the global batch (`--batch`, default config.batch_size), with
           the config's remat and gradient accumulation (config.grad_accum_steps);
  sample   the sampling forward, classifier-free guided at config.sample.cfg_scale, at the
           batch `fcdm_jax.sample` uses (`--sample_batch`, rounded up to the device count);
  preview  the training preview sampler (its whole loop), when config.preview.every_steps > 0;
built by `fcdm_jax.programs` (which the benchmark runs too), compiled and reported by
`fcdm_jax.perf.preflight_run`.

Per program and per device it prints XLA's memory plan (arguments, outputs, temporaries,
code; total against the memory a program may take: a TPU chip's HBM, or on a GPU the part
JAX's allocator takes, 0.75 by default (`--memory_fraction`, XLA_PYTHON_CLIENT_MEM_FRACTION);
FITS / DOES NOT FIT and the margin) and the compile time. For train and sample it also
prints the FLOPs per step (every loop counted as often as it runs) and the memory bytes
accessed (loops counted once: a lower figure; how both are counted:
`fcdm_jax.perf.preflight_run`), and the roofline lower bound of the step time,
max(FLOPs / peak, bytes / bandwidth): which of the two binds, the images/s and MFU that the
bound allows. These time figures are derived from compiler counts and vendor peaks: bounds,
not measurements. The GPU compiler does not refuse a program larger than the device: the
verdict is the project's comparison.

--fit compiles the training step for (remat policy, accumulation steps) pairs at the global
batch and prints the candidates compared, the fastest (lowest step bound) that leaves 10% of
the usable memory free, and the command-line overrides that run it (`fcdm_jax.perf.fit`).

Exit status: 0 when every program fits (--fit: when a candidate fits), 1 when one does not
(--fit: none does), 2 for bad input (a flag missing, unknown or out of range, a config that
does not load or has a bad value, a topology, a batch, a --json that exists or cannot be
written) or what the target needs not installed: one `error:` line, no report.
"""

from __future__ import annotations

import os
import sys

# Only the CPU backend is needed (the TPU and GPU devices are abstract); without this, JAX
# with libtpu or the CUDA plugin installed first probes for the accelerator on this
# machine. Set before JAX is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fcdm_jax import cli, config_checks, fileio  # noqa: E402
from fcdm_jax.perf import fit, preflight_run, targets  # noqa: E402
from fcdm_jax.perf.measure import save_report  # noqa: E402

BAD_INPUT = 2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (configs/*.py); fields overridable as --config.x=y")
_TOPOLOGY = flags.DEFINE_string("topology", None, targets.ACCEPTED)
_BATCH = flags.DEFINE_integer("batch", None, "global training batch (default: config.batch_size)")
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", preflight_run.SAMPLE_BATCH, "sampling batch (fcdm_jax.sample's "
    "--batch_size), rounded up to a multiple of the devices")
_PROGRAMS = flags.DEFINE_list("programs", list(preflight_run.PROGRAMS),
                              f"which of {preflight_run.PROGRAMS} to compile")
_FIT = flags.DEFINE_bool("fit", False, "compile the training step for (remat, accumulation) "
                         "candidates and print the fastest that fits with 10% free, with its "
                         "overrides")
_REMATS = flags.DEFINE_list("remats", list(fit.REMATS), "--fit: the remat policies compared")
_MEMORY_FRACTION = flags.DEFINE_float(
    "memory_fraction", None, "GPU: the fraction of each GPU's memory JAX's allocator takes "
    "(default: XLA_PYTHON_CLIENT_MEM_FRACTION as the run will see it, else JAX's 0.75)")
_JSON = flags.DEFINE_string("json", None, "write the report here as JSON (local or gs://); "
                            "an existing file is refused unless --overwrite")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace --json if it exists")


def _bad_input(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return BAD_INPUT


def main(argv):
  del argv   # cli.run refuses positional arguments
  if _CONFIG.value is None or not _TOPOLOGY.value:
    return _bad_input("--config and --topology are required")
  config = cli.config_value(_CONFIG).copy_and_resolve_references()
  try:
    target = targets.parse(_TOPOLOGY.value, _MEMORY_FRACTION.value)
  except ValueError as e:
    return _bad_input(str(e))
  for flag, value in (("batch", _BATCH.value), ("sample_batch", _SAMPLE_BATCH.value)):
    if value is not None and value < 1:
      return _bad_input(f"--{flag} must be a positive integer, got {value}")
  config_checks.check_config(config, training=True)   # bad input: cli.run exits 2
  if _JSON.value:
    fileio.check_output(_JSON.value, overwrite=_OVERWRITE.value, flag="--json",
                        inputs=(cli.config_file(_CONFIG),))
  missing = target.missing()
  if missing:
    return _bad_input(f"compiling for {'a TPU' if target.kind == 'tpu' else 'a GPU'} needs "
                      f"{missing}, which is not installed: {target.install_hint}")
  log = lambda s: print(s, flush=True)  # noqa: E731
  try:
    if _FIT.value:
      report = fit.run(config, _TOPOLOGY.value, batch=_BATCH.value, remats=tuple(_REMATS.value),
                       memory_fraction=_MEMORY_FRACTION.value, log=log)
    else:
      report = preflight_run.run(config, _TOPOLOGY.value, batch=_BATCH.value,
                                 sample_batch=_SAMPLE_BATCH.value,
                                 programs=tuple(_PROGRAMS.value), log=log,
                                 memory_fraction=_MEMORY_FRACTION.value)
  except ValueError as e:
    return _bad_input(str(e))
  save_report(report, ["python -m fcdm_jax.preflight", *sys.argv[1:]], _JSON.value)
  if _FIT.value:
    return 0 if report["choice"] is not None else 1
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  cli.run(main, error_status=BAD_INPUT)
