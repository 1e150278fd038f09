"""Train FCDM: `python -m fcdm_jax.main --config=configs/xl_512.py --workdir=DIR`.

The same command on an existing workdir resumes from its latest checkpoint. Override any
config field on the command line, e.g. `--config.batch_size=32 --config.num_train_steps=1000`;
a config file takes an argument after a colon, e.g. `--config=configs/s_256.py:flow`.
SIGTERM (preemption) saves a checkpoint after the step in flight and exits cleanly.

Exit status 0 when training reached num_train_steps (or stopped cleanly on SIGTERM), 1 on
an error: one `error:` line naming the problem (a bad config value, flag or path, data or a
checkpoint that does not fit the config), checked before any training step.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fcdm_jax import cli  # noqa: E402
from fcdm_jax.evaluation import make_evaluators  # noqa: E402
from fcdm_jax.train.loop import train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a configs/*.py with get_config()); fields can be "
    "overridden with --config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory for checkpoints, TensorBoard logs and sample grids "
    "(local path or gs://...). An existing workdir is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Orbax and TensorStore log every file they write at INFO; keep their warnings only."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorstore/")
    return record.levelno >= logging.logging.WARNING or not any(
        n in record.pathname for n in noisy)


def main(argv):
  del argv   # cli.run refuses positional arguments
  logging.get_absl_handler().addFilter(_QuietLibraries())
  summary = train_and_evaluate(cli.config_value(_CONFIG), _WORKDIR.value,
                               make_evaluators=make_evaluators)
  summary.pop("state", None)
  logging.info("done: %s", summary)


if __name__ == "__main__":
  cli.run(main)
