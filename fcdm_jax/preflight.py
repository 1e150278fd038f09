"""Will this config fit, and how fast can it at best go, on a TPU slice? Compiled here, no TPU.

  python -m fcdm_jax.preflight --config=configs/xl_512.py --topology=v5p-64
  python -m fcdm_jax.preflight --config=configs/s_256.py --topology=v5e-8 --batch=512 \\
      --config.model.remat=dots --json=/tmp/s256.json

Needs libtpu (`pip install -e ".[tpu]"`), not a TPU: the real TPU compiler runs on this
machine for the abstract devices of the slice (`fcdm_jax.tpu_topology`: accelerator types
such as v4-8, v5e-16, v5p-64 (v4/v5p count TensorCores, 2 per chip), v6e-8, or raw
topologies such as v5e:4x4, v4:2x2x1), multi-host slices included.

The programs compiled are the run's own, over the run's mesh (`config.mesh`) and
shardings (`config.sharding`):
  train    the training step of `fcdm_jax.main` (`make_train_step`, `state_layout`,
           `jit_train_step`) at the global batch (`--batch`, default config.batch_size);
  sample   the sampling forward, classifier-free guided at config.sample.cfg_scale, at the
           batch `fcdm_jax.sample` uses (`--sample_batch`, rounded up to the device count);
  preview  the training preview sampler (its whole loop), when config.preview.every_steps > 0;
built by `fcdm_jax.programs` (which the benchmark runs too), compiled and reported by
`fcdm_jax.perf.tpu_preflight`.

Per program and per chip it prints XLA's memory plan (arguments, outputs, temporaries,
code; total against the chip's HBM: FITS / DOES NOT FIT and the margin) and the compile
time. For train and sample it also prints the FLOPs per step (every loop counted as often
as it runs) and the HBM bytes accessed (loops counted once: a lower figure; how both are
counted: `fcdm_jax.perf.tpu_preflight`), and the roofline lower bound of the step time,
max(FLOPs / peak, bytes / bandwidth): which of the two binds, the images/s and MFU that the
bound allows. These time figures are derived from compiler counts and vendor peaks:
bounds, not measurements.

Exit status: 0 when every program fits, 1 when one does not, 2 for bad input (a flag
missing, unknown or out of range, a config that does not load or has a bad value, a
topology, a batch, a --json that exists or cannot be written) or no libtpu: one `error:`
line, no report.
"""

from __future__ import annotations

import os
import sys

# Only the CPU backend is needed (the TPU devices are abstract); without this, JAX with
# libtpu installed first probes for a TPU on this machine. Set before JAX is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fcdm_jax import cli, config_checks, fileio, tpu_topology  # noqa: E402
from fcdm_jax.perf import tpu_preflight  # noqa: E402
from fcdm_jax.perf.measure import save_report  # noqa: E402

BAD_INPUT = 2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (configs/*.py); fields overridable as --config.x=y")
_TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU slice: {tpu_topology.ACCEPTED}")
_BATCH = flags.DEFINE_integer("batch", None, "global training batch (default: config.batch_size)")
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", tpu_preflight.SAMPLE_BATCH, "sampling batch (fcdm_jax.sample's "
    "--batch_size), rounded up to a multiple of the chips")
_PROGRAMS = flags.DEFINE_list("programs", list(tpu_preflight.PROGRAMS),
                              f"which of {tpu_preflight.PROGRAMS} to compile")
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
    tpu_topology.parse(_TOPOLOGY.value)
  except ValueError as e:
    return _bad_input(str(e))
  for flag, value in (("batch", _BATCH.value), ("sample_batch", _SAMPLE_BATCH.value)):
    if value is not None and value < 1:
      return _bad_input(f"--{flag} must be a positive integer, got {value}")
  config_checks.check_config(config, training=True)   # bad input: cli.run exits 2
  if _JSON.value:
    fileio.check_output(_JSON.value, overwrite=_OVERWRITE.value, flag="--json",
                        inputs=(cli.config_file(_CONFIG),))
  if not tpu_topology.libtpu_available():
    return _bad_input(f"compiling for a TPU needs libtpu, which is not installed: "
                      f"{tpu_topology.INSTALL_HINT}")
  try:
    report = tpu_preflight.run(config, _TOPOLOGY.value, batch=_BATCH.value,
                               sample_batch=_SAMPLE_BATCH.value, programs=tuple(_PROGRAMS.value),
                               log=lambda s: print(s, flush=True))
  except ValueError as e:
    return _bad_input(str(e))
  save_report(report, ["python -m fcdm_jax.preflight", *sys.argv[1:]], _JSON.value)
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  cli.run(main, error_status=BAD_INPUT)
