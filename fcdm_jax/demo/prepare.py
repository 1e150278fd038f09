"""Prepare the text-to-image demo's folder (coloured digits, captions, text encoder) once:

    python -m fcdm_jax.demo.prepare [--path=DIR]

Training prepares it on first use; a multi-process run needs it prepared beforehand.
Prints the text encoder's scores (`fcdm_jax.demo.colour_digits.prepare`).
"""

import json

from absl import app, flags

from fcdm_jax import cli
from fcdm_jax.demo import colour_digits

_PATH = flags.DEFINE_string("path", "", "Where to prepare the folder (default: "
                            f"{colour_digits.default_path()}).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  marker = colour_digits.prepare(_PATH.value)
  print(json.dumps({k: marker[k] for k in ("text_encoder", "num_examples", "seconds")}))


if __name__ == "__main__":
  cli.run(main)
