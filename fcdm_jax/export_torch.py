"""Export a training run's checkpoint for the published PyTorch code.

    python -m fcdm_jax.export_torch --workdir=runs/xl_256 --out=FCDM-XL-256.pt
    python -m fcdm_jax.export_torch --workdir=runs/xl_256 --step=400000 --out=ema.safetensors

`.pt` holds what the published `train.py` saves, so `train.py --ckpt=FILE.pt` resumes
from it: `"model"` (weights), `"ema"` (EMA weights), `"opt"` (torch AdamW state_dict: our
first and second moments in torch's parameter layout and order, the step count, and one
param group with lr, betas, eps, weight_decay) and `"args"` (the run's settings as a plain
dict). The published sampling script reads `"ema"` (or `"model"`) as before.
`.safetensors` holds the EMA weights only, for sampling.

For `.pt` the whole train state is read into host memory (not onto an accelerator); for
`.safetensors` only the EMA is read, in the run's shardings. The file is written atomically, and an existing --out is refused unless --overwrite. Back the other way:
`python -m fcdm_jax.main --config=... --workdir=NEW --config.init_from=FILE.pt`.

Exit status 0 when the file is written, 1 on an error (one `error:` line).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags, logging  # noqa: E402

from fcdm_jax import cli  # noqa: E402
from fcdm_jax.train import torch_state  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (its checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Output file: FILE.pt (model, ema, opt, args: resumable "
                           "by the published train.py) or FILE.safetensors (EMA weights only).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv):
  del argv   # cli.run refuses positional arguments
  summary = torch_state.export_checkpoint(_WORKDIR.value, _OUT.value, step=_STEP.value,
                                         overwrite=_OVERWRITE.value)
  logging.info("exported %s", summary)
  print(f"{summary['out']}: step {summary['step']} ({summary['content']}), "
        f"{summary['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main)
