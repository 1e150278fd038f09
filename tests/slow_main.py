"""`python -m fcdm_jax.main` with every step slowed by STEP_DELAY seconds.

The crash tests need a run that is still going when they signal it; the tiny test model
trains too fast for that. Only the test process is slowed; the code under test is the same.
"""

import os
import time

from absl import app

from fcdm_jax import main
from fcdm_jax.train import sharding

_delay = float(os.environ.get("STEP_DELAY", "0.5"))
_global_batch = sharding.global_batch


def _slow_global_batch(*args, **kwargs):
  time.sleep(_delay)
  return _global_batch(*args, **kwargs)


sharding.global_batch = _slow_global_batch

if __name__ == "__main__":
  app.run(main.main)
